// The kernels built for AVX512, with that ISA's compiler flags (setup.py), so that ATen's vector
// headers compile their AVX512 implementations here (and only here).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "kernels.h"
#include "gated_kernels.h"

namespace normlab::cpu {

const KernelTable& kernels_avx512() {
  static const KernelTable table{"avx512", &AVX512::norm_fwd, &AVX512::norm_bwd, &AVX512::dyt_fwd, &AVX512::dyt_bwd,
                                  &AVX512::gated_fwd, &AVX512::gated_bwd};
  return table;
}

}  // namespace normlab::cpu
