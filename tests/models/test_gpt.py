"""The GPT model: every norm × placement trains, presets, parameter counts, config, nanoGPT weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from normlab.models import GPT, NORMS, Block, GPTConfig
from normlab.models.gpt import PLACEMENTS

TINY = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=16, norm_groups=4)


def batch(cfg: GPTConfig, B: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (B, cfg.block_size + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def train(model: GPT, idx, targets, steps: int = 20, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_and_placement_trains(norm, placement):
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY, norm=norm, placement=placement)
    model = GPT(cfg)
    idx, targets = batch(cfg)
    logits, loss = model(idx, targets)
    assert logits.shape == (4, cfg.block_size, cfg.vocab_size) and loss.shape == ()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    losses = train(model, idx, targets)
    assert all(math.isfinite(v) for v in losses)
    # the bound's margin: docs/benchmarks.md, "Test margins"
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("variant", [
    dict(pos="rotary", mlp="swiglu", bias=False),
    dict(qk_norm=True, placement="pre"),
    dict(qk_norm=True, placement="post", pos="rotary"),
    dict(mlp="gelu_tanh", tie_embeddings=False, final_norm=False),
    dict(mlp="relu", placement="post"),
    dict(dropout=0.1),
])
def test_variants_train(variant):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**TINY, **variant})
    model = GPT(cfg)
    idx, targets = batch(cfg)
    losses = train(model, idx, targets)
    assert losses[-1] < 0.95 * losses[0], losses  # margin: docs/benchmarks.md, "Test margins"


def test_relu_mlp_is_the_original_ffn():
    cfg = GPTConfig(**TINY, mlp="relu")
    block = Block(cfg, layer_idx=0)
    x = torch.randn(2, 5, cfg.d_model)
    m = block.mlp
    torch.testing.assert_close(m(x), m.c_proj(torch.relu(m.c_fc(x))), rtol=0, atol=0)


def expected_params(c: GPTConfig) -> int:
    """Parameter count by formula."""
    d, h, V, L = c.d_model, c.hidden, c.vocab_size, c.n_layer
    b = 1 if c.bias else 0
    norm = {"layernorm": d * (1 + b), "rmsnorm": d * (1 + b)}[c.norm]
    attn = d * 3 * d + 3 * d * b + d * d + d * b
    n_fc = 2 if c.mlp == "swiglu" else 1
    mlp = n_fc * (d * h + h * b) + h * d + d * b
    emb = V * d + (c.block_size * d if c.pos == "learned" else 0)
    head = 0 if c.tie_embeddings else V * d
    qk = 2 * c.head_dim if c.qk_norm else 0
    return emb + L * (2 * norm + attn + mlp + qk) + norm + head


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("overrides", [{}, dict(vocab_size=96, n_layer=3, d_model=64, qk_norm=True)])
def test_preset_parameter_count(preset, overrides):
    cfg = GPTConfig.preset(preset, **overrides)
    assert GPT(cfg).num_params() == expected_params(cfg)


def test_preset_choices():
    g, l = GPTConfig.preset("gpt2"), GPTConfig.preset("llama", n_layer=2)
    assert (g.norm, g.placement, g.mlp, g.pos, g.final_norm, g.tie_embeddings, g.bias) == \
        ("layernorm", "pre", "gelu", "learned", True, True, True)
    assert (l.norm, l.placement, l.mlp, l.pos, l.final_norm, l.tie_embeddings, l.bias, l.n_layer) == \
        ("rmsnorm", "pre", "swiglu", "rotary", True, False, False, 2)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("bert")


def test_full_size_presets_match_published_counts():
    """GPT-2 small has 124,439,808 parameters; Llama-2-7B 6,738,415,616 (built on the meta device)."""
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.preset("gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768))
        llama = GPT(GPTConfig.preset("llama", vocab_size=32000, block_size=4096, n_layer=32, n_head=32,
                                     d_model=4096, mlp_hidden=11008))
    assert gpt2.num_params() == 124_439_808 == expected_params(gpt2.config)
    assert llama.num_params() == 6_738_415_616 == expected_params(llama.config)


@pytest.mark.parametrize("field,value,match", [
    ("norm", "weightnorm", "unknown norm 'weightnorm'"),
    ("placement", "middle", "unknown placement"),
    ("mlp", "tanh", "unknown mlp"),
    ("pos", "alibi", "unknown pos"),
    ("n_head", 3, "divisible by n_head"),
    ("dropout", 1.0, "dropout"),
    ("n_layer", 0, "n_layer must be a positive int"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, field: value})
    with pytest.raises(ValueError, match="norm_groups"):
        GPTConfig(**{**TINY, "norm": "groupnorm", "norm_groups": 3})


def test_config_dict_round_trip():
    cfg = GPTConfig.preset("llama", **TINY, qk_norm=True)
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


def test_bad_input_raises():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY["block_size"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    for bad in (TINY["vocab_size"], -1):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=16\)"):
            model(torch.full((2, 4), bad, dtype=torch.long))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_norm_layers_in_forward_order(placement):
    model = GPT(GPTConfig(**TINY, placement=placement, qk_norm=True))
    called = []
    for name, m in model.norm_layers():
        m.register_forward_hook(lambda mod, i, o, name=name: called.append(name))
    model(batch(model.config)[0])
    names = [n for n, _ in model.norm_layers()]
    assert called == names
    every = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    assert set(names) == every


def test_deepnorm_constants():
    cfg = GPTConfig(**{**TINY, "n_layer": 3, "d_model": 64}, placement="deepnorm")
    torch.manual_seed(0)
    model = GPT(cfg)
    M, d = cfg.n_layer, cfg.d_model
    alpha, beta = (2 * M) ** 0.25, (8 * M) ** -0.25
    assert all(b.alpha == pytest.approx(alpha) for b in model.transformer.h)
    w = model.transformer.h[0].attn.c_attn.weight
    xavier = math.sqrt(2 / (d + d))
    # sample stds of 4096+ weights; the margin: docs/benchmarks.md, "Test margins"
    assert w[:d].std().item() == pytest.approx(xavier, rel=0.1)           # q: gain 1
    assert w[2 * d:].std().item() == pytest.approx(beta * xavier, rel=0.1)  # v: gain β
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert fc.std().item() == pytest.approx(beta * math.sqrt(2 / (d + cfg.hidden)), rel=0.1)


def test_xavier_init():
    """init="xavier": Xavier-uniform Linears with q, k, v each a (d, d) matrix, zero biases, embeddings
    N(0, 1/d), and no 1/√(2M) scaling of the residual output projections."""
    cfg = GPTConfig(**{**TINY, "n_layer": 3, "d_model": 64}, placement="post", init="xavier")
    torch.manual_seed(0)
    model = GPT(cfg)
    d, h = cfg.d_model, cfg.hidden
    block = model.transformer.h[2]
    w = block.attn.c_attn.weight
    for i in range(3):
        part = w[i * d:(i + 1) * d]
        bound = math.sqrt(6 / (d + d))
        assert part.abs().max().item() <= bound
        assert part.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    for lin, (fan_in, fan_out) in ((block.attn.c_proj, (d, d)), (block.mlp.c_fc, (d, h)), (block.mlp.c_proj, (h, d))):
        assert lin.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
        assert torch.count_nonzero(lin.bias) == 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(d ** -0.5, rel=0.1)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(d ** -0.5, rel=0.1)
    with pytest.raises(ValueError, match="unknown init 'kaiming'"):
        GPTConfig(**TINY, init="kaiming")


def test_batchnorm_leaks_future_tokens_in_training():
    """BatchNorm's batch statistics cover every position: changing the last token changes the
    output at position 0 in training mode, but not in eval mode (running statistics)."""
    torch.manual_seed(0)
    for norm, leaks in (("batchnorm", True), ("layernorm", False)):
        model = GPT(GPTConfig(**TINY, norm=norm))
        idx = batch(model.config)[0]
        other = idx.clone()
        other[:, -1] = (other[:, -1] + 1) % TINY["vocab_size"]
        first = lambda i, model=model: model(i)[0][:, 0]
        assert (not torch.equal(first(idx), first(other))) == leaks
        model.eval()
        assert torch.equal(first(idx), first(other))


def gpt2_reference_forward(sd: dict, idx: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-2 (nanoGPT) forward written with torch.nn.functional straight from a state_dict."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])
    lin = lambda x, p: F.linear(x, sd[p + ".weight"], sd[p + ".bias"])
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    L = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    for i in range(L):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").chunk(3, dim=-1)
        heads = lambda t: t.view(B, T, n_head, -1).transpose(1, 2)
        att = (heads(q) @ heads(k).transpose(-1, -2)) / math.sqrt(q.shape[-1] // n_head)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + lin((att @ heads(v)).transpose(1, 2).reshape(B, T, -1), p + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


def nanogpt_state_dict(V=16, T=8, L=2, d=16, seed=0) -> dict:
    """A nanoGPT-style state_dict: torch.nn.LayerNorm norms, Linear weights, causal-mask buffers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3

    def layer_norm(prefix):
        m = torch.nn.LayerNorm(d, dtype=torch.float64)
        with torch.no_grad():
            m.weight.copy_(1 + r(d))
            m.bias.copy_(r(d))
        return {f"{prefix}.{k}": v for k, v in m.state_dict().items()}

    sd = {"transformer.wte.weight": r(V, d), "transformer.wpe.weight": r(T, d)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd |= layer_norm(p + "ln_1") | layer_norm(p + "ln_2")
        sd[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        for name, (o, n) in {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d),
                             "mlp.c_proj": (d, 4 * d)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(o, n), r(o)
    sd |= layer_norm("transformer.ln_f")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return {"_orig_mod." + k: v for k, v in sd.items()}


def test_nanogpt_state_dict_loads_into_gpt2_preset():
    sd = nanogpt_state_dict()
    cfg = GPTConfig.preset("gpt2", vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=16)
    model = GPT.from_nanogpt_state_dict(sd, cfg).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = batch(cfg)[0]
    plain = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    ref = gpt2_reference_forward(plain, idx, n_head=2)
    assert (model(idx)[0] - ref).abs().max().item() < 1e-12
    # the gpt2 preset's own keys are nanoGPT's keys (minus the mask buffers)
    assert set(GPT(cfg).state_dict()) == {k for k in plain if not k.endswith(".attn.bias")}
    with pytest.raises(RuntimeError, match="Missing key"):
        GPT.from_nanogpt_state_dict({k: v for k, v in sd.items() if "ln_f" not in k}, cfg)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_block_computes_its_placement_formula(placement):
    """Each placement's residual formula (docs/models.md), written out from the block's own sublayers:
    post N(x + F(x)); pre x + F(N(x)); sandwich x + N₂(F(N₁(x))); DeepNorm N(α·x + F(x)), α = (2M)^¼;
    none x + F(x)."""
    cfg = GPTConfig(**{**TINY, "n_layer": 3}, placement=placement)
    torch.manual_seed(0)
    block = Block(cfg, layer_idx=0).eval()
    x = torch.randn(2, 5, cfg.d_model) * 3 + 1
    attn, mlp = (lambda t: block.attn(t, None)), block.mlp
    if placement == "pre":
        h = x + attn(block.ln_1(x))
        want = h + mlp(block.ln_2(h))
    elif placement == "sandwich":
        h = x + block.ln_1_out(attn(block.ln_1(x)))
        want = h + block.ln_2_out(mlp(block.ln_2(h)))
    elif placement in ("post", "deepnorm", "mixln"):  # mixln's block 0 is post
        alpha = (2 * cfg.n_layer) ** 0.25 if placement == "deepnorm" else 1.0
        h = block.ln_1(alpha * x + attn(x))
        want = block.ln_2(alpha * h + mlp(h))
    elif placement == "olmo2":
        h = x + block.ln_1(attn(x))
        want = h + block.ln_2(mlp(h))
    elif placement == "lnscaling":  # block 0: 1/√1
        h = x + attn(block.ln_1(x))
        want = h + mlp(block.ln_2(h))
    else:
        h = x + attn(x)
        want = h + mlp(h)
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("layer_idx", [1, 3, 7])
def test_lnscaling_scales_each_norm_by_its_depth(layer_idx):
    """LayerNorm Scaling (Sun et al. 2025): block ℓ = i + 1 computes x + F(N(x)/√ℓ) for both sub-layers."""
    cfg = GPTConfig(**{**TINY, "n_layer": 8}, placement="lnscaling")
    torch.manual_seed(0)
    block = Block(cfg, layer_idx=layer_idx).eval()
    x = torch.randn(2, 5, cfg.d_model) * 3 + 1
    s = 1 / math.sqrt(layer_idx + 1)
    h = x + block.attn(block.ln_1(x) * s, None)
    want = h + block.mlp(block.ln_2(h) * s)
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)
    pre = Block(GPTConfig(**{**TINY, "n_layer": 8}, placement="pre"), layer_idx=layer_idx).eval()
    pre.load_state_dict(block.state_dict())
    assert not torch.equal(pre(x), block(x))  # the scale changes the block


@pytest.mark.parametrize(("n_layer", "post_layers", "want"), [
    (2, None, ["post", "pre"]), (8, None, ["post", "post", *["pre"] * 6]), (4, 0, ["pre"] * 4), (3, 3, ["post"] * 3),
])
def test_mixln_splits_post_then_pre(n_layer, post_layers, want):
    """Mix-LN (Li et al. 2024): the first ⌊L/4⌋ blocks (at least one, or ``mixln_post_layers``) are post,
    the rest pre."""
    cfg = GPTConfig(**{**TINY, "n_layer": n_layer}, placement="mixln", mixln_post_layers=post_layers)
    model = GPT(cfg)
    assert [b.placement for b in model.transformer.h] == want
    x = torch.randn(2, 5, cfg.d_model)
    for i, block in enumerate(model.transformer.h):
        ref = Block(GPTConfig(**{**TINY, "n_layer": n_layer}, placement=want[i]), layer_idx=i)
        ref.load_state_dict(block.state_dict())
        torch.testing.assert_close(block(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize(("over", "match"), [
    (dict(placement="mixln", mixln_post_layers=5), r"mixln_post_layers must be an int in \[0, n_layer=2\]"),
    (dict(placement="mixln", mixln_post_layers=-1), "mixln_post_layers must be an int"),
    (dict(placement="pre", mixln_post_layers=1), "applies to placement 'mixln', not 'pre'"),
])
def test_mixln_config_errors(over, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**TINY, **over)


def test_block_standalone():
    cfg = GPTConfig(**TINY, placement="sandwich")
    block = Block(cfg, layer_idx=1)
    x = torch.randn(2, 5, cfg.d_model)
    assert block(x).shape == x.shape and block.layer_idx == 1
    assert [n for n, _ in block.norm_layers()] == ["ln_1", "ln_1_out", "ln_2", "ln_2_out"]


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_save_load_round_trip(tmp_path, preset):
    from normlab.models import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, **TINY, norm="batchnorm")).double()
    idx, targets = batch(model.config)
    train(model, idx, targets, steps=2)  # moves the BatchNorm running statistics off their init
    save_pretrained(model.eval(), tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    assert loaded.transformer.wte.weight.dtype == torch.float64
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.config.tie_embeddings
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    with pytest.raises(ValueError, match="not a normlab model directory"):
        load_pretrained(tmp_path)
