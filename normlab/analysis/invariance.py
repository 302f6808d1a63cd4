"""Invariance properties of LayerNorm and RMSNorm, measured (Zhang & Sennrich 2019, Table 1).

For ``x = W h`` and a norm ``N``:

========================  =========  =======
transformation            LayerNorm  RMSNorm
========================  =========  =======
input scaling x → αx      yes        yes
weight scaling W → δW     yes        yes
re-centering x → x + c·1  yes        no
========================  =========  =======

Scale invariance also makes the gradient scale inversely: ``‖∂L/∂(δW)‖ = ‖∂L/∂W‖ / δ``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: A relative change below this (float64, eps ≈ 0) counts as "invariant".
INVARIANT_RTOL = 1e-6


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def measure_invariances(
    norm: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    d: int = 64,
    rows: int = 32,
    *,
    alpha: float = 3.0,
    delta: float = 4.0,
    c: float = 2.5,
    seed: int = 0,
) -> dict[str, float | bool]:
    """Relative output changes of ``norm`` (float64) under the three transformations of Table 1, and the
    gradient ratio ``δ·‖∂L/∂(δW)‖ / ‖∂L/∂W‖`` (1 when ``‖∂L/∂W‖ ∝ 1/δ``), for ``x = W h``,
    ``L = Σ N(x) ⊙ g`` with fixed random ``h, W, g``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g, dtype=torch.float64)
    w0 = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    proj = torch.randn(rows, d, generator=g, dtype=torch.float64)

    def out_and_grad(scale: float, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        w = (w0 * scale).requires_grad_(True)
        y = norm(h @ w.T + shift)
        (y * proj).sum().backward()
        return y.detach(), w.grad

    y, gw = out_and_grad(1.0)
    y_delta, gw_delta = out_and_grad(delta)
    y_shift, _ = out_and_grad(1.0, shift=c)
    y_alpha = norm(alpha * (h @ w0.T)).detach()
    res = {
        "input_scaling": _rel_change(y_alpha, y),
        "weight_scaling": _rel_change(y_delta, y),
        "recentering": _rel_change(y_shift, y),
        "grad_ratio": (delta * gw_delta.norm() / gw.norm()).item(),
    }
    for k in ("input_scaling", "weight_scaling", "recentering"):
        res[k + "_invariant"] = res[k] < INVARIANT_RTOL
    return res


#: The paper's Table 1 (which transformations each norm is invariant to).
PAPER_TABLE1 = {
    "LayerNorm": {"input_scaling": True, "weight_scaling": True, "recentering": True},
    "RMSNorm": {"input_scaling": True, "weight_scaling": True, "recentering": False},
}
