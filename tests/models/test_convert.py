"""Exact Pre-LN → Pre-RMSNorm conversion: normlab GPT and Hugging Face GPT-2, refusals, CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from normlab.models import GPT, GPTConfig, load_pretrained, save_pretrained
from normlab.models.convert import gpt_from_hf_gpt2, pre_ln_to_pre_rmsnorm
from normlab.nn import LayerNorm

TOL = {torch.float64: 1e-12, torch.float32: 1e-4}
TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=32)


def probe(vocab: int, B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (norm weights and biases included) random, far from the identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3 + 0.2).to(p.dtype))
    return model


def no_layernorm_left(model: nn.Module) -> bool:
    return not any(isinstance(m, (nn.LayerNorm, LayerNorm)) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [
    dict(),                                                    # gpt2 preset: tied, learned positions, bias
    dict(bias=False, tie_embeddings=False, pos="rotary", mlp="swiglu", qk_norm=True),
    dict(placement="lnscaling"),                               # LayerNorm Scaling: x + F(N(x)/√ℓ), still Pre-LN
])
def test_normlab_gpt_conversion_is_exact(dtype, variant):
    torch.manual_seed(0)
    model = randomize(GPT(GPTConfig.preset("gpt2", **TINY, **variant))).to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = pre_ln_to_pre_rmsnorm(model)
    idx = probe(TINY["vocab_size"])
    err = (model(idx)[0] - converted(idx)[0]).abs().max().item()
    assert err <= TOL[dtype], err
    assert no_layernorm_left(converted) and converted.config.norm == "rmsnorm"
    assert len(converted.norm_layers()) == len(model.norm_layers())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    # the residual stream is now zero-mean: embeddings and branch outputs are centred
    assert converted.transformer.wte.weight.mean(-1).abs().max() < 10 * torch.finfo(dtype).eps
    assert converted.transformer.h[0].mlp.c_proj.weight.mean(0).abs().max() < 10 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hf_gpt2_conversion_is_exact(dtype):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    hf = randomize(hf).to(dtype).eval()
    converted = pre_ln_to_pre_rmsnorm(hf)
    idx = probe(32)
    err = (hf(idx).logits - converted(idx).logits).abs().max().item()
    assert err <= TOL[dtype], err
    assert no_layernorm_left(converted)
    assert any(isinstance(m, nn.LayerNorm) for m in hf.modules())       # the original is untouched
    assert converted.lm_head.weight is not converted.transformer.wte.weight


def test_hf_gpt2_maps_to_normlab_gpt():
    """Weights and settings: a non-default LayerNorm epsilon must carry over too."""
    hf = randomize(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                              layer_norm_epsilon=1e-3)))
    hf = hf.double().eval()
    gpt = gpt_from_hf_gpt2(hf)
    assert gpt.config.mlp == "gelu_tanh" and gpt.config.tie_embeddings and gpt.config.eps == 1e-3
    idx = probe(32)
    assert (hf(idx).logits - gpt(idx)[0]).abs().max().item() < 1e-12


@pytest.mark.parametrize("placement", ["post", "sandwich", "deepnorm", "olmo2", "mixln", "none"])
def test_not_pre_ln_is_refused(placement):
    model = GPT(GPTConfig(**TINY, placement=placement))
    with pytest.raises(ValueError, match=f"placement is '{placement}'"):
        pre_ln_to_pre_rmsnorm(model)


def test_other_refusals():
    with pytest.raises(ValueError, match="norm is 'rmsnorm'"):
        pre_ln_to_pre_rmsnorm(GPT(GPTConfig(**TINY, norm="rmsnorm")))
    with pytest.raises(ValueError, match="no final norm"):
        pre_ln_to_pre_rmsnorm(GPT(GPTConfig(**TINY, final_norm=False)))
    with pytest.raises(ValueError, match="neither a normlab GPT"):
        pre_ln_to_pre_rmsnorm(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)))


def test_branch_not_ending_in_linear_is_refused():
    model = GPT(GPTConfig(**TINY))
    d = TINY["d_model"]
    model.transformer.h[1].mlp.c_proj = nn.Sequential(nn.Linear(4 * d, d), nn.GELU())
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp ends in Sequential, not a linear map"):
        pre_ln_to_pre_rmsnorm(model)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    hf.transformer.h[0].attn.c_proj = nn.Sequential(nn.Linear(d, d), nn.Tanh())
    with pytest.raises(ValueError, match=r"h.0.attn ends in Sequential"):
        pre_ln_to_pre_rmsnorm(hf)


@pytest.mark.parametrize("source", ["normlab", "hf"])
def test_cli_convert_round_trip(tmp_path, capsys, source):
    from normlab.cli import main

    src = tmp_path / "src"
    if source == "normlab":  # saved in float64: the probe shows the identity itself
        model = randomize(GPT(GPTConfig.preset("gpt2", **TINY))).double()
        save_pretrained(model, src)
    else:  # saved in float32: the probe (in float64) shows the rounding of the centred weights
        model = randomize(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2)))
        model.save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--probe-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "0 LayerNorm left" in out
    err = float(out.split("(float64): ")[1].split()[0])
    assert err < (1e-12 if source == "normlab" else TOL[torch.float32]), out
    converted = load_pretrained(tmp_path / "dst")
    assert converted.config.norm == "rmsnorm" and not converted.config.tie_embeddings
    assert no_layernorm_left(converted)


def test_cli_refuses_post_ln(tmp_path, capsys):
    from normlab.cli import main

    save_pretrained(GPT(GPTConfig(**TINY, placement="post")), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    assert "placement is 'post'" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_cli_points_from_a_run_directory_to_its_model(tmp_path):
    from normlab.cli import main

    save_pretrained(GPT(GPTConfig(**TINY)), tmp_path / "run" / "model")
    with pytest.raises(SystemExit, match=r"a study run directory: its model is .*run/model"):
        main(["convert", str(tmp_path / "run"), str(tmp_path / "dst")])


def test_reachable_as_normlab_convert():
    import normlab

    assert normlab.convert.pre_ln_to_pre_rmsnorm is pre_ln_to_pre_rmsnorm


@pytest.mark.parametrize("args, expected", [
    (["--probe-batch", "0"], "argument --probe-batch: expected a positive integer, got '0'"),
    (["--probe-len", "-1"], "argument --probe-len: expected a positive integer, got '-1'"),
])
def test_cli_bad_probe_is_a_usage_error(tmp_path, capsys, args, expected):
    from normlab.cli import main

    save_pretrained(GPT(GPTConfig.preset("gpt2", **TINY)), tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *args])
    assert e.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_cli_probe_longer_than_block_size_is_refused(tmp_path, capsys):
    from normlab.cli import main

    save_pretrained(GPT(GPTConfig.preset("gpt2", **TINY)), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--probe-len", "17"]) == 2
    assert "error: --probe-len 17 exceeds the model's block_size 16" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("dst", [".", "./", "../src", "sub"])
def test_cli_refuses_dst_that_is_or_is_inside_src(tmp_path, capsys, dst):
    from normlab.cli import main

    src = tmp_path / "src"
    save_pretrained(GPT(GPTConfig.preset("gpt2", **TINY)), src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(["convert", str(src), str(src / dst)]) == 2
    assert "is SRC" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # untouched, and no sub/ either


def test_cli_refuses_dst_that_is_a_file(tmp_path, capsys):
    from normlab.cli import main

    save_pretrained(GPT(GPTConfig.preset("gpt2", **TINY)), tmp_path / "src")
    (tmp_path / "dst").write_text("x")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
