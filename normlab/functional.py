"""Functional API mirroring ``torch.nn.functional``: ``import normlab.functional as NF``."""

from normlab.ops import *
from normlab.ops import __all__  # noqa: F401
