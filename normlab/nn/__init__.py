"""torch.nn-compatible normalization modules."""

from normlab.nn.layer_norm import AdaLayerNorm, AddLayerNorm, LayerNorm
from normlab.nn.rms_norm import AddRMSNorm, RMSNorm

__all__ = ["LayerNorm", "AddLayerNorm", "AdaLayerNorm", "RMSNorm", "AddRMSNorm"]
