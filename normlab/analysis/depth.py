"""What depth does to the residual stream (Peri-LN, LayerNorm Scaling) and to attention logits (QK-norm).

- ``residual_stream``: the hidden states entering each block and leaving the last one.
- ``stream_rms``: ``sqrt(mean(h²))`` of each of them; Pre-LN's grows with depth.
- ``angular_change``: ``arccos(cos(h_ℓ, h_ℓ₊₁)) / π`` averaged over tokens, how much block ℓ turns its
  input; near 0 for a block that barely changes it (the "curse of depth").
- ``max_attention_logit``: ``max q·k/√d_head`` over heads and causal positions, per block (Wortsman et
  al. 2023: without QK-norm it grows at high learning rates before training fails).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise ValueError(f"expected a normlab GPT (model.transformer.h holds its blocks), got {type(model).__name__}")
    return list(blocks)


def _forward(model: nn.Module, idx: torch.Tensor) -> None:
    with torch.no_grad():
        model(idx)


def residual_stream(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """``[h_0, …, h_L]`` for token ids ``idx``: the input of each of the ``L`` blocks, then the last one's output."""
    states: list[torch.Tensor] = []
    blocks = _blocks(model)
    handles = [b.register_forward_pre_hook(lambda m, args: states.append(args[0].detach())) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda m, args, out: states.append(out.detach())))
    try:
        _forward(model, idx)
    finally:
        for h in handles:
            h.remove()
    return states


def stream_rms(states: list[torch.Tensor]) -> list[float]:
    """``sqrt(mean(h²))`` over every token and channel, per state, in float64."""
    return [s.double().pow(2).mean().sqrt().item() for s in states]


def angular_change(states: list[torch.Tensor]) -> list[float]:
    """Per block, the mean over tokens of ``arccos(cos(h_ℓ, h_ℓ₊₁)) / π`` (0: unchanged direction, ½: orthogonal)."""
    out = []
    for a, b in itertools.pairwise(states):
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
        out.append((torch.arccos(cos) / math.pi).mean().item())
    return out


def max_attention_logit(model: nn.Module, idx: torch.Tensor) -> list[float]:
    """Per block, ``max q·k/√d_head`` over heads and causal (query ≥ key) positions."""
    logits: list[float] = []

    def hook(attn, args, kwargs, out):
        q, k, _ = attn.qkv(*args, **kwargs)
        s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        T = s.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
        logits.append(s.masked_fill(~causal, -math.inf).max().item())

    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in _blocks(model)]
    try:
        _forward(model, idx)
    finally:
        for h in handles:
            h.remove()
    return logits
