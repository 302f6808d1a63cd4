"""BatchNorm over the feature dim, with running statistics and optional cross-process sync.

    training:  y = (x - mean_B) / sqrt(var_B + eps) * w + b,    mean_B, var_B over every dim but C
               running_mean ← (1 - m)·running_mean + m·mean_B
               running_var  ← (1 - m)·running_var  + m·var_B · n / (n - 1)      (unbiased, as torch)
    eval:      y = (x - running_mean) / sqrt(running_var + eps) * w + b

``var_B`` is the biased batch variance (divide by the count ``n`` of values per channel), computed
corrected two-pass in fp32 (fp64 for fp64 input), never as ``E[x²] - E[x]²``. ``momentum=None`` is
the cumulative moving average ``m = 1 / num_batches_tracked``. Layouts: ``"NCL"`` has the features at
dim 1 of ``(N, C)`` / ``(N, C, L, …)`` (``torch.nn.functional.batch_norm``); ``"NLC"`` has them last,
``(N, L, C)`` tokens. Internally both are viewed, without a copy, as ``(A, C, B)``, reduced over dims
0 and 2.

``process_group=`` synchronizes the training statistics across processes (SyncBatchNorm): each process
all-reduces ``(count, sum)``, then its sum of squared deviations about the common mean (Chan's parallel
formula: ``M2_i + n_i (mean_i - mean)²``) and of deviations (the rounding error of the common mean), so
it works on any ``torch.distributed`` backend, gloo included.

This file holds the reference (the spec), the custom op with its fake implementation and autograd
formula (served by the reference alone), the synchronized autograd function and the functional API.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab.ops._common import (
    as_float,
    check_choice,
    check_eps,
    check_input,
    check_param,
    compute_dtype,
    custom_op_with_eager_twin,
    empty_output,
    empty_stats,
    row_sum,
    zero_where_no_grad,
)

LAYOUTS = ("NCL", "NLC")


def as_acb(x: Tensor, layout: str) -> Tensor:
    """View ``x`` as ``(A, C, B)`` with the features at dim 1: NCL ``(N, C, *)`` → ``(N, C, prod(*))``,
    NLC ``(*, C)`` → ``(prod(*), C, 1)``. Contiguous, so that the statistics do not depend on the memory
    layout of the input (channels-last, transposed…): torch reduces strided data in another order."""
    if layout == "NCL":
        return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).contiguous()
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1], 1).contiguous()


def _bcast(v: Tensor) -> Tensor:
    return v[None, :, None]


def channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum of ``(A, C, B)`` over dims 0 and 2, bitwise the same with 1 or 2 threads. torch
    parallelizes over the channels, except for a single channel: one long reduction that it splits
    across threads — summed with :func:`row_sum` instead."""
    if t.shape[1] == 1:
        return row_sum(t.reshape(-1)).reshape(1)
    return t.sum(dim=(0, 2))


def channel_mean(t: Tensor) -> Tensor:
    return channel_sum(t) / (t.shape[0] * t.shape[2])


# ----------------------------------------------------------------------------------------------
# Reference (the spec): plain PyTorch on (A, C, B) views
# ----------------------------------------------------------------------------------------------
def batch_stats_ref(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(x - mean, mean, var)`` of ``(A, C, B)`` over dims 0 and 2, in the compute dtype.

    Corrected two-pass: ``d = x - mean`` is exact near the mean (Sterbenz), so ``mean(d)`` is the
    rounding error of the stored mean; removing it keeps the deviations accurate to the spread of the
    channel rather than to ulp(mean). Variance biased: ``mean(d²)``."""
    xf = x.to(compute_dtype(x.dtype))
    rough = channel_mean(xf)
    d = xf - _bcast(rough)
    correction = channel_mean(d)
    d = d - _bcast(correction)
    return d, rough + correction, channel_mean(d.square())


def deviations(x: Tensor, mean: Tensor, correction: Tensor | None | str = None) -> Tensor:
    """``x - mean`` in the compute dtype. ``correction="batch"`` removes the rounding error of a batch
    mean as :func:`batch_stats_ref` does; a tensor is that error already known (synchronized statistics);
    ``None`` keeps ``mean`` as given (running statistics are exact constants)."""
    c = compute_dtype(x.dtype)
    d = x.to(c) - _bcast(mean.to(c))
    if isinstance(correction, str):
        return d - _bcast(channel_mean(d))
    return d if correction is None else d - _bcast(correction)


def normalize(
    d: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dtype: torch.dtype
) -> Tensor:
    """``y = d · rsqrt(var + eps) · w + b`` from the deviations ``d``, returned in ``dtype``."""
    c = d.dtype
    y = d * _bcast(torch.rsqrt(var.to(c) + eps))
    if weight is not None:
        y = y * _bcast(weight.to(c))
    if bias is not None:
        y = y + _bcast(bias.to(c))
    return y.to(dtype)


def batch_norm_fwd_ref(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward on ``(A, C, B)``: ``(y, mean, var)``, the per-channel statistics it normalized with
    (the batch's in training, copies of the running ones in eval) in the compute dtype."""
    if training:
        d, mean, var = batch_stats_ref(x)
    else:
        c = compute_dtype(x.dtype)
        mean, var = running_mean.to(dtype=c, copy=True), running_var.to(dtype=c, copy=True)
        d = deviations(x, mean)
    return normalize(d, var, weight, bias, eps, x.dtype), mean, var


def batch_norm_bwd_ref(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
    training: bool, reduce=None, correction: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Analytic backward on ``(A, C, B)``. With ``x̂ = (x - mean)·rstd``, ``g = dy``, sums over dims 0, 2:

    - eval (statistics are constants): ``dx = g · w · rstd``;
    - training: ``dx = w · rstd · (g - Σg / n - x̂ · Σ(g x̂) / n)``;
    - ``dw = Σ g x̂``, ``db = Σ g`` (the local sums: a data-parallel wrapper averages them).

    ``reduce(sum_g, sum_gx) -> (sum_g, sum_gx, n)`` sums the two per-channel vectors over processes
    (sync; ``correction`` is then the cross-process correction of ``mean``). Under grad mode (double
    backward) the batch statistics are recomputed from ``x``."""
    c = compute_dtype(x.dtype)
    if training and torch.is_grad_enabled() and reduce is None:
        d, mean, var = batch_stats_ref(x)
    else:
        d = deviations(x, mean, (correction if reduce is not None else "batch") if training else None)
    g = dy.to(c)
    rstd = torch.rsqrt(var.to(c) + eps)
    xhat = d * _bcast(rstd)
    gx = zero_where_no_grad(g, g * xhat)
    sum_g, sum_gx = channel_sum(g), channel_sum(gx)
    dw = None if weight is None else sum_gx.to(weight.dtype)
    db = None if bias is None else sum_g.to(bias.dtype)
    scale = rstd if weight is None else rstd * weight.to(c)
    if not training:
        return (g * _bcast(scale)).to(x.dtype), dw, db
    n = x.shape[0] * x.shape[2]
    if reduce is not None:
        sum_g, sum_gx, n = reduce(sum_g, sum_gx)
    dx = _bcast(scale) * (g - _bcast(sum_g / n) - xhat * _bcast(sum_gx / n))
    return dx.to(x.dtype), dw, db


def batch_norm_reference(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
    bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
    *, layout: str = "NCL", num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """The spec, differentiable with plain autograd (no custom op); updates the running statistics."""
    x = as_acb(input, layout)
    y, mean, var = batch_norm_fwd_ref(x, weight, bias, running_mean, running_var, training, eps)
    if training:
        _update_running(running_mean, running_var, num_batches_tracked, mean, var, momentum, x.shape[0] * x.shape[2])
    return y.reshape(input.shape)


def _update_running(running_mean, running_var, num_batches_tracked, mean, var, momentum, n):
    """In place, outside autograd, as torch: the EMA (or cumulative average) of mean and unbiased var."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is None and running_var is None:
            return
        c = mean.dtype
        m = 1.0 / num_batches_tracked.to(c) if momentum is None else momentum
        if running_mean is not None:
            running_mean.copy_((running_mean.to(c) * (1 - m) + mean.detach() * m).to(running_mean.dtype))
        if running_var is not None:
            unbiased = var.detach() * (n / (n - 1)) if n > 1 else torch.full_like(var, math.nan)
            running_var.copy_((running_var.to(c) * (1 - m) + unbiased * m).to(running_var.dtype))


# ----------------------------------------------------------------------------------------------
# Custom op: the reference forward, on the (A, C, B) view (no backend has a batch_norm kernel).
# It returns the statistics it normalized with; batch_norm() updates the running ones outside it,
# since torch.library gives no autograd formula to an op that mutates its inputs.
# ----------------------------------------------------------------------------------------------
def _fake(x, weight, bias, running_mean, running_var, training, eps):
    return torch.empty_like(x), empty_stats(x, x.shape[1]), empty_stats(x, x.shape[1])


def _setup(ctx, inputs, output):
    x, weight, bias, _running_mean, _running_var, training, eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.options = (training, eps)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    training, eps = ctx.options
    dx, dw, db = batch_norm_bwd_ref(dy, x, weight, bias, mean, var, eps, training)
    return dx, dw, db, None, None, None, None


_batch_norm_op = custom_op_with_eager_twin("normlab::batch_norm", batch_norm_fwd_ref, _fake, _setup, _backward)


# ----------------------------------------------------------------------------------------------
# Synchronized statistics across processes (training only)
# ----------------------------------------------------------------------------------------------
def sync_batch_stats(x: Tensor, process_group) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per-channel common mean, its correction, biased variance and total count of ``(A, C, B)`` over
    every process of the group (the mean is ``mean + correction``).

    Two all-reduces of sums. ``(n_i, n_i·mean_i)`` gives the common mean ``m``; then Chan et al.'s
    parallel formula: with ``δ_i = mean_i - m``, ``Σ(x - m)² = Σ_i M2_i + n_i δ_i²`` and ``Σ(x - m) =
    Σ_i n_i δ_i``; the latter over ``n`` is the rounding error of ``m`` (the correction of the
    corrected two-pass), and ``var = Σ(x - m)² / n - correction²``. Local ``mean_i``, ``M2_i`` are
    corrected two-pass themselves."""
    import torch.distributed as dist

    c = compute_dtype(x.dtype)
    n_local = x.shape[0] * x.shape[2]
    if n_local > 0:
        _, local_mean, local_var = batch_stats_ref(x)
    else:
        local_mean = local_var = x.new_zeros((x.shape[1],), dtype=c)
    count_sum = torch.cat([local_mean.new_full((1,), float(n_local)), local_mean * n_local])
    dist.all_reduce(count_sum, group=process_group)
    n = int(count_sum[0].item())
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {n} over the process group")
    mean = count_sum[1:] / n
    delta = local_mean - mean
    sums = torch.cat([n_local * delta, local_var * n_local + n_local * delta.square()])
    dist.all_reduce(sums, group=process_group)
    correction, m2 = sums[: mean.numel()] / n, sums[mean.numel():]
    return mean, correction, m2 / n - correction.square(), n


# An autograd.Function, not a custom op: a ProcessGroup cannot be an argument of an operator schema.
class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, process_group):
        mean, correction, var, n = sync_batch_stats(x, process_group)
        ctx.save_for_backward(x, weight, bias, mean, correction, var)
        ctx.options = (eps, process_group, n)
        y = normalize(deviations(x, mean, correction), var, weight, bias, eps, x.dtype)
        mean = mean + correction
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        import torch.distributed as dist

        x, weight, bias, mean, correction, var = ctx.saved_tensors
        eps, process_group, n = ctx.options

        def reduce(sum_g, sum_gx):
            both = torch.cat([sum_g, sum_gx])
            dist.all_reduce(both, group=process_group)
            return both[: sum_g.numel()], both[sum_g.numel():], n

        dx, dw, db = batch_norm_bwd_ref(dy, x, weight, bias, mean, var, eps, True, reduce, correction)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _check(input, running_mean, running_var, weight, bias, training, momentum, eps, layout, num_batches_tracked):
    check_input(input)
    check_choice(layout, "layout", LAYOUTS)
    if input.dim() < 2:
        expected = "(N, C) or (N, C, L, ...)" if layout == "NCL" else "(N, C) or (N, L, C)"
        raise ValueError(f"expected input of shape {expected} for layout {layout!r}, got shape {list(input.shape)}")
    features = input.shape[1] if layout == "NCL" else input.shape[-1]
    for p, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        check_param(p, name, (features,), input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    for p, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if p is not None and p.requires_grad:
            raise ValueError(f"{name} is a statistics buffer, updated in place: it must not require grad")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "expected running_mean and running_var tensors when training=False (eval uses running statistics)"
        )
    if momentum is not None and not (0.0 <= as_float(momentum, "momentum", "None or a number in [0, 1]") <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) expects a num_batches_tracked tensor")
    is_counter = isinstance(num_batches_tracked, Tensor) and num_batches_tracked.numel() == 1
    if num_batches_tracked is not None and not is_counter:
        raise ValueError("expected num_batches_tracked to be a one-element tensor (a counter)")
    return check_eps(eps)


def batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
    bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
    *, layout: str = "NCL", num_batches_tracked: Tensor | None = None, process_group=None,
) -> Tensor:
    """BatchNorm as ``torch.nn.functional.batch_norm``, with a channels-last ``layout="NLC"``.

    In training, normalizes with the batch statistics and updates ``running_mean``/``running_var`` in
    place (when given); ``num_batches_tracked`` (optional counter, as the module's buffer) is incremented,
    and ``momentum=None`` then uses the cumulative average ``1 / num_batches_tracked``. In eval, normalizes
    with the running statistics. ``process_group`` (training only) synchronizes the statistics across
    the processes of that ``torch.distributed`` group.
    """
    eps = _check(input, running_mean, running_var, weight, bias, training, momentum, eps, layout, num_batches_tracked)
    x = as_acb(input, layout)
    n = x.shape[0] * x.shape[2]
    if training and process_group is not None:
        y, mean, var, n = _SyncBatchNorm.apply(x, weight, bias, eps, process_group)
        _update_running(running_mean, running_var, num_batches_tracked, mean, var, momentum, n)
        return y.reshape(input.shape)
    if training and n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if input.numel() == 0:  # nothing to normalize, no statistics to record (as torch)
        if training and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        return empty_output(input, 1 if layout == "NCL" else input.dim() - 1, weight, bias)
    stats = (None, None) if training else (running_mean, running_var)  # eval normalizes with the running ones
    y, mean, var = _batch_norm_op(x, weight, bias, *stats, bool(training), eps)
    if training:
        _update_running(running_mean, running_var, num_batches_tracked, mean, var, momentum, n)
    return y.reshape(input.shape)
