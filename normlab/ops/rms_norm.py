"""RMSNorm and fused residual-add + RMSNorm.

    y = x / sqrt(mean(x[..., :k]²) + eps) * (offset + w),   k = ceil(n · partial)

``partial`` < 1 is pRMSNorm (Zhang & Sennrich 2019): the RMS is estimated from the first k elements.
``offset=1`` with ``casting="gemma"`` is Gemma's ``(1 + w)`` RMSNorm. Casting modes:

- ``"llama"``: ``x · rstd`` in fp32, cast to the input dtype, then multiplied by ``(offset + w)``;
- ``"gemma"``: everything in fp32, ``(offset + w)`` included, cast at the end (= ``F.rms_norm``);
- ``"none"``: input dtype throughout; only the mean of squares accumulates in fp32.

``eps=None`` follows torch: float32's machine epsilon for fp32/bf16/fp16 input, float64's for fp64.
Statistics always accumulate in fp32 (fp64 for fp64 input). The forward saves only ``rstd`` per row.

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
    FLOAT_DTYPES,
    HALF_DTYPES,
    as_float,
    check_choice,
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
    row_sum,
    row_view,
    rows,
    write_out,
    zero_where_no_grad,
)

CASTING_MODES = ("llama", "gemma", "none")
_CASTINGS = frozenset(CASTING_MODES)
_INF = math.inf
#: eps=None: the machine epsilon of the compute dtype (torch's rule).
_DEFAULT_EPS = {t: torch.finfo(torch.float64 if t == torch.float64 else torch.float32).eps for t in FLOAT_DTYPES}


def resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    """torch's rule: ``eps=None`` → machine epsilon of the compute dtype (fp32, or fp64 for fp64)."""
    return _DEFAULT_EPS[dtype] if eps is None else check_eps(eps)


def check_offset(offset: float) -> None:
    """The scale's offset (Gemma's 1 in ``offset + w``) is a finite number."""
    if not (-math.inf < as_float(offset, "offset", "a finite number") < math.inf):
        raise ValueError(f"offset must be a finite number, got {offset}")


def partial_size(n: int, partial: float | None) -> int:
    """Number of leading elements the RMS is estimated from: ``ceil(n · partial)`` of the decimal as
    written — binary floats put ``100 * 0.07`` at 7.000000000000001, so an excess below 10⁻¹² of the
    product (float noise is ≈ 10⁻¹⁶) does not count: ``partial_size(100, 0.07)`` is 7."""
    if partial is None:
        return n
    p = as_float(partial, "partial", "None or a number in (0, 1]")
    if not (0.0 < p <= 1.0):
        raise ValueError(f"partial must be in (0, 1], got {partial}")
    size = n * p
    return max(1, math.ceil(size - size * 1e-12)) if n > 0 else 0


# ----------------------------------------------------------------------------------------------
# Reference (the spec): plain PyTorch on (rows, n) views
# ----------------------------------------------------------------------------------------------
def _rstd_ref(x: Tensor, eps: float, k: int) -> Tensor:
    xs = x[:, :k].to(compute_dtype(x.dtype))
    return torch.rsqrt(row_mean(xs.pow(2)) + eps)


def rms_norm_fwd_ref(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int
) -> tuple[Tensor, Tensor]:
    """Reference forward on a ``(rows, n)`` input: returns ``(y, rstd)``."""
    rstd = _rstd_ref(x, eps, k)
    return rms_norm_apply_ref(x, weight, rstd, casting, offset), rstd


def rms_norm_apply_ref(x: Tensor, weight: Tensor | None, rstd: Tensor, casting: str, offset: float) -> Tensor:
    """``y`` from the per-row ``rstd`` with the casting mode's roundings (the reference's second half:
    a kernel given the same rstd must agree bitwise)."""
    if casting == "none":
        y = x * rstd.to(x.dtype)[:, None]
        if weight is not None:
            y = y * (weight + offset).to(x.dtype)
        return y
    y = x.to(rstd.dtype) * rstd[:, None]
    if weight is None:
        return y.to(x.dtype)
    if casting == "llama":
        return y.to(x.dtype) * (weight.to(x.dtype) + offset)
    return (y * (weight.to(rstd.dtype) + offset)).to(x.dtype)


def rms_norm_bwd_ref(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, k: int, eps: float,
    dsum: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Reference backward on ``(rows, n)`` views, in the compute dtype.

    With ``g = dy · (offset + w)`` and ``x̂ = x · rstd``:
    ``dx_j = rstd · (g_j − [j < k] · x̂_j · Σ_{i<n} g_i x̂_i / k)`` (+ ``dsum`` for the fused add),
    ``dw = Σ_rows dy · x̂``. Under grad mode (double backward) ``rstd`` is recomputed from ``x``.
    """
    c = compute_dtype(x.dtype)
    if torch.is_grad_enabled():
        rstd = _rstd_ref(x, eps, k)
    xf, dyf = x.to(c), dy.to(c)
    r = rstd.to(c)[:, None]
    xhat = xf * r
    g = dyf if weight is None else dyf * (weight.to(c) + offset)
    proj = row_sum(g * xhat, keepdim=True) / k
    dx = r * g
    if k == x.shape[1]:
        dx = dx - r * xhat * proj
    else:
        dx = torch.cat([dx[:, :k] - r * xhat[:, :k] * proj, dx[:, k:]], dim=1)
    if dsum is not None:
        dx = dx + dsum.to(c)
    dw = None if weight is None else zero_where_no_grad(dyf, dyf * xhat).sum(dim=0).to(weight.dtype)
    return dx.to(x.dtype), dw


def rms_norm_reference(
    x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None, eps: float | None = None,
    *, casting: str = "llama", offset: float = 0.0, partial: float | None = None, bias: Tensor | None = None,
) -> Tensor:
    """The spec, differentiable with plain autograd (no custom op): what every backend must match."""
    _shape, n = normalized_size(x, normalized_shape)
    x_rows, w, row_eps = rows(x, n), flat_param(weight, n), resolve_eps(eps, x.dtype)
    y, _ = rms_norm_fwd_ref(x_rows, w, row_eps, casting, float(offset), partial_size(n, partial))
    return add_bias(y, flat_param(bias, n)).reshape(x.shape)


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """RMSNorm's optional shift: ``y + b`` added in the compute dtype and rounded to y's dtype (what ``y + b``
    gives in torch when both are in y's dtype)."""
    if bias is None:
        return y
    c = compute_dtype(y.dtype)
    return (y.to(c) + bias.to(c)).to(y.dtype)


def add_rms_norm_reference(
    x: Tensor, residual: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    eps: float | None = None, *, casting: str = "llama", offset: float = 0.0, partial: float | None = None,
    residual_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The spec of the fused op: ``s = x + residual`` (added in the compute dtype, stored in
    ``residual_dtype``), then ``(rms_norm(s)`` in the input dtype``, s)``."""
    s = fused_add(x, residual, residual_dtype)
    y = rms_norm_reference(s, normalized_shape, weight, eps, casting=casting, offset=offset, partial=partial)
    return y.to(x.dtype), s


# ----------------------------------------------------------------------------------------------
# Custom ops of the Python backends: the backend's kernels (normlab/kernels/contract.py) or the
# reference, on contiguous (rows, n) rows; the cpu backend's ops are native (torch.ops.normlab.*)
# ----------------------------------------------------------------------------------------------
def _fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int, backend: str
) -> tuple[Tensor, Tensor]:
    if backend == dispatch.REFERENCE:
        return rms_norm_fwd_ref(x, weight, eps, casting, offset, k)
    return dispatch.kernel(backend, "rms_norm_fwd")(x, weight, eps, casting, offset, k)


def _bwd(backend: str, dy, x, weight, rstd, offset, k, eps, dsum=None):
    """Under grad mode (double backward) the differentiable reference, which recomputes rstd from x."""
    if backend == dispatch.REFERENCE or torch.is_grad_enabled():
        return rms_norm_bwd_ref(dy, x, weight, rstd, offset, k, eps, dsum)
    # incoming gradients may be strided (the expanded ones of a .sum()); kernels take contiguous rows
    dsum = None if dsum is None else dsum.contiguous()
    return dispatch.kernel(backend, "rms_norm_bwd")(dy.contiguous(), x, weight, rstd, offset, k, dsum)


def _fake(x, weight, eps, casting, offset, k, backend):
    return torch.empty_like(x), empty_stats(x)


def _setup(ctx, inputs, output):
    x, weight, eps, _casting, offset, k, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.options = (offset, k, eps, backend)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensor for rstd's gradient (it has none)


def _backward(ctx, dy, _drstd):
    if dy is None:
        return (None,) * 7
    x, weight, rstd = ctx.saved_tensors
    offset, k, eps, backend = ctx.options
    dx, dw = _bwd(backend, dy, x, weight, rstd, offset, k, eps)
    return dx, dw, None, None, None, None, None


_rms_norm_op = custom_op_with_eager_twin("normlab::py_rms_norm", _fwd, _fake, _setup, _backward)


def _add_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int,
    residual_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == dispatch.REFERENCE:
        s = fused_add(x, residual, residual_dtype)
        y, rstd = rms_norm_fwd_ref(s, weight, eps, casting, offset, k)
        return y.to(x.dtype), s, rstd
    return dispatch.kernel(backend, "add_rms_norm_fwd")(x, residual, weight, eps, casting, offset, k, residual_dtype)


def _add_fake(x, residual, weight, eps, casting, offset, k, residual_dtype, backend):
    # the statistics are those of the stored sum s (fp64 when it is fp64)
    return torch.empty_like(x), torch.empty_like(x, dtype=residual_dtype), empty_stats(x, dtype=residual_dtype)


def _add_setup(ctx, inputs, output):
    x, residual, weight, eps, _casting, offset, k, _residual_dtype, backend = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.options = (offset, k, eps, backend, x.dtype, residual.dtype)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zero tensors


def _add_backward(ctx, dy, dsum, _drstd):
    s, weight, rstd = ctx.saved_tensors
    offset, k, eps, backend, x_dtype, r_dtype = ctx.options
    if dy is None:  # only s was used: its gradient passes through the add
        return None if dsum is None else dsum.to(x_dtype), None if dsum is None else dsum.to(r_dtype), *(None,) * 7
    ds, dw = _bwd(backend, dy.to(s.dtype), s, weight, rstd, offset, k, eps, dsum)
    return ds.to(x_dtype), ds.to(r_dtype), dw, None, None, None, None, None, None


_add_rms_norm_op = custom_op_with_eager_twin("normlab::py_add_rms_norm", _add_fwd, _add_fake, _add_setup, _add_backward)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _upcast_half_weight(weight, x):
    """A bf16/fp16 weight on a float32/float64 input, exactly upcast: ``torch.nn.RMSNorm(d).half()`` takes
    float32 input and returns float32 (torch's LayerNorm refuses the mix, and so does normlab's)."""
    wide_input = isinstance(x, Tensor) and x.dtype in (torch.float32, torch.float64)
    if wide_input and isinstance(weight, Tensor) and weight.dtype in HALF_DTYPES:
        return weight.to(x.dtype)
    return weight


def _plain_options(eps, casting, offset) -> bool:
    """The options of a plainly valid call, as far as a look-up can tell (eps None or a finite float > 0, a string
    casting, a float or int offset); :func:`_native_for` checks the casting and offset that a key holds."""
    return (eps is None or (type(eps) is float and 0.0 < eps < _INF)) and type(casting) is str and (
        type(offset) is float or type(offset) is int
    )


def _native_for(op: str, key: tuple, input: Tensor, backend: str | None, **tensors):
    """The native operator for a plainly valid call's key (:func:`normlab.dispatch.native_for`), decided once per
    key; None when its casting or offset is not valid (the full checks then raise)."""
    casting, offset = key[-1]
    if casting not in _CASTINGS or not (-_INF < offset < _INF):
        return None
    return dispatch.native_for(op, key, input, backend, **tensors, casting=casting, offset=offset, k=key[0])


def _then_bias(fill, bias: Tensor | None):
    """An ``out=`` filler (:func:`write_out`'s ``compute``), then the bias added in place (as :func:`add_bias`)."""
    if bias is None:
        return fill

    def fill_and_shift(out_rows: Tensor) -> None:
        fill(out_rows)
        out_rows.add_(bias)

    return fill_and_shift


def _check(x, normalized_shape, weight, eps, casting, partial, offset, bias=None):
    check_input(x)
    shape, n = normalized_size(x, normalized_shape)
    check_param(weight, "weight", shape, x)
    check_param(bias, "bias", shape, x)
    check_choice(casting, "casting mode", CASTING_MODES)
    check_offset(offset)
    return n, resolve_eps(eps, x.dtype), partial_size(n, partial)


def rms_norm(
    input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None, eps: float | None = None,
    *, casting: str = "llama", offset: float = 0.0, partial: float | None = None, bias: Tensor | None = None,
    backend: str | None = None, out: Tensor | None = None,
) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape``: ``y = x / sqrt(mean(x²) + eps) * (offset + w)``, plus
    ``bias`` when given (``y + b``, rounded to the input's dtype; fused where the backend has a native op).

    Mirrors ``torch.nn.functional.rms_norm``; ``casting``, ``offset`` and ``partial`` are described in
    the module docstring. ``out=`` writes into a preallocated tensor (inference only, like torch).
    """
    # the common call: a backend's own front checks and computes it (None: not plainly one it serves)
    front = dispatch.front("rms_norm", backend) if out is None and partial is None else None
    if front is not None and (y := front(input, normalized_shape, weight, eps, casting, offset, bias)) is not None:
        return y
    # the common call of a backend without a front, plainly valid: no other check, rows along the last dim as they are
    key = (
        plain_rows(input, normalized_shape, weight, bias, (casting, offset))
        if out is None and partial is None and _plain_options(eps, casting, offset) else None
    )
    if key is not None:
        op = dispatch.cached_native("rms_norm", key, backend)
        if op is dispatch.UNDECIDED:
            op = _native_for("rms_norm", key, input, backend, weight=weight, bias=bias)
        if op is not None:
            n = key[0]
            eps = _DEFAULT_EPS[input.dtype] if eps is None else eps
            return op(input, weight, eps, casting, offset if type(offset) is float else float(offset), n, bias)[0]
    weight = _upcast_half_weight(weight, input)
    bias = _upcast_half_weight(bias, input)
    n, eps, k = _check(input, normalized_shape, weight, eps, casting, partial, offset, bias)
    x, w, b = row_view(input, n), flat_param(weight, n), flat_param(bias, n)
    name = (
        dispatch.select("rms_norm", x, backend, weight=w, casting=casting, offset=offset, k=k,
                        **({} if b is None else {"bias": b}))
        if x.numel() else dispatch.REFERENCE
    )
    op = dispatch.native(name, "rms_norm")
    if op is not None:  # rows made contiguous, autograd and all, in the backend's own operator
        if out is not None:
            into = dispatch.native(name, "rms_norm_into")
            fill = lambda o: into(x, w, eps, casting, float(offset), k, o)
            return write_out(out, input, n, _then_bias(fill, b), weight, bias)
        return op(x, w, eps, casting, float(offset), k, b)[0].view(input.shape)
    x = x.contiguous()
    if out is not None:
        fill = forward_into(name, "rms_norm_fwd", rms_norm_fwd_ref, x, w, eps, casting, float(offset), k)
        return write_out(out, input, n, _then_bias(fill, b), weight, bias)
    y, _ = _rms_norm_op(x, w, eps, casting, float(offset), k, name)
    return add_bias(y, b).reshape(input.shape)


def add_rms_norm(
    input: Tensor, residual: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
    eps: float | None = None, *, casting: str = "llama", offset: float = 0.0, partial: float | None = None,
    residual_dtype: torch.dtype | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + RMSNorm: ``s = input + residual`` (stored in ``residual_dtype``, default the
    input dtype), returns ``(rms_norm(s), s)`` — one read of each input, one write of each output."""
    # the common call: a backend's own front checks and computes it (None: not plainly one it serves)
    front = dispatch.front("add_rms_norm", backend) if residual_dtype is None and partial is None else None
    if front is not None and (
        pair := front(input, residual, normalized_shape, weight, eps, casting, offset)
    ) is not None:
        return pair
    # the common call of a backend without a front, plainly valid: the residual like the input, the sum in its dtype
    key = (
        plain_rows(input, normalized_shape, weight, None, (casting, offset), residual)
        if residual_dtype is None and partial is None and _plain_options(eps, casting, offset) else None
    )
    if key is not None:
        op = dispatch.cached_native("add_rms_norm", key, backend)
        if op is dispatch.UNDECIDED:
            op = _native_for("add_rms_norm", key, input, backend, residual=residual, weight=weight,
                             residual_dtype=input.dtype)
        if op is not None:
            n, dtype = key[0], key[1]
            eps = _DEFAULT_EPS[dtype] if eps is None else eps
            y, s, _ = op(input, residual, weight, eps, casting, offset if type(offset) is float else float(offset), n,
                         dtype)
            return y, s
    weight = _upcast_half_weight(weight, input)
    n, eps, k = _check(input, normalized_shape, weight, eps, casting, partial, offset)
    check_same(input, residual, "input", "residual")
    residual_dtype = check_residual_dtype(residual_dtype, input)
    x, r, w = row_view(input, n), row_view(residual, n), flat_param(weight, n)
    name = (
        dispatch.select(
            "add_rms_norm", x, backend, residual=r, weight=w, casting=casting, offset=offset, k=k,
            residual_dtype=residual_dtype,
        )
        if x.numel() else dispatch.REFERENCE
    )
    op = dispatch.native(name, "add_rms_norm")
    if op is not None:
        y, s, _ = op(x, r, w, eps, casting, float(offset), k, residual_dtype)
        return y.view(input.shape), s.view(input.shape)
    x, r = x.contiguous(), r.contiguous()
    y, s, _ = _add_rms_norm_op(x, r, w, eps, casting, float(offset), k, residual_dtype, name)
    return y.reshape(input.shape), s.reshape(input.shape)
