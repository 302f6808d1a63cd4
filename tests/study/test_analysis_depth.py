"""Depth and attention-logit measurements against their formulas, written out on a small GPT."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.analysis import angular_change, max_attention_logit, residual_stream, stream_rms
from normlab.models import GPT, GPTConfig

CFG = dict(vocab_size=32, block_size=16, n_layer=3, n_head=2, d_model=16)


def model_and_ids(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, **kw)).double().eval()
    return model, torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))


def test_residual_stream_is_the_blocks_inputs_then_the_last_output():
    model, idx = model_and_ids()
    states = residual_stream(model, idx)
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
    want = [x]
    for block in model.transformer.h:
        want.append(block(want[-1]))
    assert len(states) == 4
    for got, w in zip(states, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert stream_rms(states) == pytest.approx([w.pow(2).mean().sqrt().item() for w in want], rel=1e-12)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.transformer.h)  # hooks removed


def test_angular_change_formula():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [2.0, 2.0]]])          # 90° and 0°
    assert angular_change([a, b, -b]) == pytest.approx([0.25, 1.0])


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_max_attention_logit_is_the_largest_causal_score(qk_norm, pos):
    model, idx = model_and_ids(qk_norm=qk_norm, pos=pos)
    got = max_attention_logit(model, idx)
    states = residual_stream(model, idx)
    rope = (model.rope_cos[:10], model.rope_sin[:10]) if pos == "rotary" else None
    for i, block in enumerate(model.transformer.h):
        q, k, _ = block.attn.qkv(block.ln_1(states[i]), rope)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        want = max(s[..., t, : t + 1].max().item() for t in range(10))
        assert got[i] == pytest.approx(want, rel=1e-12)
    assert not any(b.attn._forward_hooks for b in model.transformer.h)


def test_not_a_gpt_is_refused():
    with pytest.raises(ValueError, match="expected a normlab GPT"):
        residual_stream(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))


def test_dyt_alpha_init_reaches_every_norm():
    model, _ = model_and_ids(norm="dyt", dyt_alpha=2.5)
    alphas = [m.alpha.item() for _, m in model.norm_layers()]
    assert alphas and all(a == 2.5 for a in alphas)
    with pytest.raises(ValueError, match="dyt_alpha must be a finite number > 0"):
        GPTConfig(**CFG, dyt_alpha=0.0)
