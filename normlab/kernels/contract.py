"""The kernel contract: every entry point a backend provides, written once, as code.

Each stub below has the exact signature a backend's function or operator must have (argument names, kinds
and defaults: no argument more, none less) and documents shapes and dtypes; its body returns empty outputs of
exactly the promised shapes and dtypes, so it runs as the reference of the output contract (the native
operators' fake implementations for ``torch.compile`` are these stubs). ``tests/kernels/test_contract.py``
checks every registered backend against them. Two kinds of entry point:

- ``@kernel(family)``: Python functions on contiguous ``(rows, n)`` rows, which the op files' custom ops call
  through :func:`normlab.dispatch.kernel` (the triton backend, and the cpu backend's thin wrappers). A
  fused add's forward and every forward take the optional output buffers ``out`` (and ``residual_out``);
  a backend writes into them and returns them.
- ``@native(family)``: operators on torch's dispatcher, ``torch.ops.normlab.<name>``, whose schemas
  (``kernels/cpu/csrc/ops.cpp``) have the stub's argument names; :func:`normlab.dispatch.native` hands the
  whole ops, autograd included, to the op files. They take ``(..., n)`` inputs of any strides.

Shared conventions: inputs are fp32/bf16/fp16 with the normalized size ``n`` last; a weight or bias is an
``(n,)`` vector in the input's dtype or fp32 (master weights) or None; outputs come in the input's dtype,
parameter gradients in the parameter's; per-row statistics (``mean``, ``rstd``) are fp32.
Families without an entry point here (batch_norm, group_norm) are served by the reference alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

KERNEL, NATIVE = "kernel", "native"


@dataclass(frozen=True)
class EntryPoint:
    name: str
    kind: str  # KERNEL or NATIVE
    family: str
    stub: Callable
    writes: tuple[str, ...] = ()  # arguments a native operator writes into (``Tensor(a!)`` in its schema)


#: Every entry point by name, in the order of this file.
ENTRY_POINTS: dict[str, EntryPoint] = {}


def kernel(family: str) -> Callable[[Callable], Callable]:
    """Mark a stub as a Python kernel entry point of the op family ``family``."""

    def record(stub: Callable) -> Callable:
        ENTRY_POINTS[stub.__name__] = EntryPoint(stub.__name__, KERNEL, family, stub)
        return stub

    return record


def native(family: str, *, writes: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Mark a stub as a native operator (``torch.ops.normlab.<name>``) of the op family ``family`` that writes
    into the arguments ``writes``."""

    def record(stub: Callable) -> Callable:
        ENTRY_POINTS[stub.__name__] = EntryPoint(stub.__name__, NATIVE, family, stub, writes)
        return stub

    return record


def _names(kind: str, families: tuple[str, ...]) -> tuple[str, ...]:
    unknown = set(families) - {e.family for e in ENTRY_POINTS.values()}
    if unknown:
        raise ValueError(f"no kernel entry points for the families {sorted(unknown)}")
    return tuple(e.name for e in ENTRY_POINTS.values() if e.kind == kind and (not families or e.family in families))


def kernels(*families: str) -> tuple[str, ...]:
    """Names of the Python kernel entry points of ``families`` (all families when none is named)."""
    return _names(KERNEL, families)


def native_ops(*families: str) -> tuple[str, ...]:
    """Names of the native operators of ``families`` (all families when none is named)."""
    return _names(NATIVE, families)


def stub(name: str) -> Callable:
    """The stub of the entry point ``name``: its signature, docstring and output shapes and dtypes."""
    return ENTRY_POINTS[name].stub


def supports(op: str, x: Tensor, **options) -> bool:
    """Every backend's one ``supports``: whether it serves ``op`` (a family name, e.g. ``"add_rms_norm"``) for
    the ``(rows, n)`` input ``x`` and the op's options (``weight=``, ``casting=``, …, as the op file passes them
    to :func:`normlab.dispatch.select`). It never looks at the number of rows (batch invariance)."""
    return False


# ---- output shapes -----------------------------------------------------------------------------------------
def _stats(x: Tensor) -> Tensor:
    """Per-row fp32 statistics of ``(..., n)`` rows: shape ``(...)``."""
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


def _like(x: Tensor, dtype: torch.dtype | None = None, given: Tensor | None = None) -> Tensor:
    """A contiguous output of ``x``'s shape (in ``dtype``), or the buffer ``given`` for it."""
    if given is not None:
        return given
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _param_grad(p: Tensor | None) -> Tensor | None:
    return None if p is None else p.new_empty(p.shape)


def _native_grad(p: Tensor | None, wanted: bool) -> Tensor:
    """A native backward's parameter gradient: ``p``'s shape and dtype when ``wanted``, else an empty fp32
    placeholder (a schema has no optional outputs)."""
    if p is None or not wanted:
        return p.new_empty(0, dtype=torch.float32) if p is not None else torch.empty(0)
    return p.new_empty(p.shape)


# ---- RMSNorm ---------------------------------------------------------------------------------------------
@kernel("rms_norm")
def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RMSNorm of the rows ``x`` ``(rows, n)``, the RMS over the first ``k`` elements: ``(y, rstd)``, ``y``
    ``(rows, n)`` in x's dtype (``out`` itself when given), ``rstd`` ``(rows,)`` fp32."""
    return _like(x, given=out), _stats(x)


@kernel("rms_norm")
def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, k: int, dsum: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dw)`` from the forward's ``rstd``: ``dx`` ``(rows, n)`` in x's dtype, plus ``dsum`` (the gradient
    reaching a fused add's sum, ``(rows, n)``) when given; ``dw`` ``(n,)`` in the weight's dtype, None without one."""
    return _like(x), _param_grad(weight)


@kernel("rms_norm")
def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int,
    residual_dtype: torch.dtype, out: Tensor | None = None, residual_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, s, rstd)``: ``s = x + residual`` added in fp32 and stored in ``residual_dtype`` (``residual_out``
    when given), ``y = rms_norm(s)`` in x's dtype (``out`` when given), ``rstd`` ``(rows,)`` fp32 of ``s``."""
    return _like(x, given=out), _like(x, residual_dtype, residual_out), _stats(x)


@native("rms_norm")
def rms_norm(
    input: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The whole op, autograd included: ``(y, rstd)``, ``y`` of input's shape and dtype (``+ bias`` when given,
    rounded to it), ``rstd`` ``input.shape[:-1]`` fp32."""
    return _like(input), _stats(input)


@native("rms_norm", writes=("out",))
def rms_norm_into(
    input: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int, out: Tensor
) -> Tensor:
    """The forward written into ``out`` (contiguous, input's shape and dtype; no autograd): returns ``rstd``."""
    return _stats(input)


@native("rms_norm")
def rms_norm_backward(
    grad: Tensor, input: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, k: int,
    grad_sum: Tensor | None, weight_grad: bool, bias_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)``; ``dw`` in the weight's dtype when ``weight_grad``, ``db`` ``(n,)`` fp32 when ``bias_grad``,
    each else an empty fp32 placeholder."""
    db = input.new_empty(input.shape[-1] if bias_grad else 0, dtype=torch.float32)
    return _like(input), _native_grad(weight, weight_grad), db


@native("rms_norm")
def add_rms_norm(
    input: Tensor, residual: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float, k: int,
    residual_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The whole fused op, autograd included: ``(y, s, rstd)`` as :func:`add_rms_norm_fwd`."""
    return _like(input), _like(input, residual_dtype), _stats(input)


# ---- LayerNorm -------------------------------------------------------------------------------------------
@kernel("layer_norm")
def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of the rows ``x`` ``(rows, n)``: ``(y, mean, rstd)``, ``y`` in x's dtype (``out`` when given),
    ``mean`` and ``rstd`` ``(rows,)`` fp32."""
    return _like(x, given=out), _stats(x), _stats(x)


@kernel("layer_norm")
def layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    dsum: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dw, db)`` from the forward's ``mean``/``rstd``: ``dx`` in x's dtype (plus ``dsum`` when given),
    ``dw``/``db`` ``(n,)`` in the weight's/bias's dtype, None for a missing parameter."""
    return _like(x), _param_grad(weight), _param_grad(bias)


@kernel("layer_norm")
def add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    residual_dtype: torch.dtype, out: Tensor | None = None, residual_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, s, mean, rstd)``: ``s = x + residual`` in ``residual_dtype`` (``residual_out`` when given),
    ``y = layer_norm(s)`` in x's dtype (``out`` when given), the statistics of ``s`` ``(rows,)`` fp32."""
    return _like(x, given=out), _like(x, residual_dtype, residual_out), _stats(x), _stats(x)


@native("layer_norm")
def layer_norm(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The whole op, autograd included: ``(y, mean, rstd)``, statistics ``input.shape[:-1]`` fp32."""
    return _like(input), _stats(input), _stats(input)


@native("layer_norm", writes=("out",))
def layer_norm_into(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: Tensor
) -> tuple[Tensor, Tensor]:
    """The forward written into ``out`` (contiguous, input's shape and dtype; no autograd): returns
    ``(mean, rstd)``."""
    return _stats(input), _stats(input)


@native("layer_norm")
def layer_norm_backward(
    grad: Tensor, input: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, grad_sum: Tensor | None,
    weight_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)``; ``dw`` in the weight's dtype when ``weight_grad``, ``db`` ``(n,)`` fp32 when
    ``bias_grad``, each else an empty fp32 placeholder."""
    db = input.new_empty(input.shape[-1] if bias_grad else 0, dtype=torch.float32)
    return _like(input), _native_grad(weight, weight_grad), db


@native("layer_norm")
def add_layer_norm(
    input: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    residual_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole fused op, autograd included: ``(y, s, mean, rstd)`` as :func:`add_layer_norm_fwd`."""
    return _like(input), _like(input, residual_dtype), _stats(input), _stats(input)


# ---- Gated RMSNorm ---------------------------------------------------------------------------------------
def _group_stats(x: Tensor, group_size: int) -> Tensor:
    """Per-row-and-group fp32 statistics of ``(..., n)`` rows: shape ``(..., n / group_size)``."""
    return x.new_empty((*x.shape[:-1], x.shape[-1] // group_size), dtype=torch.float32)


@kernel("gated_rms_norm")
def gated_rms_norm_fwd(
    x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int, norm_before_gate: bool,
    casting: str, offset: float, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated RMSNorm of the rows ``x`` ``(rows, n)``, the RMS per group of ``group_size`` (a divisor of n);
    ``gate`` ``(rows, n)`` in x's dtype or None: ``(y, rstd)``, ``y`` ``(rows, n)`` in x's dtype (``out`` itself
    when given), ``rstd`` ``(rows, n / group_size)`` fp32."""
    return _like(x, given=out), _group_stats(x, group_size)


@kernel("gated_rms_norm")
def gated_rms_norm_bwd(
    dy: Tensor, x: Tensor, gate: Tensor | None, weight: Tensor | None, rstd: Tensor, group_size: int,
    norm_before_gate: bool, offset: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dz, dw)`` from the forward's ``rstd``: ``dx`` ``(rows, n)`` in x's dtype, ``dz`` in the gate's
    (None without one), ``dw`` ``(n,)`` in the weight's dtype (None without one)."""
    return _like(x), None if gate is None else _like(gate), _param_grad(weight)


@native("gated_rms_norm")
def gated_rms_norm(
    input: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
    norm_before_gate: bool, casting: str, offset: float,
) -> tuple[Tensor, Tensor]:
    """The whole op, autograd included: ``(y, rstd)``, ``y`` of input's shape and dtype, ``rstd``
    ``(*input.shape[:-1], n / group_size)`` fp32."""
    return _like(input), _group_stats(input, group_size)


@native("gated_rms_norm")
def gated_rms_norm_backward(
    grad: Tensor, input: Tensor, gate: Tensor | None, weight: Tensor | None, rstd: Tensor, group_size: int,
    norm_before_gate: bool, offset: float, weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dz, dw)``; ``dz`` of the gate's shape and dtype (an empty placeholder in input's dtype without a
    gate), ``dw`` in the weight's dtype when ``weight_grad``, else an empty fp32 placeholder."""
    dz = _like(gate) if gate is not None else input.new_empty(0)
    return _like(input), dz, _native_grad(weight, weight_grad)


# ---- DyT -------------------------------------------------------------------------------------------------
@native("dyt")
def dyt(input: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The whole op, autograd included: ``y = weight · tanh(alpha · input) + bias`` of input's shape and dtype;
    ``alpha`` a one-element tensor."""
    return _like(input)


@native("dyt")
def dyt_forward(input: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The forward of a call that records a node: ``(y, tanh)``, ``y`` as :func:`dyt`'s and ``tanh = tanh(alpha ·
    input)`` in fp32, which the backward takes instead of computing it again."""
    return _like(input), _like(input, torch.float32)


@native("dyt")
def dyt_backward(
    grad: Tensor, input: Tensor, alpha: Tensor, weight: Tensor | None, weight_grad: bool, bias_grad: bool,
    tanh: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dalpha, dw, db)``: ``dalpha`` of alpha's shape and dtype, ``dw`` in the weight's dtype when
    ``weight_grad``, ``db`` ``(n,)`` fp32 when ``bias_grad``, each else an empty fp32 placeholder. ``tanh`` is
    :func:`dyt_forward`'s, or None (computed again: the same bits)."""
    db = input.new_empty(input.shape[-1] if bias_grad else 0, dtype=torch.float32)
    return _like(input), torch.empty_like(alpha), _native_grad(weight, weight_grad), db
