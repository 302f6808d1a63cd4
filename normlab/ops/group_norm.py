"""GroupNorm (Wu & He 2018), as ``torch.nn.functional.group_norm``.

    y[n, c, *] = (x[n, c, *] - mean[n, g]) / sqrt(var[n, g] + eps) * w[c] + b[c],   g = c // (C / G)

Statistics per sample and group of ``C / G`` channels, over those channels and every trailing dim;
variance biased, corrected two-pass, in fp32 (fp64 for fp64 input). A sample's output depends on that
sample alone.
Internally the input ``(N, C, *)`` is viewed as ``(N·G, C/G · prod(*))`` rows.

This file holds the reference (the spec), the custom op with its fake implementation and autograd
formula (served by the reference alone), and the functional API.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from normlab.ops._common import (
    check_eps,
    check_input,
    check_param,
    compute_dtype,
    custom_op_with_eager_twin,
    empty_output,
    empty_stats,
    row_mean,
    row_sum,
    zero_where_no_grad,
)


# ----------------------------------------------------------------------------------------------
# Reference (the spec): plain PyTorch on the (N, C, S) view; statistics on (N·G, C/G·S) rows
# ----------------------------------------------------------------------------------------------
def _groups(t: Tensor, num_groups: int) -> Tensor:
    """``(N, C, S)`` → ``(N, G, C/G, S)``."""
    return t.reshape(t.shape[0], num_groups, -1, t.shape[2])


def _group_mean(t: Tensor) -> Tensor:
    """Mean of ``(N, G, C/G, S)`` over each (sample, group), as ``(N, G, 1, 1)``; batch invariant."""
    return row_mean(t.reshape(t.shape[0], t.shape[1], -1)).reshape(t.shape[0], t.shape[1], 1, 1)


def _group_sum(t: Tensor) -> Tensor:
    return row_sum(t.reshape(t.shape[0], t.shape[1], -1)).reshape(t.shape[0], t.shape[1], 1, 1)


def group_deviations(x: Tensor, num_groups: int, mean: Tensor | None = None) -> Tensor:
    """``x - mean`` per (sample, group) as ``(N, G, C/G, S)`` in the compute dtype, corrected for the
    rounding of ``mean`` (corrected two-pass: ``d - mean(d)``, ``d = x - mean`` exact near the mean).
    ``mean`` (shape ``(N·G,)``) defaults to the group means of ``x``."""
    xg = _groups(x.to(compute_dtype(x.dtype)), num_groups)
    rough = _group_mean(xg) if mean is None else mean.reshape(x.shape[0], num_groups, 1, 1)
    d = xg - rough
    return d - _group_mean(d)


def group_stats_ref(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Deviations ``(N, G, C/G, S)`` and per (sample, group) ``mean`` and ``rstd = 1/sqrt(var + eps)``,
    shape ``(N·G,)``, in the compute dtype; variance biased, ``mean(d²)``."""
    xg = _groups(x.to(compute_dtype(x.dtype)), num_groups)
    rough = _group_mean(xg)
    d = xg - rough
    correction = _group_mean(d)
    d = d - correction
    return d, (rough + correction).reshape(-1), torch.rsqrt(_group_mean(d.square()).reshape(-1) + eps)


def _per_group(v: Tensor, d: Tensor) -> Tensor:
    """A ``(N·G,)`` statistic broadcast against ``(N, G, C/G, S)``."""
    return v.reshape(d.shape[0], d.shape[1], 1, 1)


def group_norm_apply_ref(
    d: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, shape: torch.Size, dtype: torch.dtype
) -> Tensor:
    """``y = d·rstd·w + b`` from the deviations ``d`` ``(N, G, C/G, S)``, returned as ``(N, C, S)`` in ``dtype``."""
    c = d.dtype
    y = (d * _per_group(rstd, d)).reshape(shape)
    if weight is not None:
        y = y * weight.to(c)[None, :, None]
    if bias is not None:
        y = y + bias.to(c)[None, :, None]
    return y.to(dtype)


def group_norm_fwd_ref(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward on the ``(N, C, S)`` input: ``(y, mean, rstd)``, statistics ``(N·G,)`` in the compute dtype."""
    d, mean, rstd = group_stats_ref(x, num_groups, eps)
    return group_norm_apply_ref(d, rstd, weight, bias, x.shape, x.dtype), mean, rstd


def group_norm_bwd_ref(
    dy: Tensor, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Analytic backward on ``(N, C, S)``. With ``x̂ = (x - mean)·rstd``, ``g = dy·w`` and ``m`` elements
    per group: ``dx = rstd · (g - Σ_group g / m - x̂ · Σ_group g x̂ / m)``, ``dw_c = Σ_{n,s} dy x̂``,
    ``db_c = Σ_{n,s} dy``. Under grad mode (double backward) the statistics are recomputed from ``x``."""
    c = compute_dtype(x.dtype)
    if torch.is_grad_enabled():
        d, mean, rstd = group_stats_ref(x, num_groups, eps)
    else:
        d = group_deviations(x, num_groups, mean)
    dyf = dy.to(c)
    r = _per_group(rstd.to(c), d)
    xhat = d * r
    g = _groups(dyf if weight is None else dyf * weight.to(c)[None, :, None], num_groups)
    m = xhat[0, 0].numel()
    dx = r * (g - _group_sum(g) / m - xhat * _group_sum(g * xhat) / m)
    if weight is None:
        dw = None
    else:
        dw = zero_where_no_grad(dyf, dyf * xhat.reshape(x.shape)).sum(dim=(0, 2)).to(weight.dtype)
    db = None if bias is None else dyf.sum(dim=(0, 2)).to(bias.dtype)
    return dx.reshape(x.shape).to(x.dtype), dw, db


def group_norm_reference(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """The spec, differentiable with plain autograd (no custom op)."""
    return group_norm_fwd_ref(_ncs(input), num_groups, weight, bias, eps)[0].reshape(input.shape)


def _ncs(x: Tensor) -> Tensor:
    """``(N, C, *)`` as contiguous ``(N, C, S)``: results independent of the memory layout (channels-last…)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).contiguous()


# ----------------------------------------------------------------------------------------------
# Custom op: the reference forward, on the (N, C, S) view (no backend has a group_norm kernel)
# ----------------------------------------------------------------------------------------------
def _fake(x, num_groups, weight, bias, eps):
    return torch.empty_like(x), empty_stats(x, x.shape[0] * num_groups), empty_stats(x, x.shape[0] * num_groups)


def _setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.options = (num_groups, eps)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, eps = ctx.options
    dx, dw, db = group_norm_bwd_ref(dy, x, num_groups, weight, bias, mean, rstd, eps)
    return dx, None, dw, db, None


_group_norm_op = custom_op_with_eager_twin("normlab::group_norm", group_norm_fwd_ref, _fake, _setup, _backward)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _check(input, num_groups, weight, bias, eps):
    check_input(input)
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *) with at least 2 dims, got shape {list(input.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    channels = input.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"expected the number of channels (input.shape[1] = {channels}) to be divisible by num_groups, "
            f"got num_groups={num_groups}"
        )
    # torch's check (F.group_norm → _verify_batch_size): one value per channel-group row in the whole input
    size = [input.shape[0] * channels // num_groups, int(num_groups), *input.shape[2:]]
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size} "
            f"(as torch.nn.functional.group_norm: N·C/num_groups·prod(input.shape[2:]) must be > 1)"
        )
    check_param(weight, "weight", (channels,), input)
    check_param(bias, "bias", (channels,), input)
    return check_eps(eps)


def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """GroupNorm as ``torch.nn.functional.group_norm``: input ``(N, C, *)``, ``C`` divisible by
    ``num_groups``, per-channel ``weight``/``bias`` of shape ``(C,)``."""
    eps = _check(input, num_groups, weight, bias, eps)
    if input.numel() == 0:
        return empty_output(input, 1, weight, bias)  # nothing to normalize
    y, _, _ = _group_norm_op(_ncs(input), int(num_groups), weight, bias, eps)
    return y.reshape(input.shape)
