"""RMSNorm modules: drop-in ``torch.nn.RMSNorm`` (plus casting/offset/partial) and the fused residual add.

Constructor arguments, parameter names, defaults, ``extra_repr`` and state_dict keys are those of
``torch.nn.RMSNorm``: a state_dict loads into either class.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.nn._params import param
from normlab.ops._common import check_choice
from normlab.ops.rms_norm import CASTING_MODES, add_rms_norm, partial_size, rms_norm


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) · (offset + weight)`` over the trailing ``normalized_shape``.

    ``casting`` (``"llama"``, ``"gemma"``, ``"none"``), ``offset`` and ``partial`` (pRMSNorm) are
    described in :mod:`normlab.ops.rms_norm`. ``reset_parameters`` sets ``weight = 1 − offset`` so the
    effective scale starts at 1: ones as ``torch.nn.RMSNorm`` for ``offset=0``, zeros for Gemma's
    ``offset=1``. ``normalized_shape=None`` (weightless only) normalizes the input's last dim, whatever its size."""

    __constants__: ClassVar[list[str]] = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self, normalized_shape: int | Sequence[int] | None, eps: float | None = None, elementwise_affine: bool = True,
        device=None, dtype=None, *, casting: str = "llama", offset: float = 0.0, partial: float | None = None,
    ) -> None:
        super().__init__()
        if normalized_shape is None and elementwise_affine:
            raise ValueError(
                "normalized_shape=None (the input's last dim) needs elementwise_affine=False: a weight has a shape"
            )
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = None if normalized_shape is None else tuple(int(s) for s in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.casting = check_choice(casting, "casting mode", CASTING_MODES)
        self.offset = float(offset)
        self.partial = partial
        partial_size(1, partial)  # validates 0 < partial ≤ 1 now, not at the first forward
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, input: Tensor) -> Tensor:
        shape = input.shape[-1:] if self.normalized_shape is None else self.normalized_shape
        return rms_norm(
            input, shape, param(self, "weight"), self.eps, casting=self.casting, offset=self.offset,
            partial=self.partial,
        )

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.casting != "llama":
            s += f", casting={self.casting!r}"
        if self.offset != 0.0:
            s += f", offset={self.offset}"
        if self.partial is not None:
            s += f", partial={self.partial}"
        return s


class AddRMSNorm(RMSNorm):
    """Fused residual add + RMSNorm: ``forward(x, residual) -> (RMSNorm(x + residual), x + residual)``.

    Same constructor and parameters as :class:`RMSNorm`; ``residual_dtype`` (keyword-only) stores the
    sum in another dtype (e.g. an fp32 residual stream under bf16 activations)."""

    def __init__(
        self, normalized_shape: int | Sequence[int], eps: float | None = None, elementwise_affine: bool = True,
        device=None, dtype=None, *, casting: str = "llama", offset: float = 0.0, partial: float | None = None,
        residual_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            normalized_shape, eps, elementwise_affine, device, dtype, casting=casting, offset=offset, partial=partial
        )
        self.residual_dtype = residual_dtype

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_rms_norm(
            input, residual, self.normalized_shape, param(self, "weight"), self.eps, casting=self.casting,
            offset=self.offset, partial=self.partial, residual_dtype=self.residual_dtype,
        )

    def extra_repr(self) -> str:
        extra = "" if self.residual_dtype is None else f", residual_dtype={self.residual_dtype}"
        return super().extra_repr() + extra
