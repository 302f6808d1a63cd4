"""normlab — exact, fast normalization layers for Transformers, and a toolkit to study them."""

__version__ = "0.1.0"

from normlab import dispatch
from normlab.dispatch import backend
from normlab.ops import *
from normlab.ops import __all__ as _ops_all

__all__ = ["__version__", "backend", "dispatch"]
__all__.extend(_ops_all)

from normlab.models import convert
from normlab.models.patch import patch, unpatch

__all__ += ["convert", "patch", "unpatch"]
