"""A ``normlab.patch``-ed Hugging Face model (Llama, Qwen3, Gemma) under ``torch.compile(fullgraph=True)``: one
graph, the norms in it as normlab's operators (no graph break at them), and the eager model's logits and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import normlab

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-3)
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the gradient's largest entry
# Qwen3: q_norm and k_norm in every layer; Gemma: the (1 + w) scale, fp32 throughout
NORMS = {"llama": ("LlamaRMSNorm", 5), "qwen3": ("Qwen3RMSNorm", 9), "gemma": ("GemmaRMSNorm", 5)}


def tiny(name: str, dtype: torch.dtype) -> nn.Module:
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif name == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=8))
    else:
        model = GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights far from their init of ones
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + 0.1)
    return model.to(dtype).eval()


def normlab_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the normlab operators the graph calls, in order."""
    ops = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    names = [str(op).removesuffix(".default") for op in ops
             if isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket)]
    return [name for name in names if name.startswith("normlab.")]


def logits_and_grads(model: nn.Module, forward, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = forward(idx)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", [None, "reference"])  # None: the default choice (cpu kernels where built)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma"])
def test_patched_hf_model_compiles_to_one_graph_with_the_norms(name, dtype, backend):
    model = tiny(name, dtype)
    hf_class, count = NORMS[name]
    report = normlab.patch(model)
    assert report.counts == {f"{hf_class} → RMSNorm": count}, str(report)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    graphs = []

    def recording(gm, example_inputs):  # dynamo's graph as it is, then run by aot_eager (autograd traced)
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def forward(i):
        return model(i, use_cache=False).logits

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend=recording)  # fullgraph: a break raises
    with normlab.backend(backend) if backend else contextlib.nullcontext():
        eager_logits, eager_grads = logits_and_grads(model, forward, idx)
        logits, grads = logits_and_grads(model, compiled, idx)

    assert len(graphs) == 1
    ops = normlab_ops(graphs[0])
    assert len(ops) == count, ops
    # normlab.rms_norm: the native cpu operator; normlab.py_rms_norm: the Python backends' custom op
    expected = [{"normlab.py_rms_norm"}] if backend == "reference" else [{"normlab.rms_norm"}, {"normlab.py_rms_norm"}]
    assert set(ops) in expected, ops
    # the forward runs the same operators on the same inputs: compiled and eager logits agree bit for bit
    assert torch.equal(logits, eager_logits)
    assert grads.keys() == eager_grads.keys()
    for k in grads:  # aot's backward of attention and embedding sums in other orders: rounding-level differences
        scale = eager_grads[k].abs().max().item()
        assert (grads[k] - eager_grads[k]).abs().max().item() <= GRAD_TOL[dtype] * scale, k


@pytest.mark.slow
def test_patched_llama_under_inductor_matches_eager():
    model = tiny("llama", torch.float32)
    normlab.patch(model)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    explanation = torch._dynamo.explain(lambda i: model(i, use_cache=False).logits)(idx)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(idx, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True)(idx, use_cache=False).logits
    # inductor fuses and reorders the matmuls and pointwise code around the norms: rounding-level differences
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
