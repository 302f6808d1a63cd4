"""LayerNorm modules: drop-in ``torch.nn.LayerNorm``, the fused residual add, and adaptive LayerNorm.

Constructor arguments, parameter names, defaults, ``reset_parameters``, ``extra_repr`` and state_dict
keys are those of ``torch.nn.LayerNorm``: a state_dict loads into either class.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.nn._params import param
from normlab.ops.layer_norm import add_layer_norm, layer_norm


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class LayerNorm(nn.Module):
    """``y = (x − mean) / sqrt(var + eps) · weight + bias`` over the trailing ``normalized_shape``
    (biased variance, two-pass statistics); weight starts at 1, bias at 0, as ``torch.nn.LayerNorm``."""

    __constants__: ClassVar[list[str]] = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
        bias: bool = True, device=None, dtype=None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, param(self, "weight"), param(self, "bias"), self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class AddLayerNorm(LayerNorm):
    """Fused residual add + LayerNorm: ``forward(x, residual) -> (LN(x + residual), x + residual)``.

    Same constructor and parameters as :class:`LayerNorm`; ``residual_dtype`` (keyword-only) stores the
    sum in another dtype (e.g. an fp32 residual stream under bf16 activations)."""

    def __init__(
        self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
        bias: bool = True, device=None, dtype=None, *, residual_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.residual_dtype = residual_dtype

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_layer_norm(
            input, residual, self.normalized_shape, param(self, "weight"), param(self, "bias"), self.eps,
            residual_dtype=self.residual_dtype,
        )

    def extra_repr(self) -> str:
        extra = "" if self.residual_dtype is None else f", residual_dtype={self.residual_dtype}"
        return super().extra_repr() + extra


class AdaLayerNorm(nn.Module):
    """Adaptive LayerNorm (adaLN-Zero style): ``LN(x) · (1 + scale(c)) + shift(c)``.

    ``LN`` has no affine parameters; ``scale, shift = scale_shift(c).chunk(2)`` with
    ``scale_shift = Linear(cond_dim, 2·d)`` initialised to zero, so the module starts as a plain
    LayerNorm. ``c`` has shape ``(B, cond_dim)`` and is broadcast over the middle dims of ``x``
    (``(B, d)``, ``(B, T, d)``, … with ``d`` = ``normalized_shape``)."""

    def __init__(
        self, normalized_shape: int | Sequence[int], cond_dim: int, eps: float = 1e-5, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.cond_dim = int(cond_dim)
        self.eps = eps
        d = math.prod(self.normalized_shape)
        self.scale_shift = nn.Linear(self.cond_dim, 2 * d, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.scale_shift.weight)
        nn.init.zeros_(self.scale_shift.bias)

    def forward(self, input: Tensor, c: Tensor) -> Tensor:
        shape = self.normalized_shape
        if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[1] != self.cond_dim:
            got = list(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"expected condition c of shape (B, {self.cond_dim}) (B, cond_dim), got {got}")
        if input.dim() < len(shape) + 1 or input.shape[0] != c.shape[0]:
            raise ValueError(
                f"expected input of shape (B, ..., {', '.join(map(str, shape))}) with B = {c.shape[0]} "
                f"(the batch of c), got {list(input.shape)}"
            )
        y = layer_norm(input, shape, None, None, self.eps)
        # the condition in the module's dtype (a bf16 c with fp32 parameters); the result in the input's
        scale, shift = self.scale_shift(c.to(self.scale_shift.weight.dtype)).chunk(2, dim=-1)
        view = (c.shape[0],) + (1,) * (input.dim() - 1 - len(shape)) + shape
        return (y * (1 + scale.reshape(view)) + shift.reshape(view)).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, cond_dim={self.cond_dim}, eps={self.eps}"
