/* bmoe_generate: greedy text generation with an exported bmoe model from C, no Python.
 *
 * ONNX Runtime's C API + the ai.bmoe op library (libbmoe_ops): load MODEL_DIR/model.onnx, feed the prompt,
 * then one token at a time with the KV cache (present_* of a step become past_* of the next), greedy argmax.
 * The graph's own input/output names drive the loop (input_ids, past_key_i/past_value_i → logits,
 * present_key_i/present_value_i, plus attention_mask/position_ids on exports that have them; docs/ops.md),
 * so any bmoe LM export works; tokenization here is the
 * byte-level tokenizer (vocabulary of 256, like the bundled model). For BPE models use onnxruntime-genai.
 *
 * usage: bmoe_generate MODEL_DIR LIBBMOE_OPS PROMPT N_NEW [THREADS]
 * prints the generated token ids, the text, and the process's peak RSS (VmHWM) to stderr.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define MAX_IO 256

static const OrtApi *ort;

static void die(const char *what, const char *detail) {
  fprintf(stderr, "bmoe_generate: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

static void check(OrtStatus *s) {
  if (s) die("onnxruntime", ort->GetErrorMessage(s)); /* process exits: no need to release s */
}

static long peak_rss_kib(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kib = -1;
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "VmHWM:", 6) == 0) kib = strtol(line + 6, NULL, 10);
  if (f) fclose(f);
  return kib;
}

static long parse_count(const char *s, const char *what, long lo, long hi) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || v < lo || v > hi) die(what, s);
  return v;
}

enum Role { IDS, MASK, POSITIONS, PAST };

typedef struct {
  OrtSession *session;
  OrtAllocator *alloc;
  OrtMemoryInfo *mem;
  size_t n_in, n_out, positions; /* positions: tokens in the KV cache so far */
  char *in_names[MAX_IO], *out_names[MAX_IO];
  enum Role role[MAX_IO];
  size_t present_of[MAX_IO]; /* input index of past_X_i -> output index of present_X_i */
  int64_t heads, head_dim, vocab;
  OrtValue *past[MAX_IO]; /* by input index, for the PAST inputs */
} Model;

/* A [1, heads, 0, head_dim] float tensor: the empty cache before the prompt. */
static OrtValue *empty_cache(Model *m) {
  int64_t shape[4] = {1, m->heads, 0, m->head_dim};
  OrtValue *v;
  check(ort->CreateTensorAsOrtValue(m->alloc, shape, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &v));
  return v;
}

static void load(Model *m, const char *dir, const char *ops_lib, int threads) {
  OrtEnv *env;
  OrtSessionOptions *opts;
  char path[4096];
  if (snprintf(path, sizeof path, "%s/model.onnx", dir) >= (int)sizeof path) die("model path too long", dir);
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "bmoe", &env));
  check(ort->CreateSessionOptions(&opts));
  check(ort->SetIntraOpNumThreads(opts, threads));
  check(ort->AddSessionConfigEntry(opts, "bmoe.model_dir", dir)); /* streamed angle_file paths resolve here */
  check(ort->RegisterCustomOpsLibrary_V2(opts, ops_lib));
  check(ort->CreateSession(env, path, opts, &m->session));
  ort->ReleaseSessionOptions(opts);
  check(ort->GetAllocatorWithDefaultOptions(&m->alloc));
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &m->mem));

  check(ort->SessionGetInputCount(m->session, &m->n_in));
  check(ort->SessionGetOutputCount(m->session, &m->n_out));
  if (m->n_in < 3 || m->n_in > MAX_IO || m->n_out > MAX_IO)
    die("not a bmoe KV-cache LM export", "expected input_ids + past_key/value per layer");
  for (size_t i = 0; i < m->n_in; i++) check(ort->SessionGetInputName(m->session, i, m->alloc, &m->in_names[i]));
  for (size_t i = 0; i < m->n_out; i++) check(ort->SessionGetOutputName(m->session, i, m->alloc, &m->out_names[i]));
  if (strcmp(m->in_names[0], "input_ids") || strcmp(m->out_names[0], "logits"))
    die("not a bmoe KV-cache LM export", "first input must be input_ids and first output logits");
  size_t first_past = 0; /* the first PAST input: its dims give heads and head_dim */
  for (size_t i = 1; i < m->n_in; i++) {
    const char *name = m->in_names[i];
    if (!strcmp(name, "attention_mask")) m->role[i] = MASK;
    else if (!strcmp(name, "position_ids")) m->role[i] = POSITIONS;
    else if (!strncmp(name, "past_", 5)) {
      char want[256];
      if (snprintf(want, sizeof want, "present_%s", name + 5) >= (int)sizeof want) die("input name too long", name);
      size_t o = 1;
      while (o < m->n_out && strcmp(m->out_names[o], want)) o++;
      if (o == m->n_out) die("no present output for", name);
      m->role[i] = PAST, m->present_of[i] = o;
      if (!first_past) first_past = i;
    } else die("unexpected graph input", name);
  }
  size_t n_past = 0;
  for (size_t i = 1; i < m->n_in; i++) n_past += m->role[i] == PAST;
  if (!n_past || m->n_out != 1 + n_past)
    die("not a bmoe KV-cache LM export", "expected logits + one present output per past input");

  /* heads and head_dim from a past input's static dims [batch, heads, past, head_dim]; vocab from logits */
  OrtTypeInfo *ti;
  const OrtTensorTypeAndShapeInfo *si;
  int64_t dims[4];
  size_t nd;
  check(ort->SessionGetInputTypeInfo(m->session, first_past, &ti));
  check(ort->CastTypeInfoToTensorInfo(ti, &si));
  check(ort->GetDimensionsCount(si, &nd));
  if (nd != 4) die("past inputs must have 4 dims", NULL);
  check(ort->GetDimensions(si, dims, 4));
  m->heads = dims[1], m->head_dim = dims[3];
  ort->ReleaseTypeInfo(ti);
  check(ort->SessionGetOutputTypeInfo(m->session, 0, &ti));
  check(ort->CastTypeInfoToTensorInfo(ti, &si));
  check(ort->GetDimensions(si, dims, 3));
  m->vocab = dims[2];
  ort->ReleaseTypeInfo(ti);
  if (m->heads <= 0 || m->head_dim <= 0 || m->vocab <= 0) die("model has dynamic head/vocab dims", NULL);
  if (m->vocab != 256) die("this example tokenizes bytes (vocabulary 256); use onnxruntime-genai for BPE", NULL);
  for (size_t i = 1; i < m->n_in; i++)
    if (m->role[i] == PAST) m->past[i] = empty_cache(m);
}

/* An int64 [1, n] tensor holding first, first+step, ... (owned by ORT's allocator). */
static OrtValue *int64_row(Model *m, int64_t n, int64_t first, int64_t step) {
  int64_t shape[2] = {1, n}, *data;
  OrtValue *v;
  check(ort->CreateTensorAsOrtValue(m->alloc, shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &v));
  check(ort->GetTensorMutableData(v, (void **)&data));
  for (int64_t i = 0; i < n; i++) data[i] = first + i * step;
  return v;
}

/* Run ids[0..n) after the cached positions; returns the argmax of the last position's logits. */
static int step(Model *m, const int64_t *ids, int64_t n) {
  int64_t shape[2] = {1, n}, past = (int64_t)m->positions;
  OrtValue *inputs[MAX_IO] = {0}, *outputs[MAX_IO] = {0};
  check(ort->CreateTensorWithDataAsOrtValue(m->mem, (void *)ids, (size_t)n * sizeof *ids, shape, 2,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &inputs[0]));
  for (size_t i = 1; i < m->n_in; i++)
    inputs[i] = m->role[i] == PAST  ? m->past[i]
                : m->role[i] == MASK ? int64_row(m, past + n, 1, 0) /* no padding: attend to everything */
                                     : int64_row(m, n, past, 1);    /* positions after the cache */
  check(ort->Run(m->session, NULL, (const char *const *)m->in_names, (const OrtValue *const *)inputs, m->n_in,
                 (const char *const *)m->out_names, m->n_out, outputs));
  float *logits;
  check(ort->GetTensorMutableData(outputs[0], (void **)&logits));
  const float *last = logits + (n - 1) * m->vocab;
  int best = 0;
  for (int v = 1; v < m->vocab; v++)
    if (last[v] > last[best]) best = v;
  ort->ReleaseValue(inputs[0]);
  ort->ReleaseValue(outputs[0]);
  for (size_t i = 1; i < m->n_in; i++) {
    if (m->role[i] != PAST) {
      ort->ReleaseValue(inputs[i]);
      continue;
    }
    ort->ReleaseValue(m->past[i]); /* present → past */
    m->past[i] = outputs[m->present_of[i]];
  }
  m->positions += (size_t)n;
  return best;
}

int main(int argc, char **argv) {
  if (argc < 5 || argc > 6) {
    fprintf(stderr, "usage: %s MODEL_DIR LIBBMOE_OPS PROMPT N_NEW [THREADS]\n", argv[0]);
    return 2;
  }
  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!ort) die("this ONNX Runtime is older than the API the example was built for", NULL);
  long n_new = parse_count(argv[4], "N_NEW must be a whole number in [1, 100000]", 1, 100000);
  int threads = argc == 6 ? (int)parse_count(argv[5], "THREADS must be in [1, 1024]", 1, 1024) : 1;
  size_t n_prompt = strlen(argv[3]);
  if (n_prompt == 0) die("PROMPT must not be empty", NULL);

  Model m = {0};
  load(&m, argv[1], argv[2], threads);
  int64_t *ids = malloc(n_prompt * sizeof *ids);
  if (!ids) die("out of memory", NULL);
  for (size_t i = 0; i < n_prompt; i++) ids[i] = (unsigned char)argv[3][i];

  printf("tokens:");
  int64_t next = step(&m, ids, (int64_t)n_prompt);
  char *text = malloc((size_t)n_new + 1);
  if (!text) die("out of memory", NULL);
  for (long t = 0; t < n_new; t++) {
    printf(" %lld", (long long)next);
    text[t] = (char)next;
    if (t + 1 < n_new) next = step(&m, &next, 1);
  }
  text[n_new] = 0;
  printf("\ntext: %s%s\n", argv[3], text);
  fprintf(stderr, "peak RSS %.1f MiB\n", peak_rss_kib() / 1024.0);
  free(text);
  free(ids);
  return 0;
}
