"""The ``cpu`` backend: native C++ operators on torch's dispatcher (``torch.ops.normlab.*``).

``csrc/ops.cpp`` defines the schemas, the CPU implementations and C++ autograd formulas (forward and
backward are both dispatcher ops, so an eager call never enters Python); ``csrc/kernels.h`` holds the
kernels, written with ``at::vec`` and built once per ISA level (AVX2, AVX-512), one chosen at load time from
the CPU (``NORMLAB_CPU_ISA`` names another one the CPU runs). Every build gives the same bits. Rows run on
torch's intra-op pool (``at::parallel_for``), so ``torch.set_num_threads`` governs them.

It provides every entry point of the kernel contract (:mod:`normlab.kernels.contract`): the native operators,
and the Python kernels as thin wrappers of them. Serves CPU tensors of float32, bfloat16 and float16 (weights
in the input dtype or fp32); float64 and empty inputs go to the reference. Importing this module raises when the
extension is missing or cannot load; :mod:`normlab.dispatch` then warns once and the reference serves.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from normlab import dispatch
from normlab.kernels import contract


def _load_extension():
    """Import the built extension, which registers the ``torch.ops.normlab`` operators and holds the ops' fronts;
    ``NORMLAB_CPU_EXTENSION`` names another build of it (the sanitizer run's)."""
    path = os.environ.get("NORMLAB_CPU_EXTENSION")
    if not path:
        from normlab.kernels.cpu import _C
        return _C
    spec = importlib.util.spec_from_file_location("normlab.kernels.cpu._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_C = _load_extension()

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Rows per weight-gradient partial (ops.cpp): fixed, never the thread count; the partials are added in chunk order.
CHUNK = 64

_ops = torch.ops.normlab
if not _ops.cpu_isa():
    raise ImportError("normlab's cpu kernels need a CPU with AVX2, FMA and F16C")


def isa() -> str:
    """The ISA build in use (``"avx512bf16"``, ``"avx512"`` or ``"avx2"``)."""
    return _ops.cpu_isa()


def isas() -> list[str]:
    """The ISA builds this CPU runs, best first."""
    return list(_ops.cpu_isas())


def set_isa(name: str) -> str:
    """Use the ``name`` build from now on (every build gives the same bits); returns the previous one."""
    return _ops.set_cpu_isa(name)


def supports(op: str, x: torch.Tensor, **options) -> bool:
    """CPU tensors of fp32/bf16/fp16 with a non-empty last dimension; a fused add's residual in the input's
    dtype or ``residual_dtype``. Never looks at the number of rows."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.dim() == 0 or x.shape[-1] == 0:
        return False
    tensors = [options.get(name) for name in ("weight", "bias", "alpha")]
    if any(t is not None and (t.device.type != "cpu" or t.dtype not in DTYPES) for t in tensors):
        return False
    residual, residual_dtype = options.get("residual"), options.get("residual_dtype")
    if residual is None:
        return True
    return residual_dtype in DTYPES and residual.device.type == "cpu" and residual.dtype in (x.dtype, residual_dtype)


# ---- fake implementations: torch.compile traces the native ops without running them; the contract's stubs
# return exactly the outputs' shapes and dtypes
for _name in contract.native_ops():
    torch.library.register_fake(f"normlab::{_name}")(contract.stub(_name))


# ---- the Python kernels of the contract (normlab/kernels/contract.py), thin wrappers of the native ops -----------
def _check_out(name: str, out: torch.Tensor, like: torch.Tensor) -> None:
    if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"{name} must be a contiguous CPU tensor of shape {list(like.shape)} and dtype {like.dtype}, "
            f"got {list(out.shape)}, {out.dtype}, contiguous={out.is_contiguous()}, {out.device}"
        )


def _into(results, outs: dict):
    """The first results copied into the preallocated ``outs`` (name → tensor or None), checked first."""
    results = list(results)
    for i, (name, out) in enumerate(outs.items()):
        if out is not None:
            _check_out(name, out, results[i])
            results[i] = out.copy_(results[i])
    return tuple(results)


def rms_norm_fwd(x, weight, eps, casting, offset, k, out=None):
    """``(y, rstd)``: RMSNorm of the ``(rows, n)`` input with the reference's casting rules."""
    if out is None:
        return _ops.rms_norm(x, weight, eps, casting, offset, k)
    _check_out("out", out, x)
    return out, _ops.rms_norm_into(x, weight, eps, casting, offset, k, out)


def rms_norm_bwd(dy, x, weight, rstd, offset, k, dsum=None):
    """``(dx, dw | None)`` from the saved ``rstd``; ``dsum`` (the fused add's gradient) is added to dx."""
    dx, dw, _ = _ops.rms_norm_backward(dy, x, weight, rstd, offset, k, dsum, weight is not None)
    return dx, dw if weight is not None else None


def add_rms_norm_fwd(x, residual, weight, eps, casting, offset, k, residual_dtype, out=None, residual_out=None):
    """``(y, s, rstd)`` with ``s = x + residual`` (fp32 add, stored in ``residual_dtype``), ``y = rms_norm(s)``."""
    results = _ops.add_rms_norm(x, residual, weight, eps, casting, offset, k, residual_dtype)
    return _into(results, {"out": out, "residual_out": residual_out})


def layer_norm_fwd(x, weight, bias, eps, out=None):
    """``(y, mean, rstd)``: LayerNorm (biased, corrected two-pass variance) of the ``(rows, n)`` input."""
    if out is None:
        return _ops.layer_norm(x, weight, bias, eps)
    _check_out("out", out, x)
    return (out, *_ops.layer_norm_into(x, weight, bias, eps, out))


def layer_norm_bwd(dy, x, weight, bias, mean, rstd, dsum=None):
    """``(dx, dw | None, db | None)`` from the saved ``mean``/``rstd``."""
    dx, dw, db = _ops.layer_norm_backward(dy, x, weight, mean, rstd, dsum, weight is not None, bias is not None)
    return dx, dw if weight is not None else None, db.to(bias.dtype) if bias is not None else None


def add_layer_norm_fwd(x, residual, weight, bias, eps, residual_dtype, out=None, residual_out=None):
    """``(y, s, mean, rstd)`` with ``s = x + residual`` in ``residual_dtype`` and ``y = layer_norm(s)``."""
    results = _ops.add_layer_norm(x, residual, weight, bias, eps, residual_dtype)
    return _into(results, {"out": out, "residual_out": residual_out})


def gated_rms_norm_fwd(x, gate, weight, eps, group_size, norm_before_gate, casting, offset, out=None):
    """``(y, rstd)``: gated RMSNorm of the ``(rows, n)`` input, ``rstd`` per row and group."""
    results = _ops.gated_rms_norm(x, gate, weight, eps, group_size, norm_before_gate, casting, offset)
    return _into(results, {"out": out})


def gated_rms_norm_bwd(dy, x, gate, weight, rstd, group_size, norm_before_gate, offset):
    """``(dx, dz | None, dw | None)`` from the saved ``rstd``."""
    dx, dz, dw = _ops.gated_rms_norm_backward(
        dy, x, gate, weight, rstd, group_size, norm_before_gate, offset, weight is not None
    )
    return dx, dz if gate is not None else None, dw if weight is not None else None


dispatch.register_kernels("cpu", sys.modules[__name__], supports=supports, names=contract.kernels())
# the native operators, the whole ops with their autograd among them (normlab.dispatch.native)
dispatch.register_kernels("cpu", _ops, supports=supports, names=contract.native_ops())
# the fronts of the common calls (csrc/front.cpp): checks and the operator's call in one step
for _name in ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "dyt"):
    dispatch.register_front("cpu", _name, getattr(_C, _name))
