"""Geometry of hidden vectors relative to the uniform vector ``1`` (Gupta et al. 2024).

``cos(x, 1) = <x, 1> / (‖x‖ ‖1‖) = mean(x) / rms(x)``. For a random Gaussian vector of size ``d``,
``E|cos(x, 1)| ≈ sqrt(2/π) / sqrt(d)``. LayerNorm's output (before its affine map) has ``cos = 0`` and
norm ``sqrt(d)``; and ``LN(αx + c·1) = LN(x)`` for every ``α > 0``: the mean and scale it removes cannot
be recovered by any affine map afterwards (irreversibility).
"""

from __future__ import annotations

import math

import torch


def cos_uniform(x: torch.Tensor) -> torch.Tensor:
    """``cos(x, 1) = mean(x) / rms(x)`` of every vector along the last dim (0 for an all-zero vector)."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"cos_uniform expects a tensor with a non-empty last dim, got shape {tuple(x.shape)}")
    xf = x.double() if x.dtype != torch.float64 else x
    mean = xf.mean(-1)
    rms = xf.pow(2).mean(-1).sqrt()
    return torch.where(rms > 0, mean / rms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mean))


def random_baseline(d: int) -> float:
    """``E|cos(x, 1)|`` for ``x ~ N(0, I_d)``: ``sqrt(2/π) / sqrt(d)`` (large-``d`` limit)."""
    if d < 1:
        raise ValueError(f"random_baseline expects d ≥ 1, got {d}")
    return math.sqrt(2 / math.pi) / math.sqrt(d)


def layer_norm_plain(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """LayerNorm without affine map, ``(x − mean) / sqrt(var + eps)`` (biased variance), in float64."""
    xf = x.double()
    mu = xf.mean(-1, keepdim=True)
    var = (xf - mu).pow(2).mean(-1, keepdim=True)
    return (xf - mu) / (var + eps).sqrt()


def layer_norm_geometry(x: torch.Tensor) -> dict[str, float]:
    """What LayerNorm does to the geometry of ``x``: max ``|cos(LN(x), 1)|`` (→ 0) and the norm of
    ``LN(x)`` divided by ``sqrt(d)`` (→ 1), together with the same quantities of the input."""
    y = layer_norm_plain(x)
    d = x.shape[-1]
    return {
        "d": d,
        "input_mean_abs_cos": cos_uniform(x).abs().mean().item(),
        "output_max_abs_cos": cos_uniform(y).abs().max().item(),
        "output_norm_over_sqrt_d_min": (y.norm(dim=-1) / math.sqrt(d)).min().item(),
        "output_norm_over_sqrt_d_max": (y.norm(dim=-1) / math.sqrt(d)).max().item(),
    }


def irreversibility(x: torch.Tensor, alpha: float = 3.0, c: float = 5.0) -> float:
    """``max |LN(αx + c·1) − LN(x)|`` in float64: ~1e-15 because LayerNorm forgets mean and scale."""
    if alpha <= 0:
        raise ValueError(f"irreversibility expects alpha > 0, got {alpha}")
    return (layer_norm_plain(alpha * x.double() + c) - layer_norm_plain(x)).abs().max().item()


def summarize_cos(x: torch.Tensor) -> dict[str, float]:
    """Mean of ``cos(x, 1)``, mean of ``|cos|`` and the random baseline for the same ``d``."""
    c = cos_uniform(x.reshape(-1, x.shape[-1]))
    d = x.shape[-1]
    return {
        "d": d,
        "mean_cos": c.mean().item(),
        "mean_abs_cos": c.abs().mean().item(),
        "baseline": random_baseline(d),
        "ratio": c.abs().mean().item() / random_baseline(d),
    }
