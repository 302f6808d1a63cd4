// Gated RMSNorm kernels (Mamba-2's RMSNormGated), built per ISA with kernels.h and its conventions: rows of n
// elements split into groups of `group`, each group's RMS a fixed-lane row sum, the same IEEE operations per
// element on every ISA.
#pragma once

#include "kernels.h"

namespace normlab::cpu {
inline namespace CPU_CAPABILITY {

// silu(z) = z / (1 + exp(−z)), written as torch's vectorized silu; `e` receives exp(−z).
inline Vec silu(const Vec& z, Vec& e) {
  e = z.neg().exp();
  return z / (Vec(1.f) + e);
}

// ---- forward -------------------------------------------------------------------------------------------------
// h = x·silu(z) (gate first) or x; y = h·rstd·w, llama rounding h·rstd to T before the weight; a gate after the
// norm multiplies that in fp32. Scalar math per element, gate first: y = round(round(x·s·r)·w) (llama) or x·s·r·w.
template <typename T, bool GATE, bool BEFORE, bool LLAMA>
void gated_fwd_rows(const GatedFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n, g = a.group, groups = n / g;
  const float gf = static_cast<float>(g);
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t base = i * n + grp * g;
      const float* w = a.w + grp * g;
      float ss[1];
      row_sums<1>(g, [&](int64_t e, auto c, Vec (&q)[1][2]) {
        Vec h0, h1;
        load<T>(a.x, base + e, c, h0, h1);
        if constexpr (GATE && !BEFORE) {
          Vec z0, z1, e0, e1;
          load<T>(a.z, base + e, c, z0, z1);
          h0 = h0 * silu(z0, e0);
          h1 = h1 * silu(z1, e1);
        }
        q[0][0] = h0 * h0, q[0][1] = h1 * h1;
      }, ss);
      const float rs = 1.f / std::sqrt(ss[0] / gf + a.eps);
      a.rstd[i * groups + grp] = rs;
      const Vec vrs(rs);
      for_steps(0, g, [&](int64_t j, auto c) {
        Vec v0, v1, w0, w1, s0, s1;
        load<T>(a.x, base + j, c, v0, v1);
        if constexpr (GATE) {
          Vec z0, z1, e0, e1;
          load<T>(a.z, base + j, c, z0, z1);
          s0 = silu(z0, e0);
          s1 = silu(z1, e1);
          if constexpr (!BEFORE) {
            v0 = v0 * s0;
            v1 = v1 * s1;
          }
        }
        IO<float>::load(w + j, c, w0, w1);
        v0 = v0 * vrs;
        v1 = v1 * vrs;
        if constexpr (LLAMA) IO<T>::round(v0, v1);
        v0 = v0 * w0;
        v1 = v1 * w1;
        if constexpr (GATE && BEFORE) {
          if constexpr (LLAMA) IO<T>::round(v0, v1);
          v0 = v0 * s0;
          v1 = v1 * s1;
        }
        store<T>(a.y, base + j, c, v0, v1);
      });
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------------------
// Per group, with s = silu(z), s' = σ(z)·(1 + z·(1 − σ(z))), h = x·s (gate first) or x, x̂ = h·rstd, u = dy·s (gate
// after) or dy, g = u·w: dh = rstd·g − rstd·x̂·proj with proj = rstd·Σ g·h / group. Gate first: dx = dh·s,
// dz = dh·x·s'; gate after: dx = dh, dz = dy·(x̂·w)·s'. The weight-gradient term is u·x̂ (0 where dy == 0).
template <typename T, bool GATE, bool BEFORE>
void gated_bwd_rows(const GatedBwdArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n, g = a.group, groups = n / g;
  const float gf = static_cast<float>(g);
  const Vec one(1.f);
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t base = i * n + grp * g;
      const float* w = a.w + grp * g;
      float* pw = a.pw + grp * g;
      const float rs = a.rstd[i * groups + grp];
      const Vec vrs(rs);
      // the terms of elements e .. e + c: dy, x, z, silu(z), σ(z), h, g = u·w and w
      struct Terms {
        Vec d[2], x[2], z[2], s[2], sig[2], h[2], g[2], w[2];
      };
      auto load_terms = [&](int64_t e, auto c, Terms& t) {
        load<T>(a.dy, base + e, c, t.d[0], t.d[1]);
        load<T>(a.x, base + e, c, t.x[0], t.x[1]);
        IO<float>::load(w + e, c, t.w[0], t.w[1]);
        if constexpr (GATE) load<T>(a.z, base + e, c, t.z[0], t.z[1]);
        for (int k = 0; k < 2; ++k) {
          t.h[k] = t.x[k];
          Vec u = t.d[k];
          if constexpr (GATE) {
            Vec ex;
            t.s[k] = silu(t.z[k], ex);
            t.sig[k] = one / (one + ex);
            if constexpr (BEFORE) u = u * t.s[k];
            else t.h[k] = t.h[k] * t.s[k];
          }
          t.g[k] = u * t.w[k];
        }
      };
      float dot[1];
      row_sums<1>(g, [&](int64_t e, auto c, Vec (&q)[1][2]) {
        Terms t;
        load_terms(e, c, t);
        q[0][0] = t.g[0] * t.h[0], q[0][1] = t.g[1] * t.h[1];
      }, dot);
      const Vec vproj(rs * dot[0] / gf);
      for_steps(0, g, [&](int64_t j, auto c) {
        Terms t;
        load_terms(j, c, t);
        Vec dx[2], dz[2], term[2];
        for (int k = 0; k < 2; ++k) {
          const Vec xh = t.h[k] * vrs;
          const Vec dh = vrs * t.g[k] - vrs * xh * vproj;
          Vec u = t.d[k];
          dx[k] = dh;
          if constexpr (GATE) {
            const Vec slope = t.sig[k] * (one + t.z[k] * (one - t.sig[k]));
            if constexpr (BEFORE) {
              u = u * t.s[k];
              dz[k] = t.d[k] * (xh * t.w[k]) * slope;
            } else {
              dx[k] = dh * t.s[k];
              dz[k] = dh * t.x[k] * slope;
            }
          }
          term[k] = unless_zero(t.d[k], u * xh);
        }
        store<T>(a.dx, base + j, c, dx[0], dx[1]);
        if constexpr (GATE) store<T>(a.dz, base + j, c, dz[0], dz[1]);
        Vec p0, p1;
        IO<float>::load(pw + j, c, p0, p1);
        IO<float>::store(pw + j, c, p0 + term[0], p1 + term[1]);
      });
    }
  }
}

template <bool GATE, bool BEFORE, bool LLAMA>
inline void gated_fwd_typed(const GatedFwdArgs& a, int64_t begin, int64_t end) {
  with_dtype(a.t, [&](auto tv) { gated_fwd_rows<decltype(tv), GATE, BEFORE, LLAMA>(a, begin, end); });
}

template <bool GATE, bool BEFORE>
inline void gated_fwd_cast(const GatedFwdArgs& a, int64_t begin, int64_t end) {
  a.llama ? gated_fwd_typed<GATE, BEFORE, true>(a, begin, end) : gated_fwd_typed<GATE, BEFORE, false>(a, begin, end);
}

inline void gated_fwd(const GatedFwdArgs& a, int64_t begin, int64_t end) {
  if (!a.z) gated_fwd_cast<false, false>(a, begin, end);
  else if (a.before) gated_fwd_cast<true, true>(a, begin, end);
  else gated_fwd_cast<true, false>(a, begin, end);
}

inline void gated_bwd(const GatedBwdArgs& a, int64_t begin, int64_t end) {
  with_dtype(a.t, [&](auto tv) {
    using T = decltype(tv);
    if (!a.z) gated_bwd_rows<T, false, false>(a, begin, end);
    else if (a.before) gated_bwd_rows<T, true, true>(a, begin, end);
    else gated_bwd_rows<T, true, false>(a, begin, end);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace normlab::cpu
