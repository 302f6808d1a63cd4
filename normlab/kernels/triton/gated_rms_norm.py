"""Triton kernels of gated RMSNorm (see :mod:`normlab.ops.gated_rms_norm`).

    h = x · silu(z) (gate first) or x,   rstd = 1 / sqrt(Σ_group h² / group_size + eps)
    y = h · rstd · (offset + w)  (· silu(z) when the gate comes after the norm)

Forward: one program per row and group; a first pass over the group's chunks sums h² in fp32, a second
writes ``y`` with the casting mode's roundings. Backward: with ``u = dy · silu(z)`` (gate after) or ``dy``,
``g = u · (offset + w)`` and ``x̂ = h · rstd``: ``dh = rstd · (g − x̂ · Σ_group g·x̂ / group_size)``; gate first
``dx = dh · silu(z)``, ``dz = dh · x · silu'(z)``, gate after ``dx = dh``, ``dz = dy · x̂ · (offset + w) · silu'(z)``.
Each backward program owns a run of rows and sums ``u · x̂`` into one fp32 partial row of ``dw``; the partial
rows are added in a fixed order (:func:`sum_partials`).
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


@triton.jit
def _silu(z):
    """``z / (1 + exp(−z))`` of fp32 values."""
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _gated_rms_norm_fwd_kernel(
    X, Z, W, Y, RSTD, n, group, eps, offset,
    HAS_GATE: tl.constexpr, BEFORE: tl.constexpr, HAS_W: tl.constexpr, LLAMA: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    groups = n // group
    row, grp = pid // groups, pid % groups
    base, wbase = row * n + grp * group, grp * group
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.range(0, NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < group
        h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE and BEFORE == 0:
            h = h * _silu(tl.load(Z + base + cols, mask=mask, other=0.0).to(tl.float32))
        acc += h * h
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / group + eps)
    tl.store(RSTD + pid, rstd)
    dt = Y.dtype.element_ty
    for c in tl.range(0, NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < group
        v = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            s = _silu(tl.load(Z + base + cols, mask=mask, other=0.0).to(tl.float32))
            if BEFORE == 0:
                v = v * s
        v = v * rstd
        if LLAMA:  # the normalized value in the input dtype, times the weight rounded as the reference
            v = v.to(dt).to(tl.float32)
        if HAS_W:
            w = tl.load(W + wbase + cols, mask=mask, other=0.0)
            if LLAMA:
                v = (v * (w.to(dt).to(tl.float32) + offset).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            else:
                v = v * (w.to(tl.float32) + offset)
        if HAS_GATE and BEFORE:
            v = v * s
        tl.store(Y + base + cols, v.to(dt), mask=mask)


@triton.jit
def _gated_rms_norm_bwd_kernel(
    DY, X, Z, W, RSTD, DX, DZ, DW_PART, rows, rows_per_program, n, group, offset,
    HAS_GATE: tl.constexpr, BEFORE: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, ROW_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    dw_row = DW_PART + pid.to(tl.int64) * n  # this program's partial row
    groups = n // group
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)  # this program's dw partial, when a row is one chunk
    for row in tl.range(first, last):
        for grp in tl.range(0, groups):
            base, wbase = row * n + grp * group, grp * group
            rstd = tl.load(RSTD + row * groups + grp)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for c in tl.range(0, NUM_CHUNKS):  # Σ g·x̂
                cols = c * BLOCK + tl.arange(0, BLOCK)
                mask = cols < group
                h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_GATE:
                    s = _silu(tl.load(Z + base + cols, mask=mask, other=0.0).to(tl.float32))
                    if BEFORE:
                        u = u * s
                    else:
                        h = h * s
                if HAS_W:
                    u = u * (tl.load(W + wbase + cols, mask=mask, other=0.0).to(tl.float32) + offset)
                acc += u * (h * rstd)
            proj = tl.sum(acc, axis=0) / group
            for c in tl.range(0, NUM_CHUNKS):
                cols = c * BLOCK + tl.arange(0, BLOCK)
                mask = cols < group
                x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.full([BLOCK], 1.0, tl.float32)
                if HAS_W:
                    w = tl.load(W + wbase + cols, mask=mask, other=0.0).to(tl.float32) + offset
                h, u = x, dy
                if HAS_GATE:
                    z = tl.load(Z + base + cols, mask=mask, other=0.0).to(tl.float32)
                    ez = tl.exp(-z)
                    s, sig = z / (1.0 + ez), 1.0 / (1.0 + ez)
                    slope = sig * (1.0 + z * (1.0 - sig))
                    if BEFORE:
                        u = dy * s
                    else:
                        h = x * s
                xh = h * rstd
                dh = rstd * (u * w - xh * proj)
                dx = dh
                if HAS_GATE:
                    if BEFORE:
                        dz = dy * (xh * w) * slope
                    else:
                        dx = dh * s
                        dz = dh * x * slope
                    tl.store(DZ + base + cols, dz.to(DZ.dtype.element_ty), mask=mask)
                tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_W:
                    contribution = tl.where(dy == 0.0, 0.0, u * xh)  # a NaN row never leaks into dw
                    dw_acc = accumulate_partial(dw_acc, dw_row + wbase, cols, mask, contribution, ROW_CHUNKS)
    if HAS_W:
        flush_partial(dw_acc, dw_row, n, BLOCK, ROW_CHUNKS)


def gated_rms_norm_fwd(x, gate, weight, eps, group_size, norm_before_gate, casting, offset, out=None):
    """``(y, rstd)`` of a contiguous ``(rows, n)`` input, ``rstd`` ``(rows, n / group_size)``; ``y`` written
    into ``out`` when given."""
    rows, n = x.shape
    groups = n // group_size
    y = output(out, x, x.dtype)
    rstd = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    block, chunks = block_and_chunks(group_size)
    _gated_rms_norm_fwd_kernel[(rows * groups,)](
        x, x if gate is None else gate, x if weight is None else weight, y, rstd, n, group_size, eps, offset,
        HAS_GATE=gate is not None, BEFORE=bool(norm_before_gate), HAS_W=weight is not None, LLAMA=casting == "llama",
        BLOCK=block, NUM_CHUNKS=chunks, num_warps=num_warps(block),
    )
    return y, rstd


def gated_rms_norm_bwd(dy, x, gate, weight, rstd, group_size, norm_before_gate, offset):
    """``(dx, dz | None, dw | None)`` from the forward's ``rstd``."""
    rows, n = x.shape
    dy = contiguous(dy)
    dx = torch.empty_like(x)
    dz = None if gate is None else torch.empty_like(gate)
    block, chunks = block_and_chunks(group_size)
    row_chunks = chunks * (n // group_size)  # chunks per row: one keeps the dw partial in registers
    programs, per_program = row_split(rows)
    partial = None
    if weight is not None:
        alloc = torch.empty if row_chunks == 1 else torch.zeros
        partial = alloc((programs, n), dtype=torch.float32, device=x.device)
    _gated_rms_norm_bwd_kernel[(programs,)](
        dy, x, x if gate is None else gate, x if weight is None else weight, rstd, dx, dx if dz is None else dz,
        rstd if partial is None else partial, rows, per_program, n, group_size, offset,
        HAS_GATE=gate is not None, BEFORE=bool(norm_before_gate), HAS_W=weight is not None,
        BLOCK=block, NUM_CHUNKS=chunks, ROW_CHUNKS=min(row_chunks, 2), num_warps=num_warps(block),
    )
    return dx, dz, None if weight is None else sum_partials(partial, weight.dtype)
