"""The ops: one file per op family, each with its reference (the spec), custom op, autograd and dispatch."""

from normlab.ops.batch_norm import batch_norm, batch_norm_reference
from normlab.ops.dyt import dyt, dyt_reference
from normlab.ops.gated_rms_norm import gated_rms_norm, gated_rms_norm_reference
from normlab.ops.group_norm import group_norm, group_norm_reference
from normlab.ops.layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference
from normlab.ops.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference", "rms_norm", "rms_norm_reference"]
__all__ += ["add_layer_norm", "add_layer_norm_reference", "layer_norm", "layer_norm_reference"]
__all__ += ["batch_norm", "batch_norm_reference", "dyt", "dyt_reference", "group_norm", "group_norm_reference"]
__all__ += ["gated_rms_norm", "gated_rms_norm_reference"]
