"""torch.nn-compatible normalization modules."""

from normlab.nn.batch_norm import BatchNorm
from normlab.nn.dyt import DyT
from normlab.nn.group_norm import GroupNorm

__all__ = ["BatchNorm", "GroupNorm", "DyT"]
