// The kernels built for AVX512 with AVX512-BF16 (setup.py adds -mavx512bf16): bf16 rounding with the CPU's own
// conversion instructions, the same bits as the other builds (kernels.h, to16 and round_bf16). CPU_CAPABILITY
// names its own namespace, for normlab's kernels and ATen's vector code alike, so nothing compiled here can stand
// in for the AVX512 build's copy at link time.
#define CPU_CAPABILITY AVX512BF16
#define CPU_CAPABILITY_AVX512

#include "kernels.h"
#include "gated_kernels.h"

namespace normlab::cpu {

const KernelTable& kernels_avx512bf16() {
  static const KernelTable table{"avx512bf16", &AVX512BF16::norm_fwd, &AVX512BF16::norm_bwd, &AVX512BF16::dyt_fwd,
                                  &AVX512BF16::dyt_bwd, &AVX512BF16::gated_fwd, &AVX512BF16::gated_bwd};
  return table;
}

}  // namespace normlab::cpu
