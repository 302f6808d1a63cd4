"""Triton kernels of RMSNorm and fused residual-add + RMSNorm (see :mod:`normlab.ops.rms_norm`).

    rstd = 1 / sqrt(Σ_{j<k} s_j² / k + eps),   y = s · rstd · (offset + w),   s = x (+ residual)

Forward: one program per row; a first pass over the row's chunks accumulates the sum of squares of the
first ``k`` elements in fp32 (and stores ``s`` for the fused add), a second pass writes ``y``.
Backward: ``dx_j = rstd · (g_j − [j < k] · x̂_j · Σ_i g_i x̂_i / k) (+ dsum)`` with ``g = dy · (offset + w)``
and ``x̂ = x · rstd``; each program also sums ``dy · x̂`` over its rows into one fp32 partial row of
``dw``, and the partial rows are added in a fixed order (:func:`sum_partials`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normlab.kernels.triton._common import (
    accumulate_partial,
    block_and_chunks,
    contiguous,
    flush_partial,
    num_warps,
    output,
    row_split,
    sum_partials,
)

CASTING_CODES = {"llama": 0, "gemma": 1, "none": 2}


@triton.jit
def _load_sum(X, R, S, offs, mask, HAS_RES: tl.constexpr):
    """The row chunk being normalized: ``x``, or ``x + residual`` added in fp32 and rounded to S's dtype."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
    return x


@triton.jit
def _scale(s, rstd, w, offset, HAS_W: tl.constexpr, CASTING: tl.constexpr):
    """``s · rstd · (offset + w)`` rounded as the casting mode says; the result is in s's dtype (or fp32)."""
    dt = s.dtype
    if CASTING == 2:  # "none": input dtype throughout
        y = (s.to(tl.float32) * rstd.to(dt).to(tl.float32)).to(dt)
        if HAS_W:
            wo = (w.to(tl.float32) + offset).to(w.dtype).to(dt)
            y = (y.to(tl.float32) * wo.to(tl.float32)).to(dt)
    else:
        y = s.to(tl.float32) * rstd
        if HAS_W:
            if CASTING == 0:  # "llama": round x·rstd to the input dtype, then multiply by the weight
                wo = (w.to(dt).to(tl.float32) + offset).to(dt)
                y = (y.to(dt).to(tl.float32) * wo.to(tl.float32)).to(dt)
            else:  # "gemma": fp32 throughout
                y = y * (w.to(tl.float32) + offset)
    return y


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD, n, k, eps, offset,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, CASTING: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.range(0, NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        s = _load_sum(X, R, S, base + cols, mask, HAS_RES)
        if HAS_RES:
            tl.store(S + base + cols, s, mask=mask)
        sf = s.to(tl.float32)
        acc += tl.where(cols < k, sf * sf, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / k + eps)
    tl.store(RSTD + row, rstd)
    for c in tl.range(0, NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        s = _load_sum(X, R, S, base + cols, mask, HAS_RES)
        w = tl.load(W + cols, mask=mask, other=0.0) if HAS_W else None
        y = _scale(s, rstd, w, offset, HAS_W, CASTING)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DSUM, DX, DW_PART, rows, rows_per_program, n, k, offset,
    HAS_W: tl.constexpr, HAS_DSUM: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    dw_row = DW_PART + pid.to(tl.int64) * n  # this program's partial row
    last = tl.minimum(first + rows_per_program, rows)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)  # this program's dw partial, when the row is one chunk
    for row in tl.range(first, last):
        base = row * n
        rstd = tl.load(RSTD + row)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.range(0, NUM_CHUNKS):  # Σ_i g_i x̂_i
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n
            xhat = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            g = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                g = g * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
            acc += g * xhat
        proj = tl.sum(acc, axis=0) / k
        for c in tl.range(0, NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n
            xhat = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy
            if HAS_W:
                g = dy * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
            dx = rstd * g - tl.where(cols < k, rstd * xhat * proj, 0.0)
            if HAS_DSUM:
                dx += tl.load(DSUM + base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                contribution = tl.where(dy == 0.0, 0.0, dy * xhat)  # a NaN row never leaks into dw
                dw_acc = accumulate_partial(dw_acc, dw_row, cols, mask, contribution, NUM_CHUNKS)
    if HAS_W:
        flush_partial(dw_acc, dw_row, n, BLOCK, NUM_CHUNKS)


def _launch_fwd(x, residual, weight, eps, casting, offset, k, y, s):
    rows, n = x.shape
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, chunks = block_and_chunks(n)
    _rms_norm_fwd_kernel[(rows,)](
        x, x if residual is None else residual, x if weight is None else weight, y, x if s is None else s, rstd,
        n, k, eps, offset,
        HAS_RES=residual is not None, HAS_W=weight is not None, CASTING=CASTING_CODES[casting],
        BLOCK=block, NUM_CHUNKS=chunks, num_warps=num_warps(block),
    )
    return rstd


def rms_norm_fwd(x, weight, eps, casting, offset, k, out=None):
    """``(y, rstd)`` of a contiguous ``(rows, n)`` input; ``y`` written into ``out`` when given."""
    y = output(out, x, x.dtype)
    return y, _launch_fwd(x, None, weight, eps, casting, offset, k, y, None)


def add_rms_norm_fwd(x, residual, weight, eps, casting, offset, k, residual_dtype, out=None, residual_out=None):
    """``(y, s, rstd)``: ``s = x + residual`` stored in ``residual_dtype``, ``y = rms_norm(s)`` in x's dtype;
    written into ``out`` and ``residual_out`` when given."""
    y, s = output(out, x, x.dtype), output(residual_out, x, residual_dtype, "residual_out")
    return y, s, _launch_fwd(x, residual, weight, eps, casting, offset, k, y, s)


def rms_norm_bwd(dy, x, weight, rstd, offset, k, dsum=None):
    """``(dx, dw | None)``; ``dsum`` (the gradient reaching the fused add's sum) is added to ``dx``."""
    rows, n = x.shape
    dy, dsum = contiguous(dy), contiguous(dsum)
    dx = torch.empty_like(x)
    block, chunks = block_and_chunks(n)
    programs, per_program = row_split(rows)
    partial = None
    if weight is not None:
        alloc = torch.empty if chunks == 1 else torch.zeros
        partial = alloc((programs, n), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, x if weight is None else weight, rstd, dy if dsum is None else dsum, dx,
        rstd if partial is None else partial, rows, per_program, n, k, offset,
        HAS_W=weight is not None, HAS_DSUM=dsum is not None, BLOCK=block, NUM_CHUNKS=chunks,
        num_warps=num_warps(block),
    )
    return dx, None if weight is None else sum_partials(partial, weight.dtype)
