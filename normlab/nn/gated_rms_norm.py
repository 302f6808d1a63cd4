"""Gated RMSNorm module (Mamba-2's ``RMSNormGated``): ``forward(hidden_states, gate=None)``.

The constructor follows the Hugging Face gated norms (``hidden_size, eps, group_size, norm_before_gate``)
plus torch's ``device, dtype``; ``casting`` and ``offset`` are :mod:`normlab.ops.gated_rms_norm`'s.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.ops._common import check_choice
from normlab.ops.gated_rms_norm import CASTING_MODES, gated_rms_norm, resolve_group_size


class GatedRMSNorm(nn.Module):
    """``rmsnorm_groups(x · silu(gate)) · (offset + weight)``, or with ``norm_before_gate``
    ``rmsnorm_groups(x) · (offset + weight) · silu(gate)``; ``gate=None`` in forward skips the gate.

    ``group_size`` (a divisor of ``hidden_size``; None: one group) sets the elements each RMS is taken over.
    ``reset_parameters`` sets ``weight = 1 − offset``: the effective scale starts at 1."""

    __constants__: ClassVar[list[str]] = ["normalized_shape", "eps", "group_size", "norm_before_gate"]

    def __init__(
        self, hidden_size: int, eps: float | None = 1e-6, group_size: int | None = None, norm_before_gate: bool = False,
        device=None, dtype=None, *, casting: str = "llama", offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.normalized_shape = (int(hidden_size),)
        self.eps = eps
        self.group_size = None if group_size is None else resolve_group_size(group_size, self.normalized_shape[0])
        self.norm_before_gate = bool(norm_before_gate)
        self.casting = check_choice(casting, "casting mode", CASTING_MODES)
        self.offset = float(offset)
        self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        return gated_rms_norm(
            hidden_states, gate, self.normalized_shape, self.weight, self.eps, group_size=self.group_size,
            norm_before_gate=self.norm_before_gate, casting=self.casting, offset=self.offset,
        )

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape[0]}, eps={self.eps}, group_size={self.group_size}"
        s += f", norm_before_gate={self.norm_before_gate}"
        if self.casting != "llama":
            s += f", casting={self.casting!r}"
        if self.offset != 0.0:
            s += f", offset={self.offset}"
        return s
