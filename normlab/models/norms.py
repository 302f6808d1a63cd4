"""The norm factory of the models: ``make_norm(kind, d)`` builds a :mod:`normlab.nn` module for a
stream of tokens ``(B, T, d)``.

How each kind sees a ``(B, T, C)`` tensor:

- ``layernorm``, ``rmsnorm``, ``dyt``: per token, over the ``C`` channels.
- ``groupnorm``: per token too — the ``C`` channels of each token are split into ``groups`` groups
  of ``C / groups`` consecutive channels, each normalized on its own (the tokens are flattened to
  ``(B·T, C)`` rows, the usual ``(N, C)`` input of GroupNorm). ``groups=1`` is LayerNorm.
- ``batchnorm``: ``BatchNorm(layout="NLC")``, statistics per channel over **all B·T tokens** of the
  batch. In a causal model this mixes positions and sequences: during training a token's output
  depends on later tokens (and other sequences) through the batch mean and variance — it leaks the
  future. In eval mode the running statistics are used and nothing leaks.
- ``none``: ``nn.Identity`` (no normalization).

``bias`` applies to LayerNorm, RMSNorm and DyT (RMSNorm with a bias is :class:`RMSNormWithBias`,
``RMSNorm(x) + b`` — the form an exactly converted Pre-LN model needs); BatchNorm and GroupNorm
always carry their affine shift.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn import BatchNorm, DyT, GroupNorm, LayerNorm, RMSNorm
from normlab.nn._params import param
from normlab.ops.rms_norm import rms_norm

NORMS = ("layernorm", "rmsnorm", "batchnorm", "groupnorm", "dyt", "none")


class RMSNormWithBias(RMSNorm):
    """``y = RMSNorm(x) + b``: RMSNorm (same options) followed by a learnable shift ``b`` (init 0), one fused op.

    Keys ``weight`` and ``bias`` match ``LayerNorm``'s, so a converted Pre-LN state_dict keeps its names.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, **options):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype, **options)
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # the shift fused into the norm where the backend has a native op
        shape = x.shape[-1:] if self.normalized_shape is None else self.normalized_shape
        return rms_norm(x, shape, param(self, "weight"), self.eps, casting=self.casting, offset=self.offset,
                        partial=self.partial, bias=param(self, "bias"))


class TokenGroupNorm(GroupNorm):
    """GroupNorm over the channels of each token: ``(..., C)`` is viewed as ``(rows, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_norm(kind: str, d: int, *, eps: float = 1e-5, bias: bool = True, groups: int = 1, dyt_alpha: float = 0.5,
              device=None, dtype=None) -> nn.Module:
    """A normalization module over the last dim ``d`` of ``(B, T, d)`` tokens (see the module docstring)."""
    kw = dict(device=device, dtype=dtype)
    if kind == "layernorm":
        return LayerNorm(d, eps=eps, bias=bias, **kw)
    if kind == "rmsnorm":
        return RMSNormWithBias(d, eps=eps, **kw) if bias else RMSNorm(d, eps=eps, **kw)
    if kind == "batchnorm":
        return BatchNorm(d, eps=eps, layout="NLC", **kw)
    if kind == "groupnorm":
        if d % groups:
            raise ValueError(f"groupnorm needs d={d} divisible by groups={groups}")
        return TokenGroupNorm(groups, d, eps=eps, **kw)
    if kind == "dyt":
        return DyT(d, alpha_init=dyt_alpha, bias=bias, **kw)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")
