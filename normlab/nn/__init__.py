"""torch.nn-compatible normalization modules."""

from normlab.nn.batch_norm import BatchNorm
from normlab.nn.dyt import DyT
from normlab.nn.gated_rms_norm import GatedRMSNorm
from normlab.nn.group_norm import GroupNorm
from normlab.nn.layer_norm import AdaLayerNorm, AddLayerNorm, LayerNorm
from normlab.nn.rms_norm import AddRMSNorm, RMSNorm

__all__ = ["AdaLayerNorm", "AddLayerNorm", "AddRMSNorm", "LayerNorm", "RMSNorm"]
__all__ += ["BatchNorm", "DyT", "GatedRMSNorm", "GroupNorm"]
