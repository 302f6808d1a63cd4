// The boundary between the op layer (ops.cpp, built once) and the kernels (kernels.h, built once per
// ISA level): plain argument packs and a table of row-range functions. Nothing here depends on the ISA.
#pragma once

#include <cstdint>

namespace normlab::cpu {

enum class Dtype : int8_t { f32, bf16, f16 };

// RMSNorm casting modes as the kernels see them (the weights are already `offset + w`, rounded as the
// mode prescribes), and LayerNorm.
enum class Mode : int8_t { rms_fp32, rms_llama, rms_none, layer };

struct NormFwdArgs {
  const void* x;       // (rows, n), dtype x_t; y has the same dtype
  const void* r;       // fused add: the residual (dtype r_t), else null
  void* s;             // fused add: s = x + r (dtype s_t), else null
  void* y;
  const float* w;      // n fp32 values: the effective weights (ones when there is none)
  const float* b;      // the bias (LayerNorm's, or an unfused RMSNorm's), or null
  float* mean;         // LayerNorm only
  float* rstd;
  int64_t n, k;        // row length; RMSNorm: leading elements of the statistic
  float eps;
  Dtype x_t, r_t, s_t; // not fused: s_t == x_t (the norm's own dtype)
  Mode mode;
  bool stream;         // y with non-temporal stores (calls larger than the last-level cache)
};

struct NormBwdArgs {
  const void* dy;      // all four (rows, n), dtype t
  const void* x;
  const void* dsum;    // fused add: gradient of s, added to dx; else null
  void* dx;
  const float* w;      // n fp32 values (offset + w), ones when there is none
  const float* mean;   // LayerNorm only
  const float* rstd;
  float* pw;           // n fp32: Σ over the range's rows of dy·x̂, added in row order
  float* pb;           // LayerNorm: Σ dy, or null
  int64_t n, k;
  Dtype t;
  bool layer;
  bool stream;         // dx with non-temporal stores (calls larger than the last-level cache)
};

struct DytFwdArgs {
  const void* x;       // (rows, n), dtype t; y the same
  void* y;
  float* tanh;         // (rows, n) fp32: tanh(αx) kept for the backward, or null
  const float* w;      // n fp32 values or null
  const float* b;      // n fp32 values or null
  float alpha;
  int64_t n;
  Dtype t;
};

struct DytBwdArgs {
  const void* dy;
  const void* x;
  const float* tanh;   // the forward's tanh(αx), or null: computed again
  void* dx;
  const float* w;      // or null
  float alpha;
  float* pw;           // n fp32 partial of Σ dy·tanh(αx), or null
  float* pb;           // n fp32 partial of Σ dy, or null
  float* palpha;       // one fp32 partial of Σ dy·w·(1 − t²)·x
  int64_t n;
  Dtype t;
};

// Gated RMSNorm: rows of n elements in groups of `group`, each normalized by its own RMS.
struct GatedFwdArgs {
  const void* x;       // (rows, n), dtype t; z and y the same
  const void* z;       // the gate, or null
  void* y;
  const float* w;      // n fp32 values: the effective weights `offset + w` (ones when there is none)
  float* rstd;         // (rows, n / group)
  int64_t n, group;
  float eps;
  Dtype t;
  bool before;         // norm_before_gate: y = norm(x)·w·silu(z), else norm(x·silu(z))·w
  bool llama;          // round the normalized value to t before the weight (and the gate after)
};

struct GatedBwdArgs {
  const void* dy;      // (rows, n), dtype t, as x, z, dx, dz
  const void* x;
  const void* z;       // or null
  void* dx;
  void* dz;            // null without a gate
  const float* w;      // n fp32 values (offset + w), ones when there is none
  const float* rstd;
  float* pw;           // n fp32: Σ over the range's rows of the weight-gradient terms, added in row order
  int64_t n, group;
  Dtype t;
  bool before;
};

using NormFwdFn = void (*)(const NormFwdArgs&, int64_t row_begin, int64_t row_end);
using NormBwdFn = void (*)(const NormBwdArgs&, int64_t row_begin, int64_t row_end);
using DytFwdFn = void (*)(const DytFwdArgs&, int64_t row_begin, int64_t row_end);
using DytBwdFn = void (*)(const DytBwdArgs&, int64_t row_begin, int64_t row_end);
using GatedFwdFn = void (*)(const GatedFwdArgs&, int64_t row_begin, int64_t row_end);
using GatedBwdFn = void (*)(const GatedBwdArgs&, int64_t row_begin, int64_t row_end);

struct KernelTable {
  const char* isa;
  NormFwdFn norm_fwd;
  NormBwdFn norm_bwd;
  DytFwdFn dyt_fwd;
  DytBwdFn dyt_bwd;
  GatedFwdFn gated_fwd;
  GatedBwdFn gated_bwd;
};

// One per ISA build (kernels_<isa>.cpp).
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512bf16();

}  // namespace normlab::cpu
