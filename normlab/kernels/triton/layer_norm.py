"""Triton kernels of LayerNorm and fused residual-add + LayerNorm (see :mod:`normlab.ops.layer_norm`).

    y = (s − mean) · rstd · w + b,   rstd = 1 / sqrt(mean((s − mean)²) + eps),   s = x (+ residual)

Forward: one program per row, three passes over the row's chunks (the first from memory, the others
from cache): a rough mean; the deviations ``d = s − rough``, whose mean ``c`` is the rounding error of the
rough mean, and ``var = mean(d²) − c² = mean((d − c)²)`` (the corrected two-pass of the reference, never
``E[x²] − E[x]²``); then ``y`` in fp32 math, cast once at the end. ``mean = rough + c`` is saved.
Backward: ``dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))`` (+ dsum) with ``g = dy · w`` and the deviations
corrected again (``x̂ = (x − mean − mean(x − mean)) · rstd``, as the reference does); each program
sums ``dy · x̂`` and ``dy`` over its rows into fp32 partial rows of ``dw`` and ``db``, added in a fixed
order (:func:`sum_partials`).
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
from normlab.kernels.triton.rms_norm import _load_sum


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD, n, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.range(0, NUM_CHUNKS):  # rough mean
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        s = _load_sum(X, R, S, base + cols, mask, HAS_RES)
        if HAS_RES:
            tl.store(S + base + cols, s, mask=mask)
        acc += s.to(tl.float32)
    rough = tl.sum(acc, axis=0) / n
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_d2 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.range(0, NUM_CHUNKS):  # deviations d = s − rough: their mean corrects the rough mean
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        d = tl.where(mask, _load_sum(X, R, S, base + cols, mask, HAS_RES).to(tl.float32) - rough, 0.0)
        acc_d += d
        acc_d2 += d * d
    correction = tl.sum(acc_d, axis=0) / n
    var = tl.maximum(tl.sum(acc_d2, axis=0) / n - correction * correction, 0.0)  # mean((d − correction)²)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + row, rough + correction)
    tl.store(RSTD + row, rstd)
    for c in tl.range(0, NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        y = (_load_sum(X, R, S, base + cols, mask, HAS_RES).to(tl.float32) - rough - correction) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DSUM, DX, DW_PART, DB_PART, rows, rows_per_program, n,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSUM: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    dw_row = DW_PART + pid.to(tl.int64) * n  # this program's partial row
    db_row = DB_PART + pid.to(tl.int64) * n  # this program's partial row
    last = tl.minimum(first + rows_per_program, rows)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)  # this program's partials, when the row is one chunk
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for row in tl.range(first, last):
        base = row * n
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        sum_d = tl.zeros([BLOCK], dtype=tl.float32)
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_gd = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.range(0, NUM_CHUNKS):  # Σ d, Σ g and Σ g·d with d = x − mean
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n
            d = tl.where(mask, tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            g = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            sum_d += d
            sum_g += g
            sum_gd += g * d
        correction = tl.sum(sum_d, axis=0) / n  # the rounding of the saved mean, as in the forward
        mean_g = tl.sum(sum_g, axis=0) / n
        mean_gx = rstd * (tl.sum(sum_gd, axis=0) / n - correction * mean_g)  # mean(g · x̂)
        for c in tl.range(0, NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n
            xhat = (tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32) - mean - correction) * rstd
            dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dx = rstd * (g - mean_g - xhat * mean_gx)
            if HAS_DSUM:
                dx += tl.load(DSUM + base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                contribution = tl.where(dy == 0.0, 0.0, dy * xhat)  # a NaN row never leaks into dw
                dw_acc = accumulate_partial(dw_acc, dw_row, cols, mask, contribution, NUM_CHUNKS)
            if HAS_B:
                db_acc = accumulate_partial(db_acc, db_row, cols, mask, dy, NUM_CHUNKS)
    if HAS_W:
        flush_partial(dw_acc, dw_row, n, BLOCK, NUM_CHUNKS)
    if HAS_B:
        flush_partial(db_acc, db_row, n, BLOCK, NUM_CHUNKS)


def _launch_fwd(x, residual, weight, bias, eps, y, s):
    rows, n = x.shape
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, chunks = block_and_chunks(n)
    _layer_norm_fwd_kernel[(rows,)](
        x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
        y, x if s is None else s, mean, rstd, n, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK=block, NUM_CHUNKS=chunks, num_warps=num_warps(block),
    )
    return mean, rstd


def layer_norm_fwd(x, weight, bias, eps, out=None):
    """``(y, mean, rstd)`` of a contiguous ``(rows, n)`` input; ``y`` written into ``out`` when given."""
    y = output(out, x, x.dtype)
    return (y, *_launch_fwd(x, None, weight, bias, eps, y, None))


def add_layer_norm_fwd(x, residual, weight, bias, eps, residual_dtype, out=None, residual_out=None):
    """``(y, s, mean, rstd)``: ``s = x + residual`` in ``residual_dtype``, ``y = layer_norm(s)`` in x's dtype;
    written into ``out`` and ``residual_out`` when given."""
    y, s = output(out, x, x.dtype), output(residual_out, x, residual_dtype, "residual_out")
    return (y, s, *_launch_fwd(x, residual, weight, bias, eps, y, s))


def layer_norm_bwd(dy, x, weight, bias, mean, rstd, dsum=None):
    """``(dx, dw | None, db | None)``; ``dsum`` (the gradient reaching the fused add's sum) is added to ``dx``."""
    rows, n = x.shape
    dy, dsum = contiguous(dy), contiguous(dsum)
    dx = torch.empty_like(x)
    block, chunks = block_and_chunks(n)
    programs, per_program = row_split(rows)
    alloc = torch.empty if chunks == 1 else torch.zeros
    dw_part = None if weight is None else alloc((programs, n), dtype=torch.float32, device=x.device)
    db_part = None if bias is None else alloc((programs, n), dtype=torch.float32, device=x.device)
    _layer_norm_bwd_kernel[(programs,)](
        dy, x, x if weight is None else weight, mean, rstd, dy if dsum is None else dsum, dx,
        rstd if dw_part is None else dw_part, rstd if db_part is None else db_part, rows, per_program, n,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_DSUM=dsum is not None,
        BLOCK=block, NUM_CHUNKS=chunks, num_warps=num_warps(block),
    )
    if n == 1:
        # LayerNorm of one element is the constant b: its input gradient is exactly 0. The kernel's
        # g − mean(g) is not, on a GPU: the compiler fuses dy·w − mean_g into one FMA (docs/benchmarks.md).
        dx = torch.zeros_like(x) if dsum is None else dsum.to(x.dtype, copy=True)
    dw = None if weight is None else sum_partials(dw_part, weight.dtype)
    db = None if bias is None else sum_partials(db_part, bias.dtype)
    return dx, dw, db
