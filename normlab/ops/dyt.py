"""Dynamic Tanh, DyT (Zhu et al. 2025, "Transformers without Normalization").

    y = w · tanh(α · x) + b

``α`` is a learnable scalar (a one-element tensor, init 0.5 in the module); ``w`` and ``b`` have the
trailing shape they are applied over. No statistics: every element depends on itself alone. Half inputs
(bf16/fp16) are computed in fp32 and returned in the input dtype.

This file holds the reference (the spec), the custom op with its fake implementation and autograd
formula, and the functional API; the cpu backend's native op plugs in through :mod:`normlab.dispatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import dispatch
from normlab.ops._common import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_input,
    check_param,
    compute_dtype,
    custom_op_with_eager_twin,
    param_dtype_ok,
    plain_rows,
    row_sum,
    row_view,
    rows,
    zero_where_no_grad,
)


# ----------------------------------------------------------------------------------------------
# Reference (the spec): plain PyTorch on a (rows, n) view, n the size of the weight/bias
# ----------------------------------------------------------------------------------------------
def dyt_fwd_ref(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Reference forward on ``(rows, n)`` rows, ``alpha`` a one-element tensor."""
    c = compute_dtype(x.dtype)
    y = torch.tanh(alpha.to(c).reshape(()) * x.to(c))
    if weight is not None:
        y = y * weight.to(c)
    if bias is not None:
        y = y + bias.to(c)
    return y.to(x.dtype)


def dyt_bwd_ref(
    dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """With ``t = tanh(α x)`` and ``g = dy · w``: ``dx = g · α · (1 - t²)``, ``dα = Σ g · x · (1 - t²)``,
    ``dw = Σ_rows dy · t``, ``db = Σ_rows dy`` (contributions are 0 where ``dy == 0``)."""
    c = compute_dtype(x.dtype)
    xf, dyf, a = x.to(c), dy.to(c), alpha.to(c).reshape(())
    t = torch.tanh(a * xf)
    g = dyf if weight is None else dyf * weight.to(c)
    dt = g * (1 - t * t)
    dx = (dt * a).to(x.dtype)
    # a sum over every element: row_sum keeps it bitwise the same with 1 or 2 threads
    dalpha = row_sum(zero_where_no_grad(dyf, dt * xf).reshape(-1)).reshape(alpha.shape).to(alpha.dtype)
    dw = None if weight is None else zero_where_no_grad(dyf, dyf * t).sum(dim=0).to(weight.dtype)
    db = None if bias is None else dyf.sum(dim=0).to(bias.dtype)
    return dx, dalpha, dw, db


def _rows(x: Tensor, weight: Tensor | None, bias: Tensor | None):
    p = weight if weight is not None else bias
    n = 1 if p is None else p.numel()
    return rows(x, n), None if weight is None else weight.reshape(n), None if bias is None else bias.reshape(n)


def dyt_reference(input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """The spec, differentiable with plain autograd (no custom op)."""
    x, w, b = _rows(input, weight, bias)
    return dyt_fwd_ref(x, alpha, w, b).reshape(input.shape)


# ----------------------------------------------------------------------------------------------
# Custom op of the reference backend, on (rows, n) rows (no Python backend has a dyt kernel);
# the cpu backend's op is native (torch.ops.normlab.dyt)
# ----------------------------------------------------------------------------------------------
def _fake(x, alpha, weight, bias):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    return dyt_bwd_ref(dy, x, alpha, weight, bias)


_dyt_op = custom_op_with_eager_twin("normlab::py_dyt", dyt_fwd_ref, _fake, _setup, _backward)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _check(input, alpha, weight, bias):
    check_input(input)
    if not isinstance(alpha, Tensor) or alpha.numel() != 1:
        got = f"shape {list(alpha.shape)}" if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"expected alpha to be a one-element tensor (a learnable scalar), got {got}")
    allowed = (input.dtype, torch.float32) if input.dtype in HALF_DTYPES else (input.dtype,)
    if alpha.dtype not in FLOAT_DTYPES or alpha.dtype not in allowed:
        expected = " or ".join(map(str, allowed))
        raise TypeError(f"expected alpha of dtype {expected} (input is {input.dtype}), got {alpha.dtype}")
    if alpha.device != input.device:
        raise ValueError(f"expected alpha on {input.device} (the input's device), got {alpha.device}")
    p = weight if weight is not None else bias
    if p is None:
        return
    shape = tuple(p.shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"expected input with trailing shape {list(shape)} (the weight/bias shape), got shape {list(input.shape)}"
        )
    check_param(weight, "weight", shape, input)
    check_param(bias, "bias", shape, input)


def dyt(
    input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *,
    backend: str | None = None,
) -> Tensor:
    """DyT: ``y = weight · tanh(alpha · input) + bias``, weight/bias over the trailing dims of their shape."""
    # the common call: a backend's own front checks and computes it (None: not plainly one it serves)
    front = dispatch.front("dyt", backend)
    if front is not None and (y := front(input, alpha, weight, bias)) is not None:
        return y
    # the common call of a backend without a front, plainly valid: the module's scalar alpha, vectors of the last dim
    key = (
        plain_rows(input, weight.shape, weight, bias, (alpha.dtype, alpha.device))
        if isinstance(weight, Tensor) and isinstance(alpha, Tensor) and alpha.numel() == 1 else None
    )
    if key is not None:
        op = dispatch.cached_native("dyt", key, backend)
        if op is dispatch.UNDECIDED:
            alpha_dtype, alpha_device = key[-1]  # checked once per key: the full checks' rule for a parameter
            plain_alpha = param_dtype_ok(alpha_dtype, input.dtype) and alpha_device == input.device
            op = (
                dispatch.native_for("dyt", key, input, backend, alpha=alpha, weight=weight, bias=bias)
                if plain_alpha else None
            )
        if op is not None:
            return op(input, alpha, weight, bias)
    _check(input, alpha, weight, bias)
    p = weight if weight is not None else bias
    # rows of the parameters' size; without parameters any split will do: the input's own last dim
    x = row_view(input, p.numel() if p is not None else input.shape[-1] if input.dim() else 1)
    w, b = (None if t is None else t.reshape(-1) for t in (weight, bias))
    name = dispatch.select("dyt", x, backend, alpha=alpha, weight=w, bias=b) if x.numel() else dispatch.REFERENCE
    op = dispatch.native(name, "dyt")
    if op is not None:
        return op(x, alpha, w, b).view(input.shape)
    x, w, b = _rows(input, weight, bias)
    return _dyt_op(x, alpha, w, b).reshape(input.shape)
