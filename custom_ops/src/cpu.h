// Kernel variants and runtime CPU dispatch. BMOE_KERNEL=<name> forces a variant.
#pragma once
#include <string>

namespace bmoe {

enum class Variant { Scalar, Avx2, Avx512, Neon, Dotprod };

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA
  bool avx512 = false;      // AVX-512 F/BW/DQ/VL
  bool avx512vnni = false;  // + VNNI
  bool neon = false;
  bool dotprod = false;
};

const CpuFeatures& cpu_features();
const char* variant_name(Variant v);
bool variant_available(Variant v);

// Variant for a new kernel: BMOE_KERNEL if set (throws OpError if unknown or
// unavailable on this CPU or build), else the best available.
Variant select_variant();

}  // namespace bmoe
