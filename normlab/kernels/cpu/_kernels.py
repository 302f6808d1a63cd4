"""The two numba kernels behind every CPU op: one forward, one backward, generic over the norm.

Runtime flags select the norm (``layer``: LayerNorm, else RMSNorm), the fused residual add and the
casting mode; the I/O dtypes come from the array types (float32, bf16 as uint16, fp16 as int16), so each
kernel compiles once per dtype combination — a handful of signatures in all, cached on disk.

Each row takes two passes over its data: one reduction (statistics), one fused elementwise pass that
reads, normalizes, rounds and writes; the row stays in cache between them, so x is read once from memory.
Rows are processed in fixed chunks of :data:`CHUNK` rows, in parallel over chunks. A row's result
depends on that row alone (batch invariance). Weight/bias gradients are accumulated per chunk in fp32,
then summed over chunks in chunk order: bitwise the same for any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels.cpu._numerics import (
    load,
    rnd,
    row_dev_sums,
    row_grad_sums,
    row_sum,
    row_sumsq,
    store,
    store_via,
)

#: Rows per work item and per weight-gradient partial (a constant: never depends on the thread count).
CHUNK = 64
#: RMSNorm casting modes as the kernel sees them (the weight passed in is already ``offset + w`` in the
#: dtype the mode prescribes, as fp32 values).
MODE_FP32, MODE_LLAMA, MODE_NONE = 0, 1, 2
_COLS = 512  # columns per work item of the chunk-partial reduction

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


@njit(cache=True)
def _norm_row(a, i, y, w, b, eps, k, layer, mode, mean, rstd):
    """Normalize row ``i`` of ``a`` into row ``i`` of ``y``; the norm's dtype is ``a``'s (its
    intermediate roundings), then the result is stored in ``y``'s dtype."""
    n = a.shape[1]
    if layer:  # corrected two-pass: deviations from the rounded mean m, minus their mean c
        nf = np.float32(n)
        m = row_sum(a, i) / nf
        sd, sd2 = row_dev_sums(a, i, m)
        c = sd / nf
        rs = _ONE / np.sqrt(max(sd2 / nf - c * c, _ZERO) + eps)
        for j in range(n):
            y[i, j] = store_via(((load(a[i, j]) - m) - c) * rs * w[j] + b[j], a, y)
        mean[i] = m + c
    else:
        rs = _ONE / np.sqrt(row_sumsq(a, i, k) / np.float32(k) + eps)
        if mode == MODE_FP32:
            for j in range(n):
                y[i, j] = store_via(load(a[i, j]) * rs * w[j], a, y)
        elif mode == MODE_LLAMA:  # x·rstd rounded to the input dtype, then times the weight
            for j in range(n):
                y[i, j] = store_via(rnd(load(a[i, j]) * rs, a) * w[j], a, y)
        else:  # none: rstd rounded, x·rstd rounded, times the weight
            rq = rnd(rs, a)
            for j in range(n):
                y[i, j] = store_via(rnd(load(a[i, j]) * rq, a) * w[j], a, y)
    rstd[i] = rs


@njit(parallel=True, cache=True)
def norm_fwd(x, r, s, fused, y, w, b, eps, k, layer, mode, mean, rstd):
    """Forward of RMSNorm / LayerNorm, optionally on ``s = x + r`` (fp32 add, stored in ``s``'s dtype).

    ``w`` (and ``b`` for LayerNorm) are fp32 rows. RMSNorm: ``y = x·rstd·w`` with
    ``rstd = 1/sqrt(Σ_{j<k} x_j²/k + eps)`` and the casting ``mode``'s intermediate roundings;
    LayerNorm: ``y = (x − mean)·rstd·w + b`` with the corrected two-pass biased variance (deviations from
    the rounded mean, minus their own mean: accurate to the spread of the row, not to ulp(mean)).
    """
    rows, n = x.shape
    eps32 = np.float32(eps)
    for c in prange((rows + CHUNK - 1) // CHUNK):
        for i in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
            if fused:
                for j in range(n):
                    s[i, j] = store(load(x[i, j]) + load(r[i, j]), s)
                _norm_row(s, i, y, w, b, eps32, k, layer, mode, mean, rstd)
            else:
                _norm_row(x, i, y, w, b, eps32, k, layer, mode, mean, rstd)


@njit(parallel=True, cache=True)
def norm_bwd(dy, x, w, mean, rstd, k, layer, dsum, has_dsum, dx, dw_part, db_part, want_dw, want_db, dw, db):
    """Backward of RMSNorm / LayerNorm given the saved per-row ``mean``/``rstd``.

    ``x̂ = (x − mean)·rstd`` (RMSNorm: ``x·rstd``), ``g = dy·w``:
    RMSNorm ``dx_j = rstd·g_j − [j<k]·rstd·x̂_j·Σ_i g_i x̂_i / k``;
    LayerNorm ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``; ``+ dsum`` (fused add).
    ``dw = Σ_rows dy·x̂`` (0 where dy == 0), ``db = Σ_rows dy``: fp32 partials per chunk of rows
    (``dw_part`` always ``(chunks, n)``, ``db_part`` too for LayerNorm; accumulated in the same pass as
    dx), then summed over chunks in chunk order into ``dw``/``db`` when wanted.
    """
    rows, n = x.shape
    kf, nf = np.float32(k), np.float32(n)
    nchunks = (rows + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        pw = dw_part[c]
        pb = db_part[c]
        for i in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
            rs = rstd[i]
            m = mean[i] if layer else _ZERO  # x − 0 is x exactly: one x̂ formula for both norms
            sum_g, sum_gd, sum_d = row_grad_sums(dy, w, x, i, m)
            if layer:  # x̂ = ((x − mean) − c)·rstd with c the mean of the deviations, as in the forward
                c = sum_d / nf
                mg, mgx = sum_g / nf, rs * (sum_gd - c * sum_g) / nf
                for j in range(n):
                    d = load(dy[i, j])
                    xh = ((load(x[i, j]) - m) - c) * rs
                    v = rs * (d * w[j] - mg - xh * mgx)
                    dx[i, j] = store(v + load(dsum[i, j]) if has_dsum else v, dx)
                    pw[j] += d * xh if d != _ZERO else _ZERO
                    pb[j] += d
            else:
                proj = rs * sum_gd / kf
                for j in range(k):
                    d = load(dy[i, j])
                    xh = load(x[i, j]) * rs
                    v = rs * (d * w[j]) - rs * xh * proj
                    dx[i, j] = store(v + load(dsum[i, j]) if has_dsum else v, dx)
                    pw[j] += d * xh if d != _ZERO else _ZERO
                for j in range(k, n):
                    d = load(dy[i, j])
                    v = rs * (d * w[j])
                    dx[i, j] = store(v + load(dsum[i, j]) if has_dsum else v, dx)
                    pw[j] += d * (load(x[i, j]) * rs) if d != _ZERO else _ZERO
    if want_dw or want_db:
        for cb in prange((n + _COLS - 1) // _COLS):
            lo, hi = cb * _COLS, min(n, (cb + 1) * _COLS)
            for c in range(nchunks):
                if want_dw:
                    for j in range(lo, hi):
                        dw[j] += dw_part[c, j]
                if want_db:
                    for j in range(lo, hi):
                        db[j] += db_part[c, j]
