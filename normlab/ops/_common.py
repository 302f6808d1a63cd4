"""Input checks and shape helpers shared by the op files.

Every check runs before any work and raises with a message naming what was expected.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from normlab import dispatch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


_FLOATS = frozenset(FLOAT_DTYPES)
_HALVES = frozenset(HALF_DTYPES)
_SEQUENCES = (tuple, torch.Size)
_F32 = torch.float32
_INF = math.inf
_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
#: :func:`plain_rows` of a call without a fused add.
NO_RESIDUAL = object()


def plain_rows(x, normalized_shape, weight=None, bias=None, options=None, residual=NO_RESIDUAL) -> tuple | None:
    """The dispatch key of a plainly valid call, so that the full checks can be skipped; None for any other
    call, which takes the full checks (they raise the errors). Plainly valid: ``x`` a non-empty tensor of a
    floating dtype, ``normalized_shape`` an int (or a 1-tuple of one) equal to its last dim, ``weight`` and
    ``bias`` each None or a vector of that size in the input's dtype (or fp32 for a half input) on its device,
    a fused add's ``residual`` a tensor of the input's shape, dtype and device, and no torch.func transform
    active. The key is what of the call decides its backend: the size, the input's dtype and device, the
    parameters' dtypes and the op's own ``options`` (hashable; the op checks them before it first uses a key)."""
    if type(normalized_shape) is int:
        n, shape = normalized_shape, (normalized_shape,)
    elif type(normalized_shape) in _SEQUENCES and len(normalized_shape) == 1:  # (n,) as torch.nn modules hold it
        n, shape = normalized_shape[0], normalized_shape
        if type(n) is not int:
            return None
    else:
        return None
    if not isinstance(x, _Tensor):
        return None
    x_shape = x.shape
    if not x_shape or x_shape[-1] != n or 0 in x_shape:
        return None
    dtype, device = x.dtype, x.device
    if dtype not in _FLOATS:
        return None
    w_dtype = b_dtype = None
    if weight is not None:
        if not (type(weight) is _Parameter or isinstance(weight, _Tensor)) or weight.shape != shape:
            return None
        w_dtype = weight.dtype
        if (w_dtype is not dtype and (w_dtype is not _F32 or dtype not in _HALVES)) or weight.device != device:
            return None
    if bias is not None:
        if not (type(bias) is _Parameter or isinstance(bias, _Tensor)) or bias.shape != shape:
            return None
        b_dtype = bias.dtype
        if (b_dtype is not dtype and (b_dtype is not _F32 or dtype not in _HALVES)) or bias.device != device:
            return None
    if residual is not NO_RESIDUAL and (
        not isinstance(residual, _Tensor) or residual.dtype is not dtype or residual.shape != x_shape
        or residual.device != device
    ):
        return None
    if _transforms_active() and not _is_compiling():
        return None
    return n, dtype, device, w_dtype, b_dtype, options


def param_dtype_ok(p_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """A parameter's dtype as :func:`check_param` allows it: the input's, or fp32 for a bf16/fp16 input."""
    return p_dtype is x_dtype or (p_dtype is _F32 and x_dtype in _HALVES)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in fp32 for fp32/bf16/fp16 inputs and in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "normlab's ops do not support torch.func transforms (grad, vmap, jvp, jacrev, …): their kernels "
            "are custom autograd functions. Use torch.autograd (backward, torch.autograd.grad), or under "
            "torch.func the plain-PyTorch references (normlab.ops.rms_norm.rms_norm_reference and the like)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float64, bfloat16 or float16), got {x.dtype}"
        )


def normalized_size(
    x: torch.Tensor, normalized_shape: int | Sequence[int], name: str = "input"
) -> tuple[tuple[int, ...], int]:
    """Check that ``normalized_shape`` is the trailing shape of ``x``; return it and its element count."""
    try:
        if isinstance(normalized_shape, numbers.Integral):
            shape = (int(normalized_shape),)
        else:
            shape = tuple(operator.index(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if len(shape) == 0:
        raise ValueError("normalized_shape must name at least one dimension, got ()")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"expected {name} with trailing shape {list(shape)} (normalized_shape), got shape {list(x.shape)}"
        )
    return shape, math.prod(shape)


def check_param(p: torch.Tensor | None, name: str, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """A weight/bias must have exactly ``shape``, the input's device, and the input's dtype
    (or float32 for a bf16/fp16 input: fp32 master weights)."""
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(f"expected {name} of shape {list(shape)}, got {list(p.shape)}")
    allowed = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    if p.dtype not in allowed:
        expected = " or ".join(map(str, allowed))
        raise TypeError(f"expected {name} of dtype {expected} (input is {x.dtype}), got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"expected {name} on {x.device} (the input's device), got {p.device}")


def as_float(value, name: str, expected: str) -> float:
    """``float(value)``, or a TypeError naming what ``name`` should be."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {value!r}") from None


def check_eps(eps: float) -> float:
    eps = as_float(eps, "eps", "a finite number > 0")
    if not (0 < eps < math.inf):  # comparisons, not math.isfinite: torch.compile traces them on symbolic floats
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    return eps


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def check_residual_dtype(residual_dtype: torch.dtype | None, x: torch.Tensor) -> torch.dtype:
    """A fused add's ``residual_dtype``: the dtype its sum is stored in, default the input's."""
    residual_dtype = residual_dtype or x.dtype
    if residual_dtype not in _FLOATS:
        raise TypeError(f"residual_dtype must be a floating dtype, got {residual_dtype}")
    return residual_dtype


def fused_add(x: torch.Tensor, residual: torch.Tensor, residual_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fused add's sum (the spec): ``x + residual`` added in the compute dtype, stored in ``residual_dtype``
    (default the input's)."""
    c = compute_dtype(x.dtype)
    return (x.to(c) + residual.to(c)).to(residual_dtype or x.dtype)


def empty_stats(x: torch.Tensor, size: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake implementation's statistics: ``size`` values (default one per row of ``x``) in the compute
    dtype of ``dtype`` (default ``x``'s)."""
    return x.new_empty((x.shape[0] if size is None else size,), dtype=compute_dtype(dtype or x.dtype))


def check_same(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Two inputs added elementwise: same shape (no broadcasting), device, floating dtype."""
    check_input(b, name_b)
    if a.shape != b.shape:
        raise ValueError(f"expected {name_b} of shape {list(a.shape)} (the shape of {name_a}), got {list(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"expected {name_b} on {a.device} (the device of {name_a}), got {b.device}")


#: Row reductions sum chunks of at most this many elements first: below torch's parallel grain
#: (32768 elements), so torch never splits one row's sum across threads.
ROW_CHUNK = 8192


def row_sum(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``Σ`` over the last dim, bitwise a function of each row alone (batch invariance, docs/architecture.md §4).

    ``x.sum(dim=-1)`` is not: torch splits a lone row longer than its parallel grain across threads,
    so the same row sums in another order alone than inside a batch (or with 1 vs 2 threads).
    Summing fixed chunks of ``ROW_CHUNK`` elements, then the chunk sums, fixes the order per row."""
    n = x.shape[-1]
    if n <= ROW_CHUNK:
        return x.sum(dim=-1, keepdim=keepdim)
    full = n - n % ROW_CHUNK
    parts = x[..., :full].reshape(*x.shape[:-1], full // ROW_CHUNK, ROW_CHUNK).sum(dim=-1)
    if full < n:
        parts = torch.cat([parts, x[..., full:].sum(dim=-1, keepdim=True)], dim=-1)
    return parts.sum(dim=-1, keepdim=keepdim)


def row_mean(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Mean over the last dim, batch invariant as :func:`row_sum`."""
    return row_sum(x, keepdim) / x.shape[-1]


def rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as contiguous ``(rows, n)`` rows: the normalized trailing dims flattened. Contiguous, so that
    a result does not depend on the input's memory layout (torch reduces strided rows in another order).
    With ``n == 0`` the input is empty and the row count undetermined: ``(0, 0)``, which reshapes back
    to any empty shape."""
    return x.reshape(-1, n).contiguous() if n else x.reshape(0, 0)


def row_view(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as ``(rows, n)`` (a view where the layout allows); native ops make the rows contiguous themselves."""
    return x.reshape(-1, n) if n else x.reshape(0, 0)


def flat_param(p: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return p if p is None or p.dim() == 1 else p.reshape(n)


def zero_where_no_grad(dy: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
    """A parameter-gradient contribution is exactly 0 where the upstream gradient is 0, so a NaN/inf
    in one row cannot leak into the parameter gradient of a loss that does not use that row."""
    return torch.where(dy == 0, torch.zeros((), dtype=contribution.dtype, device=contribution.device), contribution)


def empty_output(input: torch.Tensor, channel_dim: int, *params: torch.Tensor | None) -> torch.Tensor:
    """The output of a norm on an empty input: an empty copy of it that still depends on the per-channel
    parameters (those broadcast along ``channel_dim``), so that autograd gives them zero gradients as
    torch does instead of cutting them off."""
    out = input.clone()
    for p in params:
        if p is not None:
            shape = [1] * input.dim()
            shape[channel_dim] = p.numel()
            out = out + (p.reshape(shape) * 0).to(out.dtype)
    return out


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory: the same storage and intersecting byte extents."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t):
        start = t.data_ptr()
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return start, start + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def write_out(out: torch.Tensor, input: torch.Tensor, n: int, compute, *params: torch.Tensor | None) -> torch.Tensor:
    """``out=`` as in torch: a contiguous tensor of the input's shape, dtype and device; no autograd.
    ``compute(out_rows)`` writes the result into the ``(rows, n)`` view of ``out``, which must not share
    memory with the input or the parameters (a kernel reads a row after writing part of it)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if out.shape != input.shape or out.dtype != input.dtype or out.device != input.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous tensor of shape {list(input.shape)}, dtype {input.dtype} and device "
            f"{input.device}, got {list(out.shape)}, {out.dtype}, {out.device}"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, out, *params)):
        raise RuntimeError("out= does not support automatic differentiation (an input or out requires grad)")
    for name, t in zip(("input", "weight", "bias"), (input, *params)):
        if t is not None and overlaps(out, t):
            raise ValueError(f"out shares memory with the {name}: pass a separate buffer")
    with torch.no_grad():
        compute(rows(out, n))
    return out


def forward_into(backend: str, kernel: str, reference, *args):
    """``out=`` on a Python backend, as :func:`write_out`'s ``compute(out_rows)``: the backend's ``kernel``
    writes ``y`` (the first output) into ``out_rows``; the reference's ``y`` is copied in."""
    if backend == dispatch.REFERENCE:
        return lambda out: out.copy_(reference(*args)[0])
    return lambda out: dispatch.kernel(backend, kernel)(*args, out=out)


def custom_op_with_eager_twin(name: str, impl, fake, setup_context, backward):
    """Register ``impl`` as the custom op ``name`` (fake implementation, autograd formula) and return a
    caller that uses it under ``torch.compile`` and an ``autograd.Function`` with the very same forward,
    setup and backward in eager mode: the custom-op dispatcher costs tens of µs per call, which is the
    whole runtime of a GPU kernel on a small tensor."""
    op = torch.library.custom_op(name, impl, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):  # ctx-style: torch binds a setup_context-style Function's args with inspect
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    twin = type(
        name.split("::")[-1] + "_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return twin.apply(*args)
        return impl(*args)  # nothing to differentiate: no autograd node (its cost: docs/benchmarks.md)

    return call
