"""The numba kernels behind every CPU op: one forward, one backward, generic over the norm.

Flags select the norm (``layer``: LayerNorm, else RMSNorm), the fused residual add and the casting mode;
each flag combination is its own compiled kernel (the flags are constants of its loops, so the inner
loops carry no branches), built on first use and cached on disk, and the I/O dtypes come from the array
types (float32, bf16 as uint16, fp16 as int16).

Each row takes two passes over its data: one reduction (statistics), one fused elementwise pass that
reads, normalizes, rounds and writes; the row stays in cache between them, so x is read once from memory.
bf16 → bf16 rows round through ``vcvtneps2bf16`` where the CPU has it (``_numerics.hardware_block``: a
block that meets a NaN or a subnormal is formed again with the exact integer rounding).
Large fp32 calls form the written rows in blocks of :data:`BLOCK` columns in a per-thread buffer and
write them with non-temporal stores (no read-for-ownership of the output, no eviction of the input):
the values are the same either way. Rows are processed in fixed chunks of :data:`CHUNK` rows, in
parallel over chunks. A row's result depends on that row alone (batch invariance). Weight/bias
gradients are accumulated per chunk in fp32 (one partial slot per thread), and each chunk's partial is
added into the result in chunk order as soon as every earlier chunk's is (the threads take chunks in
increasing order from an atomic counter and wait for their turn): bitwise the same for any thread count,
with no more memory than torch's per-thread buffers.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from numba import njit, prange

from normlab.kernels.cpu import _numerics
from normlab.kernels.cpu._numerics import (
    BLOCK_LN,
    BLOCK_RMS,
    BLOCK_RMS_ROUNDED,
    HARDWARE_BF16,
    LINE,
    aligned_from,
    fetch_add,
    hardware_add,
    hardware_block,
    load,
    proven_normal,
    publish,
    rnd,
    row_dev_sums,
    row_grad_dot,
    row_grad_sums,
    row_sum,
    row_sumsq_min,
    store,
    store_fence,
    store_via,
    stream_cols,
    wait_until,
    weight_bounds,
)

#: Rows per work item and per weight-gradient partial (a constant: never depends on the thread count).
CHUNK = 64
#: RMSNorm casting modes as the kernel sees them (the weight passed in is already ``offset + w`` in the
#: dtype the mode prescribes, as fp32 values).
MODE_FP32, MODE_LLAMA, MODE_NONE = 0, 1, 2
#: Columns per non-temporal block (a whole number of 64-byte lines in every dtype).
BLOCK = 512

_U = np.uint64
#: Part of every parallel kernel's cache key (a closure value): numba's disk cache notices edits of the
#: file a function is defined in, not of the helpers it compiles in from ``_numerics.py`` (nor whether
#: the hardware bf16 rounding is compiled in).
_HELPERS_SOURCE = hashlib.sha256(Path(_numerics.__file__).read_bytes()).hexdigest()[:16] + str(HARDWARE_BF16)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


@njit(cache=True, inline="always")
def _row_stats(a, ai, eps, k, layer):
    """``(m, c, rstd, least)`` of row ``ai``. LayerNorm: the corrected two-pass — the rounded mean m, the
    mean c of the deviations from it, and rstd from ``Σ (x − m − c)² = Σ (x − m)² − n·c²``; RMSNorm:
    ``m = c = 0`` and ``rstd = 1/sqrt(Σ_{j<k} x_j²/k + eps)``, with the row's smallest bf16 magnitude
    from the same pass (``least``, for :func:`proven_normal`; 0xFFFF for LayerNorm)."""
    if layer:
        nf = np.float32(a.shape[1])
        m = row_sum(a, ai) / nf
        sd, sd2 = row_dev_sums(a, ai, m)
        c = sd / nf
        return m, c, _ONE / np.sqrt(max(sd2 / nf - c * c, _ZERO) + eps), np.int64(0xFFFF)
    ss, least = row_sumsq_min(a, ai, k)
    return _ZERO, _ZERO, _ONE / np.sqrt(ss / np.float32(k) + eps), least


@njit(cache=True, inline="always")
def _norm_cols(a, ai, y, yi, lo, hi, off, w, wb, b, m, c, rs, layer, mode, checked):
    """Columns ``lo:hi`` of row ``ai`` of ``a``, normalized, into ``y[yi, lo − off : hi − off]``; the
    norm's dtype is ``a``'s (its intermediate roundings), then the result is stored in ``y``'s dtype.
    ``rs``: rstd as the mode multiplies it (casting none: rounded). ``wb``: the weights as the bf16 blocks
    read them (``w`` itself, or the bf16 bit patterns of the same values). ``checked``: see
    :func:`hardware_block`.
    (Unsigned column indices: numba then emits no negative-index wraparound, and the loops vectorize.)"""
    # bf16 → bf16: whole 16-value blocks through the hardware rounding first, the rest exactly
    if layer:
        lo = hardware_block(BLOCK_LN, checked, a, ai, lo, hi, y, yi, off, wb, b, m, c, rs)
    elif mode == MODE_FP32:
        lo = hardware_block(BLOCK_RMS, checked, a, ai, lo, hi, y, yi, off, wb, b, m, c, rs)
    else:
        lo = hardware_block(BLOCK_RMS_ROUNDED, checked, a, ai, lo, hi, y, yi, off, wb, b, m, c, rs)
    lo, hi, off = _U(lo), _U(hi), _U(off)
    if layer:
        for j in range(lo, hi):
            y[yi, j - off] = store_via(((load(a[ai, j]) - m) - c) * rs * w[j] + b[j], a, y)
    elif mode == MODE_FP32:
        for j in range(lo, hi):
            y[yi, j - off] = store_via(load(a[ai, j]) * rs * w[j], a, y)
    else:  # llama / none: x·rstd rounded to the input dtype, then times the weight
        for j in range(lo, hi):
            y[yi, j - off] = store_via(rnd(load(a[ai, j]) * rs, a) * w[j], a, y)


@njit(cache=True, inline="always")
def _norm_row(a, ai, y, i, buf, stream, w, wb, b, eps, k, layer, mode, mean, rstd, w_min, w_finite):
    """Normalize row ``ai`` of ``a`` into row ``i`` of ``y`` (statistics into ``mean[i]``, ``rstd[i]``).
    ``stream``: the aligned middle of the row goes out in blocks of :data:`BLOCK` columns through
    ``buf`` with non-temporal stores, interleaved with the computation. ``w_min``, ``w_finite``: the
    weights' :func:`weight_bounds`, for the proof that a bf16 RMSNorm row needs no classification."""
    n = a.shape[1]
    m, c, rs, least = _row_stats(a, ai, eps, k, layer)
    rq = rnd(rs, a) if mode == MODE_NONE else rs  # casting none: rstd rounded too
    checked = layer or not proven_normal(a, ai, k, rq, w_min, w_finite, least)
    width = buf.shape[1]  # a runtime block width: LLVM vectorizes the loop instead of unrolling it
    j = aligned_from(y, i) if stream else n
    _norm_cols(a, ai, y, i, 0, j, 0, w, wb, b, m, c, rq, layer, mode, checked)
    while stream and j + width <= n:
        _norm_cols(a, ai, buf, 0, j, j + width, j, w, wb, b, m, c, rq, layer, mode, checked)
        stream_cols(y, i, j, buf, 0, width)
        j += width
    _norm_cols(a, ai, y, i, j, n, 0, w, wb, b, m, c, rq, layer, mode, checked)
    if layer:
        mean[i] = m + c
    rstd[i] = rs


@njit(cache=True, inline="always")
def _add_row(x, r, s, i, sbuf, stream):
    """``s = x + r`` (fp32 add, rounded to ``s``'s dtype) on row ``i``; when streaming, formed in
    ``sbuf[0]`` (where the norm then reads it) and streamed out."""
    n = x.shape[1]
    if not stream:
        for t in range(hardware_add(x, r, s, i), n):
            s[i, t] = store(load(x[i, t]) + load(r[i, t]), s)
        return
    for t in range(n):
        sbuf[0, t] = store(load(x[i, t]) + load(r[i, t]), s)
    head = aligned_from(s, i)
    per_line = LINE // s.itemsize
    body = (n - head) // per_line * per_line
    for t in range(head):
        s[i, t] = sbuf[0, t]
    stream_cols(s, i, head, sbuf, head, body)
    for t in range(head + body, n):
        s[i, t] = sbuf[0, t]


@functools.cache
def _make_fwd(layer: bool, mode: int, fused: bool):
    """The forward kernel for one norm, casting mode and fused-or-not: the flags are compile-time
    constants of its loops (branch-free inner loops; a generic kernel with runtime flags is ≈ 30 %
    slower). Cached on disk per flag combination (numba keys closures by their values)."""
    helpers = _HELPERS_SOURCE

    @njit(parallel=True, cache=True)
    def kernel(x, r, s, y, w, wb, b, eps, k, mean, rstd, stream):
        if helpers == "":  # never true: makes the helpers' hash part of the cache key
            return
        rows, n = x.shape
        eps32 = np.float32(eps)
        if fused:  # what the proof of bf16 RMSNorm rows needs to know of the weights
            w_min, w_finite = weight_bounds(s, w)
        else:
            w_min, w_finite = weight_bounds(x, w)
        block = BLOCK if stream else 0
        for c in prange((rows + CHUNK - 1) // CHUNK):
            ybuf = np.empty((1, block), y.dtype)
            sbuf = np.empty((1, n if stream and fused else 0), s.dtype)
            for i in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
                if not fused:
                    _norm_row(x, i, y, i, ybuf, stream, w, wb, b, eps32, k, layer, mode, mean, rstd, w_min, w_finite)
                elif stream:
                    _add_row(x, r, s, i, sbuf, stream)
                    _norm_row(sbuf, 0, y, i, ybuf, stream, w, wb, b, eps32, k, layer, mode, mean, rstd, w_min, w_finite)
                else:
                    _add_row(x, r, s, i, sbuf, stream)
                    _norm_row(s, i, y, i, ybuf, stream, w, wb, b, eps32, k, layer, mode, mean, rstd, w_min, w_finite)
            if stream:
                store_fence()

    return kernel


def norm_fwd(x, r, s, fused, y, w, b, eps, k, layer, mode, mean, rstd, stream, w_bf16=None):
    """Forward of RMSNorm / LayerNorm, optionally on ``s = x + r`` (fp32 add, stored in ``s``'s dtype).

    ``w`` (and ``b`` for LayerNorm) are fp32 rows. RMSNorm: ``y = x·rstd·w`` with
    ``rstd = 1/sqrt(Σ_{j<k} x_j²/k + eps)`` and the casting ``mode``'s intermediate roundings;
    LayerNorm: ``y = (x − mean)·rstd·w + b`` with the corrected two-pass biased variance (deviations from
    the rounded mean, minus their own mean: accurate to the spread of the row, not to ulp(mean)).
    ``stream``: outputs are written with non-temporal stores (the same values either way). ``w_bf16``:
    the bf16 bit patterns of ``w`` (the same values), read by the bf16 → bf16 blocks instead of ``w``:
    half its bytes in cache (the same values either way).
    """
    kernel = _make_fwd(bool(layer), MODE_FP32 if layer else int(mode), bool(fused))
    kernel(x, r, s, y, w, w if w_bf16 is None else w_bf16, b, eps, k, mean, rstd, stream)


@njit(cache=True, inline="always")
def _grad_cols(dy, x, w, i, lo, hi, dx, di, off, rs, m, c, mg, mgx, proj, k, layer, dsum, has_dsum, pw, pb):
    """dx of columns ``lo:hi`` of row ``i`` into ``dx[di, lo − off : hi − off]``; adds their dw/db terms
    to the chunk partials ``pw``/``pb``."""
    lo, hi, off, k = _U(lo), _U(hi), _U(off), _U(k)
    if layer:
        for j in range(lo, hi):
            d = load(dy[i, j])
            xh = ((load(x[i, j]) - m) - c) * rs
            v = rs * (d * w[j] - mg - xh * mgx)
            dx[di, j - off] = store(v + load(dsum[i, j]) if has_dsum else v, dx)
            pw[j] += d * xh if d != _ZERO else _ZERO
            pb[j] += d
        return
    for j in range(lo, min(hi, k)):
        d = load(dy[i, j])
        xh = load(x[i, j]) * rs
        v = rs * (d * w[j]) - rs * xh * proj
        dx[di, j - off] = store(v + load(dsum[i, j]) if has_dsum else v, dx)
        pw[j] += d * xh if d != _ZERO else _ZERO
    for j in range(max(lo, k), hi):
        d = load(dy[i, j])
        v = rs * (d * w[j])
        dx[di, j - off] = store(v + load(dsum[i, j]) if has_dsum else v, dx)
        pw[j] += d * (load(x[i, j]) * rs) if d != _ZERO else _ZERO


@njit(cache=True, inline="always")
def _grad_row(dy, x, w, mean, rstd, k, layer, dsum, has_dsum, i, dx, buf, stream, pw, pb):
    """dx of row ``i`` (the aligned middle streamed through ``buf`` when ``stream``); dw/db terms into
    ``pw``/``pb``."""
    n = x.shape[1]
    nf = np.float32(n)
    rs = rstd[i]
    m = mean[i] if layer else _ZERO  # x − 0 is x exactly: one x̂ formula for both norms
    if layer:
        sum_g, sum_gd, sum_d = row_grad_sums(dy, w, x, i, m)
    else:  # RMSNorm needs Σ g·x only
        sum_g, sum_gd, sum_d = _ZERO, row_grad_dot(dy, w, x, i), _ZERO
    c = sum_d / nf if layer else _ZERO  # x̂ = ((x − mean) − c)·rstd, c the mean deviation, as in the forward
    mg, mgx = sum_g / nf, rs * (sum_gd - c * sum_g) / nf
    proj = rs * sum_gd / np.float32(k)
    width = buf.shape[1]
    j = aligned_from(dx, i) if stream else n
    _grad_cols(dy, x, w, i, 0, j, dx, i, 0, rs, m, c, mg, mgx, proj, k, layer, dsum, has_dsum, pw, pb)
    while stream and j + width <= n:
        _grad_cols(dy, x, w, i, j, j + width, buf, 0, j, rs, m, c, mg, mgx, proj, k, layer, dsum, has_dsum, pw, pb)
        stream_cols(dx, i, j, buf, 0, width)
        j += width
    _grad_cols(dy, x, w, i, j, n, dx, i, 0, rs, m, c, mg, mgx, proj, k, layer, dsum, has_dsum, pw, pb)


@functools.cache
def _make_bwd(layer: bool, has_dsum: bool):
    """The backward kernel for one norm, with or without the fused add's gradient (compile-time flags,
    as in :func:`_make_fwd`)."""
    helpers = _HELPERS_SOURCE

    @njit(parallel=True, cache=True)
    def kernel(dy, x, w, mean, rstd, k, dsum, dx, slot_w, slot_b, order, want_dw, want_db, dw, db, stream):
        if helpers == "":  # never true: makes the helpers' hash part of the cache key
            return
        rows, n = x.shape
        nchunks = (rows + CHUNK - 1) // CHUNK
        slots = slot_w.shape[0]
        # one worker per slot; workers take the chunks in increasing order. Nothing in the loop may raise:
        # a worker that left without publishing its chunk would leave the others waiting forever.
        for _ in prange(slots):
            dxbuf = np.empty((1, BLOCK if stream else 0), dx.dtype)
            c = fetch_add(order, 0, 1)
            while c < nchunks:
                pw = slot_w[c % slots]
                pb = slot_b[c % slots]
                wait_until(order, 1, c - slots + 1)  # the slot's previous chunk is folded
                pw[:] = _ZERO
                pb[:] = _ZERO
                for i in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
                    _grad_row(dy, x, w, mean, rstd, k, layer, dsum, has_dsum, i, dx, dxbuf, stream, pw, pb)
                if stream:
                    store_fence()
                wait_until(order, 1, c)  # every earlier chunk is folded: fold this one, in chunk order
                if want_dw:
                    for j in range(n):
                        dw[j] += pw[j]
                if want_db:
                    for j in range(n):
                        db[j] += pb[j]
                publish(order, 1, c + 1)
                c = fetch_add(order, 0, 1)

    return kernel


def norm_bwd(dy, x, w, mean, rstd, k, layer, dsum, has_dsum, dx, slot_w, slot_b, want_dw, want_db, dw, db, stream):
    """Backward of RMSNorm / LayerNorm given the saved per-row ``mean``/``rstd``.

    ``x̂ = (x − mean)·rstd`` (RMSNorm: ``x·rstd``), ``g = dy·w``:
    RMSNorm ``dx_j = rstd·g_j − [j<k]·rstd·x̂_j·Σ_i g_i x̂_i / k``;
    LayerNorm ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``; ``+ dsum`` (fused add).
    ``dw = Σ_rows dy·x̂`` (0 where dy == 0), ``db = Σ_rows dy``: an fp32 partial per chunk of rows
    (accumulated in the same pass as dx), added into ``dw``/``db`` (zeros) in chunk order as the chunks
    complete — whichever thread computed them, so the gradients are bitwise the same for any thread
    count. The partials live in ``slot_w``/``slot_b`` (``(slots, n)``, ``slot_b`` ``(slots, 0)`` for
    RMSNorm): one slot per worker, chunk ``c`` in slot ``c % slots`` once chunk ``c − slots`` is folded.
    ``stream``: dx rows go through a per-thread buffer and non-temporal stores (the same values).
    """
    kernel = _make_bwd(bool(layer), bool(has_dsum))
    order = np.zeros(2, np.int64)  # [next chunk to take, chunks folded]
    kernel(dy, x, w, mean, rstd, k, dsum, dx, slot_w, slot_b, order, want_dw, want_db, dw, db, stream)
