"""normlab.patch / unpatch on torch modules and tiny random Hugging Face models (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import normlab
from normlab import nn as nnl

# non-default norm epsilons, so that a replacement that dropped one would show in the outputs
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
EPS = dict(rms_norm_eps=1e-3)


def tiny(name: str) -> nn.Module:
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                          eos_token_id=0, layer_norm_epsilon=1e-3))
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, **EPS, num_key_value_heads=2, max_position_embeddings=32))
    if name == "gemma":
        config = GemmaConfig(**SMALL, **EPS, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
        return GemmaForCausalLM(config)
    if name == "bert":
        return BertForMaskedLM(BertConfig(**SMALL, max_position_embeddings=32, layer_norm_eps=1e-3))
    raise AssertionError(name)


EXPECTED = {  # replaced classes per model
    "gpt2": {"LayerNorm → LayerNorm": 5},
    "llama": {"LlamaRMSNorm → RMSNorm": 5},
    "gemma": {"GemmaRMSNorm → RMSNorm": 5},
    "bert": {"LayerNorm → LayerNorm": 6},
}
# Hugging Face's Llama/Gemma norms compute in float32 even for float64 inputs; normlab stays in fp64.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
TOL_HF_FP32_NORMS = {torch.float32: 1e-5, torch.float64: 1e-5}


def randomized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """All parameters random (norm weights far from their 1 / 0 init), in ``dtype``, eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2 + 0.1)
    return model.to(dtype).eval()


def run(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradient of a loss on them, per parameter name."""
    model.zero_grad(set_to_none=True)
    logits = model(idx).logits
    (logits.square().mean() + logits.sin().sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def snapshot(model: nn.Module) -> tuple[list, dict]:
    return [(n, type(m), m) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma", "bert"])
def test_patched_hf_model_is_equal(name, dtype):
    torch.manual_seed(0)
    model = randomized(tiny(name), dtype)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    modules, state = snapshot(model)
    ref_logits, ref_grads = run(model, idx)

    report = normlab.patch(model)
    assert report.counts == EXPECTED[name], str(report)
    assert not any(type(m).__name__ in ("LlamaRMSNorm", "GemmaRMSNorm") or type(m) is nn.LayerNorm
                   for m in model.modules())
    logits, grads = run(model, idx)
    tol = (TOL_HF_FP32_NORMS if name in ("llama", "gemma") else TOL)[dtype]
    assert (logits - ref_logits).abs().max().item() <= tol
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        scale = ref_grads[k].abs().max().item() + 1
        assert (grads[k] - ref_grads[k]).abs().max().item() <= tol * scale, k

    assert normlab.unpatch(model) == sum(EXPECTED[name].values())
    after_modules, after_state = snapshot(model)
    assert [(n, t) for n, t, _ in after_modules] == [(n, t) for n, t, _ in modules]
    assert all(a[2] is b[2] for a, b in zip(after_modules, modules))           # the very same objects
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], state[k]) for k in state)
    assert all(after_state[k].dtype == state[k].dtype for k in state)


def test_gemma_offset_and_llama_casting_options():
    gemma, llama = randomized(tiny("gemma"), torch.float32), randomized(tiny("llama"), torch.float32)
    weight = gemma.model.norm.weight
    normlab.patch(gemma), normlab.patch(llama)
    g, l = gemma.model.norm, llama.model.norm
    assert (type(g), g.casting, g.offset, type(l), l.casting, l.offset) == \
        (nnl.RMSNorm, "gemma", 1.0, nnl.RMSNorm, "llama", 0.0)
    assert g.weight is weight and g.eps == 1e-3


def norm_zoo() -> nn.Module:
    shared = nn.LayerNorm(8)
    return nn.ModuleDict(dict(
        ln=nn.LayerNorm(8, eps=1e-3, bias=False), rms=nn.RMSNorm(8, eps=1e-2),
        rms_noaffine=nn.RMSNorm(8, elementwise_affine=False), bn=nn.BatchNorm1d(8, eps=1e-2, momentum=0.3),
        gn=nn.GroupNorm(2, 8, eps=1e-2), a=nn.Sequential(shared, nn.Linear(8, 8)), b=nn.Sequential(shared),
        other=nn.BatchNorm2d(8),
    ))


def test_torch_norms_are_replaced_with_shared_parameters():
    zoo = norm_zoo()
    originals = {n: m for n, m in zoo.named_modules()}
    report = normlab.patch(zoo)
    assert report.counts == {"LayerNorm → LayerNorm": 2, "RMSNorm → RMSNorm": 2, "BatchNorm1d → BatchNorm": 1,
                             "GroupNorm → GroupNorm": 1}
    assert "6 modules replaced" in str(report)
    assert zoo.a[0] is zoo.b[0] and isinstance(zoo.a[0], nnl.LayerNorm)   # one replacement for a shared module
    assert zoo.ln.bias is None and zoo.ln.eps == 1e-3 and zoo.ln.weight is originals["ln"].weight
    assert zoo.rms.casting == "gemma" and zoo.rms_noaffine.weight is None
    assert zoo.bn.running_mean is originals["bn"].running_mean
    assert type(zoo.other) is nn.BatchNorm2d                                 # no normlab equivalent: untouched
    x = torch.randn(6, 8, dtype=torch.float64)
    zoo.double()
    for name in ("ln", "rms", "gn"):
        assert (zoo[name](x) - originals[name].double()(x)).abs().max().item() <= 1e-12
    zoo.bn.train()(x)                                                       # running stats land in the original
    assert originals["bn"].num_batches_tracked.item() == 1
    torch.testing.assert_close(zoo.bn.running_mean, 0.3 * x.mean(0))        # with its momentum
    stats = zoo.bn.running_mean, zoo.bn.running_var
    want = torch.nn.functional.batch_norm(x, *stats, zoo.bn.weight, zoo.bn.bias, False, 0.0, 1e-2)
    assert (zoo.bn.eval()(x) - want).abs().max().item() <= 1e-12           # and its eps
    running_mean = zoo.bn.running_mean
    normlab.unpatch(zoo)
    assert all(zoo.get_submodule(n) is m for n, m in originals.items() if n)
    # what happened while patched stays: .double() replaced the buffers, the step updated them, eval()
    assert zoo.bn.running_mean is running_mean and zoo.bn.running_var.dtype == torch.float64
    assert not zoo.bn.training and zoo.gn.weight.dtype == torch.float64


def test_target_filters_families():
    zoo = norm_zoo()
    report = normlab.patch(zoo, target="rmsnorm")
    assert report.counts == {"RMSNorm → RMSNorm": 2}
    assert type(zoo.ln) is nn.LayerNorm
    report2 = normlab.patch(zoo, target="layernorm")
    assert report2.counts == {"LayerNorm → LayerNorm": 2}
    assert normlab.unpatch(zoo) == 5                                        # both patches undone
    assert type(zoo.rms) is nn.RMSNorm and type(zoo.ln) is nn.LayerNorm and type(zoo.a[0]) is nn.LayerNorm


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="unknown target 'triton'"):
        normlab.patch(norm_zoo(), target="triton")
    with pytest.raises(ValueError, match="no normlab patch to undo"):
        normlab.unpatch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="the model itself is a LayerNorm"):
        normlab.patch(nn.LayerNorm(4))
    assert len(normlab.patch(nn.Linear(2, 2))) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_half_precision_casting_matches_hf_bitwise(name, dtype):
    """casting="llama" / "gemma"+offset 1 reproduce Hugging Face's rounding exactly in bf16/fp16."""
    model = randomized(tiny(name), dtype)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx).logits
        normlab.patch(model)
        assert torch.equal(model(idx).logits, ref)
