"""The two numba kernels behind every CPU op: one forward, one backward, generic over the norm.

Runtime flags select the norm (``layer``: LayerNorm, else RMSNorm), the fused residual add and the
casting mode, so each kernel compiles once per array-type combination (fp32 arrays, or uint16 bit
patterns of bf16/fp16) — a handful of signatures in all, cached on disk (``cache=True``).

Rows are processed in fixed chunks of :data:`CHUNK` rows, in parallel over chunks. A row's result
depends on that row alone (batch invariance). Weight/bias gradients are accumulated per chunk in fp32,
then summed over chunks in chunk order: bitwise the same for any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels.cpu._numerics import (
    load_row,
    out_row,
    round_row,
    round_scalar,
    row_grad_sums,
    row_sqdev,
    row_sum,
    row_sumsq,
    store_row,
)

#: Rows per work item and per weight-gradient partial (a constant: never depends on the thread count).
CHUNK = 64
#: RMSNorm casting modes as the kernel sees them (the weight passed in is already ``offset + w`` in the
#: dtype the mode prescribes, as fp32 values).
MODE_FP32, MODE_LLAMA, MODE_NONE = 0, 1, 2
_COLS = 512  # columns per work item of the chunk-partial reduction

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


@njit(parallel=True, cache=True)
def norm_fwd(x, xkind, r, rkind, s, skind, fused, y, w, b, eps, k, layer, mode, mean, rstd):
    """Forward of RMSNorm / LayerNorm, optionally on ``s = x + r`` (stored in ``s``).

    ``w`` (and ``b`` for LayerNorm) are fp32 rows; ``s``'s dtype (``skind``) is the norm's input dtype,
    ``y`` has ``x``'s dtype. RMSNorm: ``y = x·rstd·w`` with ``rstd = 1/sqrt(Σ_{j<k} x_j²/k + eps)`` and the
    casting ``mode``'s intermediate roundings; LayerNorm: ``y = (x − mean)·rstd·w + b`` (two-pass variance).
    """
    rows, n = x.shape
    eps32 = np.float32(eps)
    kf, nf = np.float32(k), np.float32(n)
    for c in prange((rows + CHUNK - 1) // CHUNK):
        xbuf = np.empty(n, np.float32)
        rbuf = np.empty(n, np.float32)
        sbuf = np.empty(n, np.float32)
        ybuf = np.empty(n, np.float32)
        for i in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
            xr = load_row(x, i, xkind, xbuf)
            if fused:
                rr = load_row(r, i, rkind, rbuf)
                sr = out_row(s, i, sbuf)
                for j in range(n):
                    sr[j] = xr[j] + rr[j]
                round_row(sr, skind)
                store_row(s, i, sr, skind)
                xr = sr
            yr = out_row(y, i, ybuf)
            if layer:
                m = row_sum(xr) / nf
                rs = _ONE / np.sqrt(row_sqdev(xr, m) / nf + eps32)
                for j in range(n):
                    yr[j] = (xr[j] - m) * rs * w[j] + b[j]
                mean[i] = m
            else:
                rs = _ONE / np.sqrt(row_sumsq(xr, k) / kf + eps32)
                if mode == MODE_FP32:
                    for j in range(n):
                        yr[j] = xr[j] * rs * w[j]
                else:
                    rq = rs if mode == MODE_LLAMA else round_scalar(rs, skind)
                    for j in range(n):
                        yr[j] = xr[j] * rq
                    round_row(yr, skind)
                    for j in range(n):
                        yr[j] = yr[j] * w[j]
            rstd[i] = rs
            if skind != xkind:  # the norm's result is in s's dtype, then cast to x's
                round_row(yr, skind)
            store_row(y, i, yr, xkind)


@njit(parallel=True, cache=True)
def norm_bwd(dy, x, kind, w, mean, rstd, k, layer, dsum, has_dsum, dx, dw_part, db_part, want_dw, want_db, dw, db):
    """Backward of RMSNorm / LayerNorm given the saved per-row ``mean``/``rstd``.

    ``x̂ = (x − mean)·rstd`` (RMSNorm: ``x·rstd``), ``g = dy·w``:
    RMSNorm ``dx_j = rstd·g_j − [j<k]·rstd·x̂_j·Σ_i g_i x̂_i / k``;
    LayerNorm ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``; ``+ dsum`` (fused add).
    ``dw = Σ_rows dy·x̂`` (0 where dy == 0), ``db = Σ_rows dy``: fp32 partials per chunk of rows
    (``dw_part``/``db_part``), then summed over chunks in chunk order.
    """
    rows, n = x.shape
    kf, nf = np.float32(k), np.float32(n)
    nchunks = (rows + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        xbuf = np.empty(n, np.float32)
        dybuf = np.empty(n, np.float32)
        dsbuf = np.empty(n, np.float32)
        dxbuf = np.empty(n, np.float32)
        pw = dw_part[c]
        pb = db_part[c]
        for i in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
            xr = load_row(x, i, kind, xbuf)
            dyr = load_row(dy, i, kind, dybuf)
            rs = rstd[i]
            m = mean[i] if layer else _ZERO  # x − 0 is x exactly: one x̂ formula for both norms
            sum_g, sum_gx = row_grad_sums(dyr, w, xr, m, rs)
            dxr = out_row(dx, i, dxbuf)
            if layer:
                mg, mgx = sum_g / nf, sum_gx / nf
                for j in range(n):
                    dxr[j] = rs * (dyr[j] * w[j] - mg - (xr[j] - m) * rs * mgx)
            else:
                proj = sum_gx / kf
                for j in range(k):
                    dxr[j] = rs * (dyr[j] * w[j]) - rs * (xr[j] * rs) * proj
                for j in range(k, n):
                    dxr[j] = rs * (dyr[j] * w[j])
            if has_dsum:
                dsr = load_row(dsum, i, kind, dsbuf)
                for j in range(n):
                    dxr[j] = dxr[j] + dsr[j]
            store_row(dx, i, dxr, kind)
            if want_dw:
                for j in range(n):
                    d = dyr[j]
                    pw[j] += d * ((xr[j] - m) * rs) if d != _ZERO else _ZERO
            if want_db:
                for j in range(n):
                    pb[j] += dyr[j]
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
