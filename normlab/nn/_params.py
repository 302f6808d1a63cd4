"""Reading a module's parameters in ``forward`` at the cost of a dictionary look-up."""

from __future__ import annotations

from torch import Tensor, nn


def param(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name)`` for a parameter: read from ``module._parameters`` where it is registered there
    (``nn.Module.__getattr__``, which serves it otherwise, is a Python call per read); anything else under that
    name (a parametrization's property, a tensor a hook set) through the attribute itself."""
    registered = module._parameters
    return registered[name] if name in registered else getattr(module, name)
