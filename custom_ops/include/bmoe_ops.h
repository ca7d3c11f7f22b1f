/* bmoe_ops.h — registration entry points of the ai.bmoe ONNX Runtime custom-op
 * library (libbmoe_ops.so / libbmoe_ops.a, custom_ops/). docs/embedding.md shows
 * how apps use them; docs/ops.md specifies the operators.
 *
 * Both functions register the domain "ai.bmoe" (ButterflyRotate, TernaryMatMul)
 * on a session options object. They return NULL on success, else an OrtStatus
 * that the caller releases with OrtApi::ReleaseStatus. They need ONNX Runtime
 * >= 1.21 (C API version 21); with an older runtime they do nothing and return NULL.
 *
 *   Shared library: ONNX Runtime looks up RegisterCustomOps itself
 *     (OrtApi::RegisterCustomOpsLibrary_V2, Java registerCustomOpLibrary(path),
 *      Python SessionOptions.register_custom_ops_library(path)).
 *   Static library: call BmoeRegisterCustomOps(options, OrtGetApiBase()) directly,
 *     or pass it to ORT by pointer (Objective-C/Swift
 *     registerCustomOpsUsingFunctionPointer) or by name
 *     (OrtApi::RegisterCustomOpsUsingFunction("BmoeRegisterCustomOps"): the
 *     symbol must then be dynamically exported, e.g. -rdynamic on Linux).
 *
 * The kernel variant (scalar, avx2, avx512, neon, dotprod) is picked per CPU at
 * kernel creation; the environment variable BMOE_KERNEL forces one. TernaryMatMul
 * picks its variant per mode (exact / act_quant) by timing the CPU's variants once
 * per process at first use (tens of ms); BMOE_CALIBRATE=0 skips the timing (best
 * variant by CPU features), and BmoeTernaryKernel(act_quant) names the choice.
 */
#ifndef BMOE_OPS_H
#define BMOE_OPS_H

#ifdef __cplusplus
extern "C" {
#endif

/* Opaque ONNX Runtime types (the same declarations as onnxruntime_c_api.h). */
typedef struct OrtStatus OrtStatus;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtApiBase OrtApiBase;

/* Entry point looked up by name by ONNX Runtime in libbmoe_ops.so. */
OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api);

/* The same function under a name that cannot clash with other custom-op
 * libraries linked into one binary; use this one when linking libbmoe_ops.a. */
OrtStatus* BmoeRegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api);

/* The kernel variant TernaryMatMul uses in this process for act_quant = 0 or 1
 * ("avx512", ...; calibrates on the first call), or "" if BMOE_KERNEL is invalid. */
const char* BmoeTernaryKernel(int act_quant);

#ifdef __cplusplus
}
#endif

#endif /* BMOE_OPS_H */
