// The kernels built for AVX2, with that ISA's compiler flags (setup.py), so that ATen's vector
// headers compile their AVX2 implementations here (and only here).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "kernels.h"
#include "gated_kernels.h"

namespace normlab::cpu {

const KernelTable& kernels_avx2() {
  static const KernelTable table{"avx2", &AVX2::norm_fwd, &AVX2::norm_bwd, &AVX2::dyt_fwd, &AVX2::dyt_bwd,
                                  &AVX2::gated_fwd, &AVX2::gated_bwd};
  return table;
}

}  // namespace normlab::cpu
