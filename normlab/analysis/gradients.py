"""Gradient flow at initialization (Xiong et al. 2020): ``‖∂L/∂W‖`` per layer.

Post-LN: the gradient of the last layers' weights is large and grows with the layer index, which is why
Post-LN needs learning-rate warmup; Pre-LN: roughly the same norm for every layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(param_name: str) -> int | None:
    """The block index in a qualified parameter name (``blocks.3.mlp.fc.weight`` → 3), else None."""
    m = _LAYER_INDEX.search(param_name)
    return int(m.group(1)) if m else None


def grad_norm_per_layer(model: nn.Module, *, matrices_only: bool = True,
                        include: Callable[[str], bool] | None = None) -> dict[int, float]:
    """``sqrt(Σ ‖∂L/∂W‖²)`` over the weight matrices of each numbered block, from the ``.grad`` already
    accumulated in ``model`` (call after ``loss.backward()``). ``matrices_only`` keeps 2-D weights (the
    linear maps; norm gains and biases are left out); ``include(name)`` narrows it further (e.g. to the
    second FFN matrix ``W^{2,l}`` of Xiong et al.)."""
    sums: dict[int, float] = {}
    for name, p in model.named_parameters():
        i = layer_index(name)
        if i is None or p.grad is None or (matrices_only and p.dim() < 2) or (include and not include(name)):
            continue
        sums[i] = sums.get(i, 0.0) + p.grad.detach().double().pow(2).sum().item()
    return {i: s**0.5 for i, s in sorted(sums.items())}


def grad_norm_at_init(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, *,
                      include: Callable[[str], bool] | None = None) -> dict[int, float]:
    """One forward/backward of a freshly built ``model`` (``model(idx, targets) -> (logits, loss)``) and
    its per-layer gradient norms; the model's gradients are cleared afterwards."""
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    out = grad_norm_per_layer(model, include=include)
    model.zero_grad(set_to_none=True)
    return out
