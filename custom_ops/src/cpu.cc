#include "cpu.h"

#include <cstdlib>
#include <cstring>

#include "ort_glue.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace bmoe {

static CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  f.avx512vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
#elif defined(__aarch64__)
  f.neon = true;  // mandatory on AArch64
#if defined(__linux__)
  f.dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  // Not every Apple AArch64 core has it (A7-A12 lack it; iOS 17/18 still run on A12):
  // ask the kernel (iOS 15+/macOS 12+; where the key is unknown, fall back to NEON).
  int dp = 0;
  size_t len = sizeof dp;
  f.dotprod = sysctlbyname("hw.optional.arm.FEAT_DotProd", &dp, &len, nullptr, 0) == 0 && dp != 0;
#endif
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* variant_name(Variant v) {
  switch (v) {
    case Variant::Scalar: return "scalar";
    case Variant::Avx2: return "avx2";
    case Variant::Avx512: return "avx512";
    case Variant::Neon: return "neon";
    case Variant::Dotprod: return "dotprod";
  }
  return "?";
}

bool variant_available(Variant v) {
  const CpuFeatures& f = cpu_features();
  switch (v) {
    case Variant::Scalar: return true;
#if defined(__x86_64__) || defined(__i386__)
    case Variant::Avx2: return f.avx2;
    case Variant::Avx512: return f.avx512;
#endif
#if defined(__aarch64__)
    case Variant::Neon: return f.neon;
    case Variant::Dotprod: return f.dotprod;
#endif
    default: return false;  // not compiled into this build
  }
}

Variant select_variant() {
  static const Variant all[] = {Variant::Scalar, Variant::Avx2, Variant::Avx512, Variant::Neon, Variant::Dotprod};
  const char* forced = std::getenv("BMOE_KERNEL");
  if (forced && *forced) {
    for (Variant v : all) {
      if (std::strcmp(forced, variant_name(v)) != 0) continue;
      if (!variant_available(v))
        throw OpError(std::string("BMOE_KERNEL=") + forced + " is not available on this CPU/build");
      return v;
    }
    throw OpError(std::string("BMOE_KERNEL=") + forced +
                  " is not a kernel variant (expected scalar, avx2, avx512, neon or dotprod)");
  }
  Variant best = Variant::Scalar;
  for (Variant v : all)
    if (variant_available(v)) best = v;  // `all` is ordered by preference within an ISA
  return best;
}

}  // namespace bmoe
