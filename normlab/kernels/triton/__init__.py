"""The ``triton`` backend: GPU kernels of rms_norm, add_rms_norm, layer_norm, add_layer_norm and gated_rms_norm.

Serves CUDA tensors of fp32/bf16/fp16 (weights in the input dtype or fp32), any row length; CPU tensors
only under ``TRITON_INTERPRET=1`` (set before this module is imported), which the tests use. Importing
it raises ImportError when triton is not installed, and the dispatch falls back to another backend.
"""

from __future__ import annotations

import torch
import triton

from normlab import dispatch
from normlab.kernels import contract
from normlab.kernels.triton import gated_rms_norm, layer_norm, rms_norm

# the backend's kernels, as attributes of the package
from normlab.kernels.triton.gated_rms_norm import gated_rms_norm_bwd, gated_rms_norm_fwd  # noqa: F401
from normlab.kernels.triton.layer_norm import add_layer_norm_fwd, layer_norm_bwd, layer_norm_fwd  # noqa: F401
from normlab.kernels.triton.rms_norm import add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd  # noqa: F401

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Whether the kernels were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRETED = triton.knobs.runtime.interpret


def supports(op: str, x: torch.Tensor, **options) -> bool:
    """CUDA tensors (CPU ones under the interpreter) of fp32/bf16/fp16; never looks at the row count."""
    device_ok = x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETED)
    if not device_ok or x.dtype not in DTYPES:
        return False
    tensors = [options.get(name) for name in ("weight", "bias", "residual")]
    if any(t is not None and (t.dtype not in DTYPES or t.device != x.device) for t in tensors):
        return False
    return options.get("residual_dtype", x.dtype) in DTYPES


dispatch.register_kernels("triton", rms_norm, supports=supports, names=contract.kernels("rms_norm"))
dispatch.register_kernels("triton", layer_norm, supports=supports, names=contract.kernels("layer_norm"))
dispatch.register_kernels("triton", gated_rms_norm, supports=supports, names=contract.kernels("gated_rms_norm"))
