"""The triton backend for tests: on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set on
import of this module, before any kernel is defined); ``NORMLAB_TEST_DEVICE=cuda`` runs the kernels compiled
on a GPU. Import this module before anything that imports triton."""

from __future__ import annotations

import importlib
import os
import sys

DEVICE = os.environ.get("NORMLAB_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


def _round_fp32_to_bf16_like_gpus(cast_impl):
    """Triton's interpreter truncates fp32 → bf16 (``cvt.rn.bf16.f32`` on a GPU rounds to nearest even);
    round like the hardware so that the interpreter checks the arithmetic the GPU runs."""

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    cast.rounds_like_gpus = True
    return cast


if not getattr(interpreter.InterpreterBuilder.cast_impl, "rounds_like_gpus", False):
    interpreter.InterpreterBuilder.cast_impl = _round_fp32_to_bf16_like_gpus(interpreter.InterpreterBuilder.cast_impl)


def backend_module():
    """The backend module, its kernels defined for the interpreter on CPU (reloaded if an earlier import
    in this process defined them for a GPU)."""
    import normlab.kernels.triton as nt

    if nt.INTERPRETED != (DEVICE == "cpu"):
        for name in ("_common", "rms_norm", "layer_norm", "gated_rms_norm"):
            importlib.reload(sys.modules[f"normlab.kernels.triton.{name}"])
        nt = importlib.reload(nt)
    assert nt.INTERPRETED == (DEVICE == "cpu")
    return nt
