"""Functional API mirroring ``torch.nn.functional``: ``import normlab.functional as NF``."""

from normlab.ops import *  # noqa: F401,F403
from normlab.ops import __all__  # noqa: F401
