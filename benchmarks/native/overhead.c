/* Peak RSS of an app that embeds ONNX Runtime and the ai.bmoe op library, before any model:
 * create the environment, register libbmoe_ops, create and run a one-node session.
 * This is the planner's `native` runtime overhead (bmoe plan --runtime native); run by native_overhead.py.
 * usage: overhead <libbmoe_ops.so> <identity.onnx>   prints the peak RSS (VmHWM) in bytes */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "onnxruntime_c_api.h"

static const OrtApi *ort;

static void check(OrtStatus *s) {
  if (s) {
    fprintf(stderr, "ort: %s\n", ort->GetErrorMessage(s));
    exit(1);
  }
}

static long peak_rss_bytes(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kb = -1;
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "VmHWM:", 6) == 0) kb = strtol(line + 6, NULL, 10);
  if (f) fclose(f);
  return kb * 1024;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s <libbmoe_ops.so> <model.onnx>\n", argv[0]);
    return 2;
  }
  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  OrtEnv *env;
  OrtSessionOptions *opts;
  OrtSession *session;
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "overhead", &env));
  check(ort->CreateSessionOptions(&opts));
  check(ort->SetIntraOpNumThreads(opts, 1));
  check(ort->RegisterCustomOpsLibrary_V2(opts, argv[1]));
  check(ort->CreateSession(env, argv[2], opts, &session));

  OrtMemoryInfo *mem;
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem));
  float x = 1.0f;
  int64_t shape[1] = {1};
  OrtValue *in = NULL, *out = NULL;
  check(ort->CreateTensorWithDataAsOrtValue(mem, &x, sizeof x, shape, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &in));
  const char *in_names[] = {"x"}, *out_names[] = {"y"};
  check(ort->Run(session, NULL, in_names, (const OrtValue *const *)&in, 1, out_names, 1, &out));
  printf("%ld\n", peak_rss_bytes());
  ort->ReleaseValue(out);
  ort->ReleaseValue(in);
  ort->ReleaseMemoryInfo(mem);
  ort->ReleaseSession(session);
  ort->ReleaseSessionOptions(opts);
  ort->ReleaseEnv(env);
  return 0;
}
