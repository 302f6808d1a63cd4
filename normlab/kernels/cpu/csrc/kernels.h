// The CPU kernels, written once with at::vec and compiled once per ISA level (kernels_<isa>.cpp sets
// CPU_CAPABILITY before including this file).
//
// Same bits on every ISA: elementwise work is a fixed sequence of IEEE operations per element (built with
// -ffp-contract=off, so no FMA is fused in), and every row sum adds element e into lane e mod 16, in
// blocks of 1024 elements, groups of 16 blocks, then the groups, whatever the vector width; the 16
// lanes are then added in one fixed tree. bf16/fp16 go through ATen's own conversions.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "table.h"

// The row helpers are inlined by force, so that their lambdas keep the sums in registers; the sanitizer build (-O1)
// leaves inlining to the compiler (forced, it took minutes longer to build).
#if defined(NORMLAB_SANITIZE)
#define NORMLAB_INLINE inline
#else
#define NORMLAB_INLINE __attribute__((always_inline)) inline
#endif

namespace normlab::cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VF = Vec::size();
constexpr int64_t STEP = 2 * VF;  // elements per loop step: two float vectors, one 16-bit vector
constexpr int64_t LANES = 16;     // lanes of every row sum, whatever the vector width
constexpr int64_t PARTS = LANES / VF;
constexpr int64_t BLOCK = 1024;
constexpr int64_t BLOCKS_PER_GROUP = 16;
constexpr int64_t PIVOT = 64;  // LayerNorm: leading elements whose mean is the first shift of the statistics
static_assert(PARTS >= 1 && LANES % VF == 0 && BLOCK % STEP == 0);

// ---- loads and stores of up to STEP elements as two float vectors (missing lanes read as 0) ----------
template <typename T>
struct IO;

template <>
struct IO<float> {
  static void load(const float* p, int64_t count, Vec& a, Vec& b) {
    if (count == STEP) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + VF);
      return;
    }
    a = Vec::loadu(p, std::min(count, VF));
    b = count > VF ? Vec::loadu(p + VF, count - VF) : Vec(0.f);
  }
  static void store(float* p, int64_t count, const Vec& a, const Vec& b) {
    if (count == STEP) {
      a.store(p);
      b.store(p + VF);
      return;
    }
    a.store(p, std::min(count, VF));
    if (count > VF) b.store(p + VF, count - VF);
  }
  static void round(Vec&, Vec&) {}
  // A non-temporal store (no read of the output line first, no eviction of the input) where the step is
  // whole and aligned, else an ordinary one: the same values either way.
  static void stream(float* p, int64_t count, const Vec& a, const Vec& b) {
    if (count != STEP || reinterpret_cast<uintptr_t>(p) % sizeof(Vec) != 0) return store(p, count, a, b);
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + VF, b);
#elif defined(CPU_CAPABILITY_AVX2)
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + VF, b);
#else
    store(p, count, a, b);
#endif
  }
};

// Orders a thread's non-temporal stores before whatever follows its part of the call.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Two fp32 vectors as one vector of T, rounded to nearest even: ATen's conversion, or (AVX512-BF16 build) the
// CPU's own for bf16 with the same bits.
template <typename T>
inline at::vec::Vectorized<T> to16(const Vec& a, const Vec& b) {
  return at::vec::convert_from_float<T>(a, b);
}

#if defined(__AVX512BF16__)
// vcvtne2ps2bf16 rounds to nearest even as ATen does, but reads fp32 denormals as zero and keeps a NaN's
// payload, where ATen rounds denormals and writes NaN as 0xffff: a step holding either goes ATen's way.
inline bool bf16_special(const Vec& a) { return _mm512_fpclass_ps_mask(a, 0xA1) != 0; }  // NaN or denormal
inline bool bf16_special(const Vec& a, const Vec& b) {
  return (_mm512_fpclass_ps_mask(a, 0xA1) | _mm512_fpclass_ps_mask(b, 0xA1)) != 0;
}
template <>
inline at::vec::Vectorized<c10::BFloat16> to16<c10::BFloat16>(const Vec& a, const Vec& b) {
  if (bf16_special(a, b)) [[unlikely]] return at::vec::convert_from_float<c10::BFloat16>(a, b);
  return at::vec::Vectorized<c10::BFloat16>((__m512i)_mm512_cvtne2ps_pbh(b, a));  // a: elements 0..15
}
#endif

template <typename T>
struct IO16 {
  using V = at::vec::Vectorized<T>;
  static_assert(V::size() == STEP);
  static void load(const T* p, int64_t count, Vec& a, Vec& b) {
    const V v = count == STEP ? V::loadu(p) : V::loadu(p, count);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
  static void store(T* p, int64_t count, const Vec& a, const Vec& b) {
    const V v = to16<T>(a, b);
    if (count == STEP) v.store(p);
    else v.store(p, count);
  }
  // Round to T's precision (round to nearest even), back in fp32.
  static void round(Vec& a, Vec& b) { std::tie(a, b) = at::vec::convert_to_float<T>(to16<T>(a, b)); }
  // As store, with a non-temporal store where the step is whole and aligned: the same values either way.
  static void stream(T* p, int64_t count, const Vec& a, const Vec& b) {
    if (count != STEP || reinterpret_cast<uintptr_t>(p) % sizeof(V) != 0) return store(p, count, a, b);
    const V v = to16<T>(a, b);
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#elif defined(CPU_CAPABILITY_AVX2)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
#else
    v.store(p);
#endif
  }
};

// fp32 → bf16 → fp32 in fp32 registers: ATen's round to nearest even (add 0x7fff + the kept lowest bit, cut
// the low 16 bits; NaN becomes 0xffff), the same bits as convert_from_float then convert_to_float without
// packing to 16 bits and widening back.
inline Vec round_bf16(const Vec& x) {
#if defined(__AVX512BF16__)
  if (!bf16_special(x)) [[likely]]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
#endif
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(v, 16), _mm512_set1_epi32(1));
  __m512i t = _mm512_add_epi32(_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)), v);
  t = _mm512_and_si512(t, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  t = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_set1_epi32(static_cast<int>(0xffff0000u)), t);
  return _mm512_castsi512_ps(t);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i v = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(v, 16), _mm256_set1_epi32(1));
  __m256i t = _mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), v);
  t = _mm256_and_si256(t, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q));
  t = _mm256_blendv_epi8(_mm256_set1_epi32(static_cast<int>(0xffff0000u)), t, ordered);
  return _mm256_castsi256_ps(t);
#else
  Vec a = x, b = x;
  IO16<c10::BFloat16>::round(a, b);
  return a;
#endif
}

template <>
struct IO<c10::BFloat16> : IO16<c10::BFloat16> {
  static void round(Vec& a, Vec& b) {
    a = round_bf16(a);
    b = round_bf16(b);
  }
};
template <>
struct IO<c10::Half> : IO16<c10::Half> {};

template <typename T>
inline void load(const void* base, int64_t at, int64_t count, Vec& a, Vec& b) {
  IO<T>::load(static_cast<const T*>(base) + at, count, a, b);
}
template <typename T>
inline void store(void* base, int64_t at, int64_t count, const Vec& a, const Vec& b) {
  IO<T>::store(static_cast<T*>(base) + at, count, a, b);
}

// Lanes [count, STEP) set to 0.
inline void keep_first(int64_t count, Vec& a, Vec& b) {
  if (count == STEP) return;
  a = Vec::set(Vec(0.f), a, std::min(count, VF));
  b = count > VF ? Vec::set(Vec(0.f), b, count - VF) : Vec(0.f);
}

// 0 where dy == 0, else v: a NaN/inf in a row whose gradient is 0 cannot reach a parameter gradient.
inline Vec unless_zero(const Vec& dy, const Vec& v) { return Vec::blendv(v, Vec(0.f), dy == Vec(0.f)); }

// ---- row sums with a fixed lane layout --------------------------------------------------------------
struct Lanes {
  Vec v[PARTS];
  Lanes() {
    for (auto& p : v) p = Vec(0.f);
  }
  void add_step(const Vec& a, const Vec& b) {  // elements e .. e + STEP of the row
    v[0] = v[0] + a;
    v[1 % PARTS] = v[1 % PARTS] + b;
  }
  void add(const Lanes& o) {
    for (int64_t p = 0; p < PARTS; ++p) v[p] = v[p] + o.v[p];
  }
  // Lane i plus lane i + half for half = 8, 4, 2, 1: the same additions in vector registers where the build has them.
  float total() const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 all = v[0];
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(all), _mm512_extractf32x8_ps(all, 1));
#else
    const __m256 h8 = _mm256_add_ps(v[0], v[1 % PARTS]);
#endif
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
#else
    float t[LANES];
    for (int64_t p = 0; p < PARTS; ++p) v[p].store(t + p * VF);
    for (int64_t half = LANES / 2; half > 0; half /= 2)
      for (int64_t i = 0; i < half; ++i) t[i] = t[i] + t[i + half];
    return t[0];
#endif
  }
};

// Asks for the cache lines of elements [at, at + count) of base (the next row's, while this one is written): no
// effect on any value.
template <typename T>
inline void prefetch(const void* base, int64_t at, int64_t count) {
  const char* p = reinterpret_cast<const char*>(static_cast<const T*>(base) + at);
  for (int64_t off = 0; off < count * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 3);
}

// body(j, count) for the steps of [lo, hi): whole steps first, with a compile-time count (loads and stores take
// their unmasked form and no lane is cleared), then the remainder. The same elements in the same order either way.
template <typename Body>
NORMLAB_INLINE void for_steps(int64_t lo, int64_t hi, Body&& body) {
  int64_t j = lo;
#if !defined(NORMLAB_SANITIZE)  // the sanitizer build keeps one instance of each body: the same accesses, half the build
  for (; j + STEP <= hi; j += STEP) body(j, std::integral_constant<int64_t, STEP>{});
#endif
  for (; j < hi; j += STEP) body(j, std::min(STEP, hi - j));
}

// out[q] = Σ over elements [0, len) of quantity q; step(e, count, vals) writes the quantities of elements
// e .. e + count into vals[q][0..1], zero in lanes past count. step sees the elements in order, once.
template <int NQ, typename Step>
NORMLAB_INLINE void row_sums(int64_t len, Step&& step, float (&out)[NQ]) {
  if (len <= BLOCK) {  // one block: its lanes are the row's (the general path adds them to zeros)
    Lanes block[NQ];
    for_steps(0, len, [&](int64_t e, auto c) {
      Vec vals[NQ][2];
      step(e, c, vals);
      for (int q = 0; q < NQ; ++q) block[q].add_step(vals[q][0], vals[q][1]);
    });
    for (int q = 0; q < NQ; ++q) out[q] = block[q].total();
    return;
  }
  Lanes total[NQ], group[NQ];
  int64_t blocks = 0;
  for (int64_t start = 0; start < len; start += BLOCK) {
    Lanes block[NQ];
    const int64_t stop = std::min(len, start + BLOCK);
    for_steps(start, stop, [&](int64_t e, auto c) {
      Vec vals[NQ][2];
      step(e, c, vals);
      for (int q = 0; q < NQ; ++q) block[q].add_step(vals[q][0], vals[q][1]);
    });
    for (int q = 0; q < NQ; ++q) group[q].add(block[q]);
    if (++blocks == BLOCKS_PER_GROUP) {
      for (int q = 0; q < NQ; ++q) {
        total[q].add(group[q]);
        group[q] = Lanes();
      }
      blocks = 0;
    }
  }
  for (int q = 0; q < NQ; ++q) {
    total[q].add(group[q]);
    out[q] = total[q].total();
  }
}

// ---- forward: RMSNorm / LayerNorm, optionally on s = x + r ---------------------------------------------
// X: input and output dtype; R: residual; S: the sum's dtype, in which the norm rounds (S == X unfused).
template <typename X, typename R, typename S, Mode M, bool FUSED, bool BIAS>
void norm_fwd_rows(const NormFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = i * n;
    const void* src = a.x;
    if constexpr (FUSED) {
      for_steps(0, n, [&](int64_t j, auto c) {
        Vec x0, x1, r0, r1;
        load<X>(a.x, row + j, c, x0, x1);
        load<R>(a.r, row + j, c, r0, r1);
        store<S>(a.s, row + j, c, x0 + r0, x1 + r1);
      });
      src = a.s;
    }
    float m = 0.f, corr = 0.f, rs;
    if constexpr (M == Mode::layer) {
      // Σ (x − m) and Σ (x − m)² about a shift m, then var = mean((x − m)²) − mean(x − m)², the corrected two-pass
      // form. m is first the mean of the leading PIVOT elements (one pass less than the row's mean); where it lies
      // more than a quarter of a standard deviation from the row's mean (the squares would then carry over 6 % of
      // that offset), m is the row's mean instead, from one more pass. Rows far from zero (1e4 ± 1e-3) stay exact.
      auto sum_x = [&](int64_t e, auto c, Vec (&q)[1][2]) { load<S>(src, row + e, c, q[0][0], q[0][1]); };
      auto deviations = [&](float shift, float (&dev)[2]) {  // Σ (x − shift), Σ (x − shift)²
        const Vec vm(shift);
        row_sums<2>(n, [&](int64_t e, auto c, Vec (&q)[2][2]) {
          Vec d0, d1;
          load<S>(src, row + e, c, d0, d1);
          d0 = d0 - vm;
          d1 = d1 - vm;
          keep_first(c, d0, d1);
          q[0][0] = d0, q[0][1] = d1, q[1][0] = d0 * d0, q[1][1] = d1 * d1;
        }, dev);
      };
      const float nf = static_cast<float>(n);
      const int64_t lead = std::min(n, PIVOT);
      float sum[1], dev[2];
      row_sums<1>(lead, sum_x, sum);
      m = sum[0] / static_cast<float>(lead);
      deviations(m, dev);
      corr = dev[0] / nf;
      float var = dev[1] / nf - corr * corr;
      if (lead < n && !(corr * corr <= 0.0625f * var)) {
        row_sums<1>(n, sum_x, sum);
        m = sum[0] / nf;
        deviations(m, dev);
        corr = dev[0] / nf;
        var = dev[1] / nf - corr * corr;
      }
      rs = 1.f / std::sqrt(std::max(var, 0.f) + a.eps);
      // x − mean as (x − m_hi) − c_lo with m_hi = m + corr rounded and c_lo its rounding error (Fast2Sum): x minus
      // the row's mean to within fp32's rounding of it, whatever shift the sums took.
      const float m_hi = m + corr;
      corr = corr - (m_hi - m);
      m = m_hi;
      a.mean[i] = m_hi;
    } else {
      float ss[1];
      row_sums<1>(a.k, [&](int64_t e, auto c, Vec (&q)[1][2]) {
        Vec v0, v1;
        load<S>(src, row + e, c, v0, v1);
        q[0][0] = v0 * v0, q[0][1] = v1 * v1;
      }, ss);
      rs = 1.f / std::sqrt(ss[0] / static_cast<float>(a.k) + a.eps);
    }
    a.rstd[i] = rs;
    const Vec vm(m), vcorr(corr), vrs(rs);
    Vec vq = vrs, unused = vrs;
    if constexpr (M == Mode::rms_none) IO<S>::round(vq, unused);  // casting none: rstd rounded too
    // 16-bit inputs: the next row's inputs are fetched while this row is written (its statistics pass stalled on
    // them; fp32 rows, which the hardware prefetcher keeps up with, lost 5–20 % to the extra prefetches)
    const bool ahead = sizeof(X) == 2 && i + 1 < end;
    for_steps(0, n, [&](int64_t j, auto c) {
      if (ahead) {
        prefetch<X>(a.x, row + n + j, c);
        if constexpr (FUSED) prefetch<R>(a.r, row + n + j, c);
      }
      Vec v0, v1, w0, w1;
      load<S>(src, row + j, c, v0, v1);
      IO<float>::load(a.w + j, c, w0, w1);
      if constexpr (M == Mode::layer) {
        v0 = ((v0 - vm) - vcorr) * vrs * w0;
        v1 = ((v1 - vm) - vcorr) * vrs * w1;
        if constexpr (BIAS) {
          Vec b0, b1;
          IO<float>::load(a.b + j, c, b0, b1);
          v0 = v0 + b0;
          v1 = v1 + b1;
        }
      } else if constexpr (M == Mode::rms_fp32) {
        v0 = v0 * vrs * w0;
        v1 = v1 * vrs * w1;
      } else {  // llama / none: x·rstd rounded to the norm's dtype, then times the weight
        v0 = v0 * vq;
        v1 = v1 * vq;
        IO<S>::round(v0, v1);
        v0 = v0 * w0;
        v1 = v1 * w1;
      }
      if constexpr (!std::is_same_v<S, X>) IO<S>::round(v0, v1);  // the norm's dtype, then the output's
      if constexpr (M != Mode::layer && BIAS) {  // RMSNorm's y in the output's dtype, then + b, rounded once more
        Vec b0, b1;
        IO<float>::load(a.b + j, c, b0, b1);
        IO<X>::round(v0, v1);
        v0 = v0 + b0;
        v1 = v1 + b1;
      }
      if (a.stream) IO<X>::stream(static_cast<X*>(a.y) + row + j, c, v0, v1);
      else store<X>(a.y, row + j, c, v0, v1);
    });
  }
  if (a.stream) stream_fence();
}

// ---- backward -----------------------------------------------------------------------------------------
// x̂ = (x − mean − c)·rstd (RMSNorm: x·rstd), g = dy·w.
// LayerNorm: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)); RMSNorm: dx_j = rstd·g_j − [j < k]·rstd·x̂_j·Σ g·x̂ / k.
// Per row: LayerNorm dx = rs·((g − gx) + x̂·hx) with gx = mean(g), hx = −mean(g·x̂) (g − mean(g) first: exact where
// g is close to its mean); RMSNorm dx = rs·g + x̂·hx with hx = −rs·Σ g·x̂ / k in the projected columns.
struct BwdRow {
  float m, rs, corr, hx, gx;
};
// Rows up to this length take their weight-gradient partials in blocks of rows (norm_bwd_row_blocks).
constexpr int64_t SHORT_ROW = 256;

template <typename T, bool LAYER>
NORMLAB_INLINE BwdRow bwd_row(const NormBwdArgs& a, int64_t i) {
  const int64_t n = a.n, row = i * n;
  const float nf = static_cast<float>(n), rs = a.rstd[i];
  if constexpr (LAYER) {
    const float m = a.mean[i];
    const Vec vm(m);
    float sums[3];  // Σ g, Σ g·(x − m), Σ (x − m)
    row_sums<3>(n, [&](int64_t e, auto c, Vec (&q)[3][2]) {
      Vec d0, d1, x0, x1, w0, w1;
      load<T>(a.dy, row + e, c, d0, d1);
      load<T>(a.x, row + e, c, x0, x1);
      IO<float>::load(a.w + e, c, w0, w1);
      const Vec g0 = d0 * w0, g1 = d1 * w1;
      Vec e0 = x0 - vm, e1 = x1 - vm;
      keep_first(c, e0, e1);
      q[0][0] = g0, q[0][1] = g1, q[1][0] = g0 * e0, q[1][1] = g1 * e1, q[2][0] = e0, q[2][1] = e1;
    }, sums);
    const float corr = sums[2] / nf, mg = sums[0] / nf, mgx = rs * (sums[1] - corr * sums[0]) / nf;
    return {m, rs, corr, -mgx, mg};
  } else {
    float dot[1];  // Σ g·x
    row_sums<1>(n, [&](int64_t e, auto c, Vec (&q)[1][2]) {
      Vec d0, d1, x0, x1, w0, w1;
      load<T>(a.dy, row + e, c, d0, d1);
      load<T>(a.x, row + e, c, x0, x1);
      IO<float>::load(a.w + e, c, w0, w1);
      q[0][0] = (d0 * w0) * x0, q[0][1] = (d1 * w1) * x1;
    }, dot);
    return {0.f, rs, 0.f, -rs * (rs * dot[0] / static_cast<float>(a.k)), 0.f};
  }
}

// A row's constants, broadcast.
struct BwdConsts {
  Vec vm, vrs, vcorr, vhx, vgx;
  explicit BwdConsts(const BwdRow& r) : vm(r.m), vrs(r.rs), vcorr(r.corr), vhx(r.hx), vgx(r.gx) {}
};

// One step of a row's columns: dx written, and dy, x̂ returned for the weight-gradient partials.
template <typename T, bool LAYER, bool DSUM, typename C>
NORMLAB_INLINE void bwd_step(const NormBwdArgs& a, const BwdConsts& k, int64_t row, int64_t j, C c, const Vec& w0,
                             const Vec& w1, bool projected, Vec& d0, Vec& d1, Vec& h0, Vec& h1) {
  Vec x0, x1, v0, v1;
  load<T>(a.dy, row + j, c, d0, d1);
  load<T>(a.x, row + j, c, x0, x1);
  if constexpr (LAYER) {
    h0 = ((x0 - k.vm) - k.vcorr) * k.vrs;
    h1 = ((x1 - k.vm) - k.vcorr) * k.vrs;
    v0 = k.vrs * at::vec::fmadd(h0, k.vhx, d0 * w0 - k.vgx);
    v1 = k.vrs * at::vec::fmadd(h1, k.vhx, d1 * w1 - k.vgx);
  } else {
    h0 = x0 * k.vrs;
    h1 = x1 * k.vrs;
    v0 = k.vrs * (d0 * w0);
    v1 = k.vrs * (d1 * w1);
    if (projected) {
      v0 = at::vec::fmadd(h0, k.vhx, v0);
      v1 = at::vec::fmadd(h1, k.vhx, v1);
    }
  }
  if constexpr (DSUM) {
    Vec s0, s1;
    load<T>(a.dsum, row + j, c, s0, s1);
    v0 = v0 + s0;
    v1 = v1 + s1;
  }
  if (a.stream) IO<T>::stream(static_cast<T*>(a.dx) + row + j, c, v0, v1);
  else store<T>(a.dx, row + j, c, v0, v1);
}

// The partials take dy·x̂ (nothing where dy == 0) and dy.
NORMLAB_INLINE void add_partials(bool layer_bias, const Vec& d0, const Vec& d1, const Vec& h0, const Vec& h1,
                                 bool dw, Vec& p0, Vec& p1, Vec& b0, Vec& b1) {
  const Vec zero(0.f);
  if (dw) {
    p0 = Vec::blendv(at::vec::fmadd(d0, h0, p0), p0, d0 == zero);
    p1 = Vec::blendv(at::vec::fmadd(d1, h1, p1), p1, d1 == zero);
  }
  if (layer_bias) {
    b0 = b0 + d0;
    b1 = b1 + d1;
  }
}

// A row's column ranges: LayerNorm's one, RMSNorm's projected columns (j < k) and the rest.
template <bool LAYER, typename F>
NORMLAB_INLINE void column_ranges(const NormBwdArgs& a, F&& columns) {
  if constexpr (LAYER) {
    columns(0, a.n, false);
  } else {
    columns(0, a.k, true);
    columns(a.k, a.n, false);
  }
}

// Row by row: the partials loaded and stored at every step.
template <typename T, bool LAYER, bool DSUM>
void norm_bwd_each_row(const NormBwdArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = i * n;
    const BwdConsts k(bwd_row<T, LAYER>(a, i));
    const bool ahead = sizeof(T) == 2 && i + 1 < end;  // as in the forward: 16-bit inputs only
    auto columns = [&](int64_t lo, int64_t hi, bool projected) {
      for_steps(lo, hi, [&](int64_t j, auto c) {
        if (ahead) {
          prefetch<T>(a.dy, row + n + j, c);
          prefetch<T>(a.x, row + n + j, c);
        }
        Vec w0, w1, d0, d1, h0, h1, p0, p1, b0, b1;
        IO<float>::load(a.w + j, c, w0, w1);
        bwd_step<T, LAYER, DSUM>(a, k, row, j, c, w0, w1, projected, d0, d1, h0, h1);
        if (a.pw) IO<float>::load(a.pw + j, c, p0, p1);
        if (a.pb) IO<float>::load(a.pb + j, c, b0, b1);
        add_partials(a.pb, d0, d1, h0, h1, a.pw != nullptr, p0, p1, b0, b1);
        if (a.pw) IO<float>::store(a.pw + j, c, p0, p1);
        if (a.pb) IO<float>::store(a.pb + j, c, b0, b1);
      });
    };
    column_ranges<LAYER>(a, columns);
  }
}

// Short rows in blocks: the rows' constants first, then the columns outside and the block's rows inside, so that a
// column step's partials stay in registers across the block (stored and reloaded row after row, a short row's
// partials stall on the store just made). Each partial still takes the rows' terms in row order: the same bits as
// row by row.
template <typename T, bool LAYER, bool DSUM>
void norm_bwd_row_blocks(const NormBwdArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t MAX_BLOCK = 64;
  const int64_t n = a.n, block = std::clamp<int64_t>(8192 / n, 1, MAX_BLOCK);
  BwdRow rows[MAX_BLOCK];
  for (int64_t i0 = begin; i0 < end; i0 += block) {
    const int64_t i1 = std::min(end, i0 + block);
    for (int64_t i = i0; i < i1; ++i) rows[i - i0] = bwd_row<T, LAYER>(a, i);
    auto columns = [&](int64_t lo, int64_t hi, bool projected) {
      for_steps(lo, hi, [&](int64_t j, auto c) {
        Vec w0, w1, p0, p1, b0, b1;
        IO<float>::load(a.w + j, c, w0, w1);
        if (a.pw) IO<float>::load(a.pw + j, c, p0, p1);
        if (a.pb) IO<float>::load(a.pb + j, c, b0, b1);
        for (int64_t i = i0; i < i1; ++i) {
          Vec d0, d1, h0, h1;
          bwd_step<T, LAYER, DSUM>(a, BwdConsts(rows[i - i0]), i * n, j, c, w0, w1, projected, d0, d1, h0, h1);
          add_partials(a.pb, d0, d1, h0, h1, a.pw != nullptr, p0, p1, b0, b1);
        }
        if (a.pw) IO<float>::store(a.pw + j, c, p0, p1);
        if (a.pb) IO<float>::store(a.pb + j, c, b0, b1);
      });
    };
    column_ranges<LAYER>(a, columns);
  }
}

template <typename T, bool LAYER, bool DSUM>
void norm_bwd_rows(const NormBwdArgs& a, int64_t begin, int64_t end) {
  if ((a.pw || a.pb) && a.n <= SHORT_ROW) norm_bwd_row_blocks<T, LAYER, DSUM>(a, begin, end);
  else norm_bwd_each_row<T, LAYER, DSUM>(a, begin, end);
  if (a.stream) stream_fence();
}

// ---- DyT: y = w·tanh(αx) + b ----------------------------------------------------------------------------
template <typename T, bool W, bool B>
void dyt_fwd_rows(const DytFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const Vec va(a.alpha);
  for (int64_t i = begin; i < end; ++i) {
    for_steps(0, n, [&](int64_t j, auto c) {
      Vec v0, v1;
      load<T>(a.x, i * n + j, c, v0, v1);
      v0 = (va * v0).tanh();
      v1 = (va * v1).tanh();
      if (a.tanh) IO<float>::store(a.tanh + i * n + j, c, v0, v1);
      if constexpr (W) {
        Vec w0, w1;
        IO<float>::load(a.w + j, c, w0, w1);
        v0 = v0 * w0;
        v1 = v1 * w1;
      }
      if constexpr (B) {
        Vec b0, b1;
        IO<float>::load(a.b + j, c, b0, b1);
        v0 = v0 + b0;
        v1 = v1 + b1;
      }
      store<T>(a.y, i * n + j, c, v0, v1);
    });
  }
}

// t = tanh(αx) (the forward's, or computed again), g = dy·w: dx = g·(1 − t²)·α; partials of Σ g·(1 − t²)·x, Σ_rows dy·t, Σ_rows dy.
template <typename T, bool W>
void dyt_bwd_rows(const DytBwdArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const Vec va(a.alpha), one(1.f);
  float alpha_sum = *a.palpha;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = i * n;
    float dalpha[1];
    row_sums<1>(n, [&](int64_t e, auto c, Vec (&q)[1][2]) {
      Vec d[2], x[2];
      load<T>(a.dy, row + e, c, d[0], d[1]);
      load<T>(a.x, row + e, c, x[0], x[1]);
      Vec w[2] = {one, one}, t[2];
      if constexpr (W) IO<float>::load(a.w + e, c, w[0], w[1]);
      if (a.tanh) IO<float>::load(a.tanh + row + e, c, t[0], t[1]);
      else t[0] = (va * x[0]).tanh(), t[1] = (va * x[1]).tanh();
      Vec dx[2];
      for (int h = 0; h < 2; ++h) {
        const Vec g = W ? d[h] * w[h] : d[h];
        const Vec dt = g * (one - t[h] * t[h]);
        dx[h] = dt * va;
        q[0][h] = unless_zero(d[h], dt * x[h]);
        x[h] = unless_zero(d[h], d[h] * t[h]);  // reused: this element's dw term
      }
      store<T>(a.dx, row + e, c, dx[0], dx[1]);
      Vec p0, p1;
      if (a.pw) {
        IO<float>::load(a.pw + e, c, p0, p1);
        IO<float>::store(a.pw + e, c, p0 + x[0], p1 + x[1]);
      }
      if (a.pb) {
        IO<float>::load(a.pb + e, c, p0, p1);
        IO<float>::store(a.pb + e, c, p0 + d[0], p1 + d[1]);
      }
    }, dalpha);
    alpha_sum = alpha_sum + dalpha[0];
  }
  *a.palpha = alpha_sum;
}

// ---- the table: one instance per dtype combination and mode ---------------------------------------------
template <typename F>
inline void with_dtype(Dtype t, F&& f) {
  switch (t) {
    case Dtype::f32: return f(float{});
    case Dtype::bf16: return f(c10::BFloat16{});
    case Dtype::f16: return f(c10::Half{});
  }
}

// RMSNorm with a bias: unfused calls only (the op layer passes none to the fused ones).
template <typename X, typename R, typename S, Mode M, bool FUSED>
inline void rms_fwd_rows(const NormFwdArgs& a, int64_t begin, int64_t end) {
  if constexpr (!FUSED) {
    if (a.b) return norm_fwd_rows<X, R, S, M, FUSED, true>(a, begin, end);
  }
  norm_fwd_rows<X, R, S, M, FUSED, false>(a, begin, end);
}

template <typename X, typename R, typename S, bool FUSED>
inline void norm_fwd_mode(const NormFwdArgs& a, int64_t begin, int64_t end) {
  switch (a.mode) {
    case Mode::layer:
      return a.b ? norm_fwd_rows<X, R, S, Mode::layer, FUSED, true>(a, begin, end)
                 : norm_fwd_rows<X, R, S, Mode::layer, FUSED, false>(a, begin, end);
    case Mode::rms_fp32: return rms_fwd_rows<X, R, S, Mode::rms_fp32, FUSED>(a, begin, end);
    case Mode::rms_llama:
      if constexpr (!std::is_same_v<S, float>) return rms_fwd_rows<X, R, S, Mode::rms_llama, FUSED>(a, begin, end);
      break;
    case Mode::rms_none:
      if constexpr (!std::is_same_v<S, float>) return rms_fwd_rows<X, R, S, Mode::rms_none, FUSED>(a, begin, end);
      break;
  }
  // fp32 sums: the rounding modes coincide (the op layer passes rms_fp32)
  rms_fwd_rows<X, R, S, Mode::rms_fp32, FUSED>(a, begin, end);
}

inline void norm_fwd(const NormFwdArgs& a, int64_t begin, int64_t end) {
  with_dtype(a.x_t, [&](auto xv) {
    using X = decltype(xv);
    if (!a.r) return norm_fwd_mode<X, X, X, false>(a, begin, end);
    with_dtype(a.s_t, [&](auto sv) {
      using S = decltype(sv);
      // the residual is in the input's dtype or the sum's (the op layer refuses other mixes)
      if (a.r_t == a.x_t) norm_fwd_mode<X, X, S, true>(a, begin, end);
      else norm_fwd_mode<X, S, S, true>(a, begin, end);
    });
  });
}

inline void norm_bwd(const NormBwdArgs& a, int64_t begin, int64_t end) {
  with_dtype(a.t, [&](auto tv) {
    using T = decltype(tv);
    if (a.layer) a.dsum ? norm_bwd_rows<T, true, true>(a, begin, end) : norm_bwd_rows<T, true, false>(a, begin, end);
    else a.dsum ? norm_bwd_rows<T, false, true>(a, begin, end) : norm_bwd_rows<T, false, false>(a, begin, end);
  });
}

inline void dyt_fwd(const DytFwdArgs& a, int64_t begin, int64_t end) {
  with_dtype(a.t, [&](auto tv) {
    using T = decltype(tv);
    if (a.w) a.b ? dyt_fwd_rows<T, true, true>(a, begin, end) : dyt_fwd_rows<T, true, false>(a, begin, end);
    else a.b ? dyt_fwd_rows<T, false, true>(a, begin, end) : dyt_fwd_rows<T, false, false>(a, begin, end);
  });
}

inline void dyt_bwd(const DytBwdArgs& a, int64_t begin, int64_t end) {
  with_dtype(a.t, [&](auto tv) {
    using T = decltype(tv);
    a.w ? dyt_bwd_rows<T, true>(a, begin, end) : dyt_bwd_rows<T, false>(a, begin, end);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace normlab::cpu
