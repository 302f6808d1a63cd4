"""Launch configuration and the deterministic parameter-gradient reduction shared by the Triton kernels.

Every kernel body is written once: a program normalizes one row (forward) or a fixed run of rows
(backward), and walks the row in ``NUM_CHUNKS = ceil(n / BLOCK)`` chunks of ``BLOCK`` elements, so the
same body serves ``n = 1`` and ``n = 65536``. A row's arithmetic depends only on ``n`` — never on the
number of rows — which makes every output batch-invariant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Largest chunk a program holds in registers; longer rows loop over chunks of this size.
MAX_BLOCK = 8192
#: Backward programs: each owns a contiguous run of rows (at least ``MIN_ROWS_PER_PROGRAM``, so the fp32
#: partial rows of the weight/bias gradients stay ≤ 1/8 of the rows read) and writes one partial row; at
#: most ``MAX_ROW_PROGRAMS`` — constants, not the GPU's SM count, so that the parameter gradients are
#: bitwise the same on every device. The split never changes a row's own arithmetic (dx).
MAX_ROW_PROGRAMS = 2048
MIN_ROWS_PER_PROGRAM = 8
#: Partial rows summed per step and columns per program in :func:`sum_partials`.
SUM_BLOCK_G, SUM_BLOCK_N = 32, 64


def block_and_chunks(n: int) -> tuple[int, int]:
    """``(BLOCK, NUM_CHUNKS)``: the power-of-two chunk a program works on and how many cover ``n``."""
    block = min(triton.next_power_of_2(max(n, 1)), MAX_BLOCK)
    return block, triton.cdiv(n, block)


def num_warps(block: int) -> int:
    """Warps per program: about 16 elements of a chunk per thread, 1 to 16 warps."""
    return max(1, min(16, block // 512))


def row_split(rows: int) -> tuple[int, int]:
    """``(programs, rows_per_program)`` of a backward launch: contiguous runs of rows, none empty."""
    programs = max(1, min(MAX_ROW_PROGRAMS, rows // MIN_ROWS_PER_PROGRAM))
    per_program = triton.cdiv(rows, programs)
    return triton.cdiv(rows, per_program), per_program


@triton.jit
def _sum_partials_kernel(P, OUT, G, n, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """``OUT[j] = Σ_g P[g, j]`` in fp32, the partial rows taken in order ``BLOCK_G`` at a time."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in tl.range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & (cols[None, :] < n)
        acc += tl.load(P + g[:, None].to(tl.int64) * n + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < n)


@triton.jit
def accumulate_partial(acc, part_row, cols, mask, value, NUM_CHUNKS: tl.constexpr):
    """Add one chunk of a row's parameter-gradient contribution to this program's fp32 partial: in
    registers (``acc``) when a row is one chunk, else into the partial row in memory. Returns ``acc``."""
    if NUM_CHUNKS == 1:
        acc += value
    else:
        part = part_row + cols
        tl.store(part, tl.load(part, mask=mask, other=0.0) + value, mask=mask)
    return acc


@triton.jit
def flush_partial(acc, part_row, n, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Write the register partial of :func:`accumulate_partial` to this program's partial row."""
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK)
        tl.store(part_row + cols, acc, mask=cols < n)


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of the ``(programs, n)`` fp32 partials, in a fixed order (no atomics), as ``dtype``."""
    g, n = partials.shape
    out = torch.empty(n, dtype=dtype, device=partials.device)
    _sum_partials_kernel[(triton.cdiv(n, SUM_BLOCK_N),)](partials, out, g, n, BLOCK_G=SUM_BLOCK_G, BLOCK_N=SUM_BLOCK_N)
    return out


def output(out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, name: str = "out") -> torch.Tensor:
    """The given buffer ``out`` for an output of ``like``'s shape in ``dtype`` (checked: a kernel writes
    dense rows into it), or a fresh one."""
    if out is None:
        return torch.empty_like(like, dtype=dtype)
    if out.shape != like.shape or out.dtype != dtype or not out.is_contiguous() or out.device != like.device:
        raise ValueError(
            f"{name} must be a contiguous tensor of shape {list(like.shape)}, dtype {dtype} on {like.device}, "
            f"got {list(out.shape)}, {out.dtype}, contiguous={out.is_contiguous()}, {out.device}"
        )
    return out


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """Gradients handed over by autograd may be expanded or strided; kernels read dense rows."""
    return None if t is None else t.contiguous()
