"""LayerNorm and fused residual-add + LayerNorm.

    y = (x − mean(x)) / sqrt(var(x) + eps) · w + b,   var biased: mean((x − mean(x))²)

Statistics run over the trailing ``normalized_shape`` and accumulate in fp32 (fp64 for fp64 input);
the variance is computed from deviations (corrected two-pass: ``d = x − mean``, then ``d − mean(d)``
removes the rounding error of the stored mean), never as ``E[x²] − E[x]²``, which cancels
catastrophically (negative variances) once the mean is large against the spread (mean 1e4 in fp32).
bf16/fp16 input is computed in fp32 and cast once at the end, like ``F.layer_norm``. The forward saves
only ``mean`` and ``rstd`` per row.

This file holds the reference (the spec), the custom ops with their fake implementations and
autograd formulas, and the functional API; fast kernels plug in through :mod:`normlab.dispatch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normlab import dispatch
from normlab.ops._common import (
    check_eps,
    check_input,
    check_param,
    check_residual_dtype,
    check_same,
    compute_dtype,
    custom_op_with_eager_twin,
    empty_stats,
    flat_param,
    forward_into,
    fused_add,
    normalized_size,
    plain_rows,
    row_mean,
    row_view,
    rows,
    write_out,
    zero_where_no_grad,
)

_INF = math.inf


# ----------------------------------------------------------------------------------------------
# Reference (the spec): plain PyTorch on (rows, n) views
# ----------------------------------------------------------------------------------------------
def _deviations(x: Tensor, mean: Tensor) -> Tensor:
    """``x − mean`` corrected for the rounding of ``mean``: ``d − mean(d)`` with ``d = x − mean``.

    Near the mean ``x − mean`` is exact (Sterbenz), so ``mean(d)`` is the error of the rounded mean;
    removing it keeps the deviations accurate to the spread of the row instead of to ulp(mean)
    (mean 10, spread 1e-3 in fp32: 2e-8 instead of up to 5e-4 of output error)."""
    d = x - mean[:, None]
    return d - row_mean(d, keepdim=True)


def _stats_ref(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(x − mean, mean, rstd)`` in the compute dtype: corrected two-pass, biased variance
    ``var = mean((x − mean)²)``."""
    xc = x.to(compute_dtype(x.dtype))
    rough = row_mean(xc)
    d = xc - rough[:, None]
    correction = row_mean(d)
    d = d - correction[:, None]
    return d, rough + correction, torch.rsqrt(row_mean(d.square()) + eps)


def layer_norm_fwd_ref(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward on a ``(rows, n)`` input: returns ``(y, mean, rstd)``."""
    d, mean, rstd = _stats_ref(x, eps)
    c = mean.dtype
    y = d * rstd[:, None]
    if weight is not None:
        y = y * weight.to(c)
    if bias is not None:
        y = y + bias.to(c)
    return y.to(x.dtype), mean, rstd


def layer_norm_bwd_ref(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    eps: float, dsum: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Reference backward on ``(rows, n)`` views, in the compute dtype.

    With ``g = dy · w`` and ``x̂ = (x − mean) · rstd`` (deviations corrected as in the forward):
    ``dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))`` (+ ``dsum`` for the fused add),
    ``dw = Σ_rows dy · x̂`` (exactly 0 where ``dy == 0``), ``db = Σ_rows dy``.
    Under grad mode (double backward) ``mean`` and ``rstd`` are recomputed from ``x``.
    """
    c = compute_dtype(x.dtype)
    if torch.is_grad_enabled():
        d, mean, rstd = _stats_ref(x, eps)
    else:
        d = _deviations(x.to(c), mean.to(c))
    dyf = dy.to(c)
    r = rstd.to(c)[:, None]
    xhat = d * r
    g = dyf if weight is None else dyf * weight.to(c)
    dx = r * (g - row_mean(g, keepdim=True) - xhat * row_mean(g * xhat, keepdim=True))
    if dsum is not None:
        dx = dx + dsum.to(c)
    dw = None if weight is None else zero_where_no_grad(dyf, dyf * xhat).sum(dim=0).to(weight.dtype)
    db = None if bias is None else dyf.sum(dim=0).to(bias.dtype)
    return dx.to(x.dtype), dw, db


def layer_norm_reference(
    x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
) -> Tensor:
    """The spec, differentiable with plain autograd (no custom op): what every backend must match."""
    _shape, n = normalized_size(x, normalized_shape)
    y, _, _ = layer_norm_fwd_ref(rows(x, n), flat_param(weight, n), flat_param(bias, n), float(eps))
    return y.reshape(x.shape)


def add_layer_norm_reference(
    x: Tensor, residual: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5, *, residual_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The spec of the fused op: ``s = x + residual`` (added in the compute dtype, stored in
    ``residual_dtype``), then ``(layer_norm(s)`` in the input dtype``, s)``."""
    s = fused_add(x, residual, residual_dtype)
    y = layer_norm_reference(s, normalized_shape, weight, bias, eps)
    return y.to(x.dtype), s


# ----------------------------------------------------------------------------------------------
# Custom ops of the Python backends: the backend's kernels (normlab/kernels/contract.py) or the
# reference, on contiguous (rows, n) rows; the cpu backend's ops are native (torch.ops.normlab.*)
# ----------------------------------------------------------------------------------------------
def _fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == dispatch.REFERENCE:
        return layer_norm_fwd_ref(x, weight, bias, eps)
    return dispatch.kernel(backend, "layer_norm_fwd")(x, weight, bias, eps)


def _bwd(backend: str, dy, x, weight, bias, mean, rstd, eps, dsum=None):
    """Under grad mode (double backward) the differentiable reference, which recomputes mean and rstd from x."""
    if backend == dispatch.REFERENCE or torch.is_grad_enabled():
        return layer_norm_bwd_ref(dy, x, weight, bias, mean, rstd, eps, dsum)
    # incoming gradients may be strided (e.g. the expanded ones of a .sum()); kernels take contiguous rows
    dsum = None if dsum is None else dsum.contiguous()
    return dispatch.kernel(backend, "layer_norm_bwd")(dy.contiguous(), x, weight, bias, mean, rstd, dsum)


def _fake(x, weight, bias, eps, backend):
    return torch.empty_like(x), empty_stats(x), empty_stats(x)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.options = (eps, backend)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients (they have none)


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return (None,) * 5
    x, weight, bias, mean, rstd = ctx.saved_tensors
    eps, backend = ctx.options
    dx, dw, db = _bwd(backend, dy, x, weight, bias, mean, rstd, eps)
    return dx, dw, db, None, None


_layer_norm_op = custom_op_with_eager_twin("normlab::py_layer_norm", _fwd, _fake, _setup, _backward)


def _add_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    residual_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == dispatch.REFERENCE:
        s = fused_add(x, residual, residual_dtype)
        y, mean, rstd = layer_norm_fwd_ref(s, weight, bias, eps)
        return y.to(x.dtype), s, mean, rstd
    return dispatch.kernel(backend, "add_layer_norm_fwd")(x, residual, weight, bias, eps, residual_dtype)


def _add_fake(x, residual, weight, bias, eps, residual_dtype, backend):
    stats = empty_stats(x, dtype=residual_dtype)  # the statistics of the stored sum s (fp64 when it is fp64)
    return torch.empty_like(x), torch.empty_like(x, dtype=residual_dtype), stats, stats.clone()


def _add_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, _residual_dtype, backend = inputs
    ctx.save_for_backward(output[1], weight, bias, output[2], output[3])
    ctx.options = (eps, backend, x.dtype, residual.dtype)
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zero tensors


def _add_backward(ctx, dy, dsum, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    eps, backend, x_dtype, r_dtype = ctx.options
    if dy is None:  # only s was used: its gradient passes through the add
        return None if dsum is None else dsum.to(x_dtype), None if dsum is None else dsum.to(r_dtype), *(None,) * 5
    ds, dw, db = _bwd(backend, dy.to(s.dtype), s, weight, bias, mean, rstd, eps, dsum)
    return ds.to(x_dtype), ds.to(r_dtype), dw, db, None, None, None


_add_layer_norm_op = custom_op_with_eager_twin(
    "normlab::py_add_layer_norm", _add_fwd, _add_fake, _add_setup, _add_backward
)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _check(x, normalized_shape, weight, bias, eps):
    check_input(x)
    shape, n = normalized_size(x, normalized_shape)
    check_param(weight, "weight", shape, x)
    check_param(bias, "bias", shape, x)
    return n, check_eps(eps)


def layer_norm(
    input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5, *, backend: str | None = None, out: Tensor | None = None,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape``: ``y = (x − mean) / sqrt(var + eps) · w + b``.

    Mirrors ``torch.nn.functional.layer_norm`` (biased variance). ``out=`` writes into a preallocated
    tensor (inference only, like torch).
    """
    # the common call: a backend's own front checks and computes it (None: not plainly one it serves)
    front = dispatch.front("layer_norm", backend) if out is None else None
    if front is not None and (y := front(input, normalized_shape, weight, bias, eps)) is not None:
        return y
    # the common call of a backend without a front, plainly valid: no other check, rows along the last dim as they are
    key = plain_rows(input, normalized_shape, weight, bias) if out is None and type(eps) is float else None
    if key is not None and 0.0 < eps < _INF:
        op = dispatch.cached_native("layer_norm", key, backend)
        if op is dispatch.UNDECIDED:
            op = dispatch.native_for("layer_norm", key, input, backend, weight=weight, bias=bias)
        if op is not None:
            return op(input, weight, bias, eps)[0]
    n, eps = _check(input, normalized_shape, weight, bias, eps)
    x, w, b = row_view(input, n), flat_param(weight, n), flat_param(bias, n)
    name = dispatch.select("layer_norm", x, backend, weight=w, bias=b) if x.numel() else dispatch.REFERENCE
    op = dispatch.native(name, "layer_norm")
    if op is not None:  # rows made contiguous, autograd and all, in the backend's own operator
        if out is not None:
            into = dispatch.native(name, "layer_norm_into")
            return write_out(out, input, n, lambda o: into(x, w, b, eps, o), weight, bias)
        return op(x, w, b, eps)[0].view(input.shape)
    x = x.contiguous()
    if out is not None:
        fill = forward_into(name, "layer_norm_fwd", layer_norm_fwd_ref, x, w, b, eps)
        return write_out(out, input, n, fill, weight, bias)
    y, _, _ = _layer_norm_op(x, w, b, eps, name)
    return y.reshape(input.shape)


def add_layer_norm(
    input: Tensor, residual: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5, *, residual_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + LayerNorm: ``s = input + residual`` (stored in ``residual_dtype``, default the
    input dtype), returns ``(layer_norm(s), s)`` — one read of each input, one write of each output."""
    # the common call: a backend's own front checks and computes it (None: not plainly one it serves)
    front = dispatch.front("add_layer_norm", backend) if residual_dtype is None else None
    if front is not None and (pair := front(input, residual, normalized_shape, weight, bias, eps)) is not None:
        return pair
    # the common call of a backend without a front, plainly valid: the residual like the input, the sum in its dtype
    key = (
        plain_rows(input, normalized_shape, weight, bias, None, residual)
        if type(eps) is float and residual_dtype is None else None
    )
    if key is not None and 0.0 < eps < _INF:
        op = dispatch.cached_native("add_layer_norm", key, backend)
        if op is dispatch.UNDECIDED:
            op = dispatch.native_for(
                "add_layer_norm", key, input, backend, residual=residual, weight=weight, bias=bias,
                residual_dtype=input.dtype,
            )
        if op is not None:
            y, s, _, _ = op(input, residual, weight, bias, eps, input.dtype)
            return y, s
    n, eps = _check(input, normalized_shape, weight, bias, eps)
    check_same(input, residual, "input", "residual")
    residual_dtype = check_residual_dtype(residual_dtype, input)
    x, r, w, b = row_view(input, n), row_view(residual, n), flat_param(weight, n), flat_param(bias, n)
    name = (
        dispatch.select("add_layer_norm", x, backend, residual=r, weight=w, bias=b, residual_dtype=residual_dtype)
        if x.numel() else dispatch.REFERENCE
    )
    op = dispatch.native(name, "add_layer_norm")
    if op is not None:
        y, s, _, _ = op(x, r, w, b, eps, residual_dtype)
        return y.view(input.shape), s.view(input.shape)
    x, r = x.contiguous(), r.contiguous()
    y, s, _, _ = _add_layer_norm_op(x, r, w, b, eps, residual_dtype, name)
    return y.reshape(input.shape), s.reshape(input.shape)
