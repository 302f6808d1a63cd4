"""Gated RMSNorm (Mamba-2's ``RMSNormGated``), RMS per group of ``group_size`` elements.

    norm_before_gate=False:  y = rmsnorm_groups(x · silu(z)) · (offset + w)
    norm_before_gate=True:   y = rmsnorm_groups(x) · (offset + w) · silu(z)

The normalized size ``n`` (the trailing ``normalized_shape``, flattened) splits into ``n / group_size``
consecutive groups, each normalized by its own RMS (``group_size=None``: one group, the whole row).
``gate=None`` is grouped RMSNorm. ``x · silu(z)``, the statistics and the gate multiply run in fp32 (fp64
for fp64 input). Casting modes, as :mod:`normlab.ops.rms_norm`'s:

- ``"llama"`` (Bamba, Mamba-2, Zamba2, Qwen3-Next): the normalized value rounded to the input dtype, then
  times the weight in the input dtype; a gate after the norm multiplies that in fp32, one cast at the end;
- ``"gemma"`` (Falcon-H1): everything in fp32, weight and gate included, one cast at the end.

``eps=None`` follows torch (fp32's machine epsilon; fp64's for fp64). The forward saves one ``rstd`` per
row and group. This file holds the reference (the spec), the custom op with its fake implementation and
autograd formula, and the functional API; kernels plug in through :mod:`normlab.dispatch`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab import dispatch
from normlab.ops._common import (
    HALF_DTYPES,
    check_choice,
    check_input,
    check_param,
    check_same,
    compute_dtype,
    custom_op_with_eager_twin,
    flat_param,
    normalized_size,
    row_mean,
    row_sum,
    row_view,
    rows,
    zero_where_no_grad,
)
from normlab.ops.rms_norm import check_offset, resolve_eps

CASTING_MODES = ("llama", "gemma")


def group_count(n: int, group_size: int) -> int:
    return n // group_size if group_size else 0


# ----------------------------------------------------------------------------------------------
# Reference (the spec): plain PyTorch on (rows, n) views
# ----------------------------------------------------------------------------------------------
def _silu_and_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    """``silu(z)`` and its derivative ``σ(z)·(1 + z·(1 − σ(z)))``."""
    sig = torch.sigmoid(z)
    return F.silu(z), sig * (1 + z * (1 - sig))


def _groups(t: Tensor, group_size: int) -> Tensor:
    """``(rows, n)`` as ``(rows, n / group_size, group_size)``."""
    return t.reshape(t.shape[0], t.shape[1] // group_size, group_size)


def _normalized_ref(x: Tensor, z: Tensor | None, eps: float, group_size: int, norm_before_gate: bool):
    """``(x̂, rstd, silu(z) | None)`` in the compute dtype: x̂ the grouped-RMS-normalized ``x`` (times silu(z)
    when the gate comes first), ``rstd`` ``(rows, groups)``."""
    c = compute_dtype(x.dtype)
    h = x.to(c)
    s = None if z is None else F.silu(z.to(c))
    if s is not None and not norm_before_gate:
        h = h * s
    hg = _groups(h, group_size)
    rstd = torch.rsqrt(row_mean(hg.pow(2)) + eps)
    return (hg * rstd[..., None]).reshape(h.shape), rstd, s


def gated_rms_norm_fwd_ref(
    x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float, group_size: int, norm_before_gate: bool,
    casting: str, offset: float,
) -> tuple[Tensor, Tensor]:
    """Reference forward on ``(rows, n)`` rows: ``(y, rstd)``, ``rstd`` ``(rows, n / group_size)``."""
    xhat, rstd, s = _normalized_ref(x, z, eps, group_size, norm_before_gate)
    gate_after = s if norm_before_gate else None
    if casting == "llama":
        y = xhat.to(x.dtype)
        if weight is not None:
            y = y * (weight.to(x.dtype) + offset)
        if gate_after is not None:
            y = (y.to(xhat.dtype) * gate_after).to(x.dtype)
        return y, rstd
    y = xhat if weight is None else xhat * (weight.to(xhat.dtype) + offset)
    if gate_after is not None:
        y = y * gate_after
    return y.to(x.dtype), rstd


def gated_rms_norm_bwd_ref(
    dy: Tensor, x: Tensor, z: Tensor | None, weight: Tensor | None, rstd: Tensor, eps: float, group_size: int,
    norm_before_gate: bool, offset: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Reference backward on ``(rows, n)`` rows, in the compute dtype: ``(dx, dz | None, dw | None)``.

    With ``h = x·silu(z)`` (gate first) or ``h = x``, ``x̂ = h·rstd`` per group, ``w' = offset + w`` and
    ``u = dy·silu(z)`` (gate after) or ``u = dy``, ``g = u·w'``: ``dh = rstd·(g − x̂·mean_group(g·x̂))``;
    gate first ``dx = dh·silu(z)``, ``dz = dh·x·silu'(z)``; gate after ``dx = dh``, ``dz = dy·x̂·w'·silu'(z)``;
    ``dw = Σ_rows u·x̂``. Under grad mode (double backward) ``rstd`` is recomputed from ``x`` and ``z``.
    """
    c = compute_dtype(x.dtype)
    xf, dyf = x.to(c), dy.to(c)
    s = slope = None
    if z is not None:
        s, slope = _silu_and_slope(z.to(c))
    h = xf * s if s is not None and not norm_before_gate else xf
    hg = _groups(h, group_size)
    if torch.is_grad_enabled():
        rstd = torch.rsqrt(row_mean(hg.pow(2)) + eps)
    r = rstd.to(c)[..., None]
    xhat = hg * r
    w = None if weight is None else weight.to(c) + offset
    u = dyf * s if s is not None and norm_before_gate else dyf
    g = _groups(u if w is None else u * w, group_size)
    proj = row_sum(g * xhat, keepdim=True) / group_size
    dh = (r * (g - xhat * proj)).reshape(xf.shape)
    xhat = xhat.reshape(xf.shape)
    dz = None
    if s is None:
        dx = dh
    elif not norm_before_gate:
        dx, dz = dh * s, dh * xf * slope
    else:
        dx, dz = dh, dyf * (xhat if w is None else xhat * w) * slope
    dw = None if weight is None else zero_where_no_grad(dyf, u * xhat).sum(dim=0).to(weight.dtype)
    return dx.to(x.dtype), None if dz is None else dz.to(z.dtype), dw


def gated_rms_norm_reference(
    x: Tensor, gate: Tensor | None, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    eps: float | None = None, *, group_size: int | None = None, norm_before_gate: bool = False,
    casting: str = "llama", offset: float = 0.0,
) -> Tensor:
    """The spec, differentiable with plain autograd (no custom op): what every backend must match."""
    _, n = normalized_size(x, normalized_shape)
    g = resolve_group_size(group_size, n)
    z = None if gate is None else rows(gate, n)
    eps, w = resolve_eps(eps, x.dtype), flat_param(weight, n)
    y, _ = gated_rms_norm_fwd_ref(rows(x, n), z, w, eps, g, bool(norm_before_gate), casting, float(offset))
    return y.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Custom op of the Python backends: the backend's kernels (normlab/kernels/contract.py) or the
# reference, on contiguous (rows, n) rows; the cpu backend's op is native (torch.ops.normlab.gated_rms_norm)
# ----------------------------------------------------------------------------------------------
def _fwd(
    x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float, group_size: int, norm_before_gate: bool,
    casting: str, offset: float, backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == dispatch.REFERENCE:
        return gated_rms_norm_fwd_ref(x, z, weight, eps, group_size, norm_before_gate, casting, offset)
    kernel = dispatch.kernel(backend, "gated_rms_norm_fwd")
    return kernel(x, z, weight, eps, group_size, norm_before_gate, casting, offset)


def _fake(x, z, weight, eps, group_size, norm_before_gate, casting, offset, backend):
    stats = x.new_empty((x.shape[0], group_count(x.shape[1], group_size)), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x), stats


def _setup(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate, _casting, offset, backend = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.options = (eps, group_size, norm_before_gate, offset, backend)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensor for rstd's gradient (it has none)


def _backward(ctx, dy, _drstd):
    if dy is None:
        return (None,) * 9
    x, z, weight, rstd = ctx.saved_tensors
    eps, group_size, norm_before_gate, offset, backend = ctx.options
    if backend == dispatch.REFERENCE or torch.is_grad_enabled():
        dx, dz, dw = gated_rms_norm_bwd_ref(dy, x, z, weight, rstd, eps, group_size, norm_before_gate, offset)
    else:  # incoming gradients may be strided (the expanded ones of a .sum()); kernels take contiguous rows
        kernel = dispatch.kernel(backend, "gated_rms_norm_bwd")
        dx, dz, dw = kernel(dy.contiguous(), x, z, weight, rstd, group_size, norm_before_gate, offset)
    return dx, dz, dw, None, None, None, None, None, None


_gated_rms_norm_op = custom_op_with_eager_twin(
    "normlab::py_gated_rms_norm", _fwd, _fake, _setup, _backward
)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def resolve_group_size(group_size: int | None, n: int) -> int:
    """``group_size``, checked: a positive int dividing ``n``; ``None`` is ``n`` (one group)."""
    if group_size is None:
        return max(n, 1)  # an empty row: one empty group
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be None or a positive int, got {group_size!r}")
    g = int(group_size)
    if g < 1:
        raise ValueError(f"group_size must be a positive int, got {g}")
    if n % g:
        raise ValueError(f"group_size {g} must divide the normalized size {n}")
    return g


def _widened(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A bf16/fp16 gate or weight next to a float32/float64 input, exactly upcast (Mamba mixers hand an fp32
    input with a bf16 gate and weight, which the Hugging Face norms multiply in fp32)."""
    wide_input = isinstance(x, Tensor) and x.dtype in (torch.float32, torch.float64)
    if wide_input and isinstance(t, Tensor) and t.dtype in HALF_DTYPES:
        return t.to(x.dtype)
    return t


def _check(x, gate, normalized_shape, weight, eps, group_size, casting, offset):
    check_input(x)
    shape, n = normalized_size(x, normalized_shape)
    if gate is not None:
        check_same(x, gate, "input", "gate")
        if gate.dtype != x.dtype:
            raise TypeError(
                f"expected gate of dtype {x.dtype} (the input's; bf16/fp16 next to a float32/float64 input), "
                f"got {gate.dtype}"
            )
    check_param(weight, "weight", shape, x)
    check_choice(casting, "casting mode", CASTING_MODES)
    check_offset(offset)
    return n, resolve_eps(eps, x.dtype), resolve_group_size(group_size, n)


def gated_rms_norm(
    input: Tensor, gate: Tensor | None, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    eps: float | None = None, *, group_size: int | None = None, norm_before_gate: bool = False,
    casting: str = "llama", offset: float = 0.0, backend: str | None = None,
) -> Tensor:
    """Gated RMSNorm over the trailing ``normalized_shape``, the RMS per group of ``group_size`` elements:
    ``rmsnorm(x · silu(gate)) · (offset + w)``, or with ``norm_before_gate`` ``rmsnorm(x) · (offset + w) ·
    silu(gate)``; ``gate`` has the input's shape and dtype, or is None (grouped RMSNorm). ``casting`` is
    described in the module docstring. A bf16/fp16 gate or weight next to a float32/float64 input is upcast
    exactly (its gradient returns in its own dtype)."""
    gate, weight = _widened(gate, input), _widened(weight, input)
    n, eps, g = _check(input, gate, normalized_shape, weight, eps, group_size, casting, offset)
    nbg, offset = bool(norm_before_gate), float(offset)
    x, w = row_view(input, n), flat_param(weight, n)
    z = None if gate is None else row_view(gate, n)
    name = dispatch.REFERENCE
    if x.numel():
        name = dispatch.select(
            "gated_rms_norm", x, backend, gate=z, weight=w, group_size=g, norm_before_gate=nbg, casting=casting,
            offset=offset,
        )
    op = dispatch.native(name, "gated_rms_norm")
    if op is not None:  # rows made contiguous, autograd and all, in the backend's own operator
        return op(x, z, w, eps, g, nbg, casting, offset)[0].view(input.shape)
    x, z = rows(input, n), None if gate is None else rows(gate, n)
    y, _ = _gated_rms_norm_op(x, z, w, eps, g, nbg, casting, offset, name)
    return y.reshape(input.shape)
