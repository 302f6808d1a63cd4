"""``DyT`` (Zhu et al. 2025): ``y = weight · tanh(alpha · x) + bias``, a drop-in for LayerNorm.

Parameters ``alpha`` (shape ``(1,)``, init ``alpha_init``), ``weight`` (ones) and ``bias`` (zeros) of
``normalized_shape``, named as in the paper's reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.nn._params import param
from normlab.ops.dyt import dyt


class DyT(nn.Module):
    __constants__: ClassVar[list[str]] = ["normalized_shape", "alpha_init", "elementwise_affine"]

    def __init__(
        self, normalized_shape: int | Sequence[int], alpha_init: float = 0.5, elementwise_affine: bool = True,
        bias: bool = True, device=None, dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = tuple(int(s) for s in shape)
        self.alpha_init = float(alpha_init)
        self.elementwise_affine = elementwise_affine
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        shape = input.shape  # a shorter shape's trailing slice is shorter than normalized_shape: unequal
        if shape[len(shape) - len(self.normalized_shape):] != self.normalized_shape:
            raise ValueError(
                f"expected input with trailing shape {list(self.normalized_shape)} (normalized_shape), "
                f"got shape {list(input.shape)}"
            )
        return dyt(input, param(self, "alpha"), param(self, "weight"), param(self, "bias"))

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, alpha_init={self.alpha_init}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
