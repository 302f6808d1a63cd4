"""The benchmark's plumbing on a tiny shape: it measures, counts bytes as docs/architecture.md §8 says and reports."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.bench.cases import bytes_moved, make_inputs
from normlab.bench.report import markdown
from normlab.cli.bench import add_arguments, main


def test_bytes_counted_as_specified():
    inp = make_inputs("rms_norm", 8, 16, torch.bfloat16, "cpu", requires_grad=False)
    big, params = 8 * 16 * 2, 16 * 2
    assert bytes_moved("rms_norm", "fwd", inp) == 2 * big + params
    assert bytes_moved("rms_norm", "fwd+bwd", inp) == 5 * big + 3 * params
    fused = make_inputs("add_layer_norm", 8, 16, torch.float32, "cpu", requires_grad=False)
    assert bytes_moved("add_layer_norm", "fwd", fused) == 4 * 8 * 16 * 4 + 2 * 16 * 4


def test_tiny_run_writes_results(tmp_path, monkeypatch):
    import argparse

    monkeypatch.setenv("NORMLAB_BENCH_REEXEC", "1")  # no re-exec inside pytest
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--shapes", "64x32", "--ops", "add_rms_norm", "--dtypes", "float32", "--no-compile",
                              "--out", str(tmp_path)])
    assert main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"normlab", "normlab add, then norm", "torch", "reference"} <= impls
    assert all("ms" in r and r["ms"] > 0 and r["pct_copy"] > 0 for r in data["results"])
    assert all(r["peak_mb"] >= 0 for r in data["results"] if r["mode"] == "fwd+bwd")
    assert data["environment"]["malloc"] and data["environment"]["cpu"]
    assert (tmp_path / "results.png").stat().st_size > 0
    table = markdown(data["results"])
    assert "copy_ (same run)" in table and "**normlab**" in table
    assert "vs normlab add, then norm" in (tmp_path / "results.md").read_text()


def _rounds(interleaved_medians, samples=8):
    calls = []
    interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, lambda: None,
                        samples=samples, min_time=0.0)
    sampled = calls[4:]
    return [sampled[i:i + 2] for i in range(0, len(sampled), 2)]


def test_samples_are_taken_round_robin_and_errors_reported():
    """Every round samples each implementation once (drift of the machine hits all alike), in an order
    that changes between rounds; one that raises is reported as its error without stopping the others."""
    from normlab.bench.run import interleaved_medians

    calls = []

    def broken():
        raise RuntimeError("no kernel")

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "broken": broken}
    out = interleaved_medians(fns, lambda: None, samples=3, min_time=0.0)
    assert isinstance(out["broken"], RuntimeError) and out["a"] > 0 and out["b"] > 0
    sampled = calls[4:]  # after calibration: warm-up and one timed call each
    rounds = [sampled[i:i + 2] for i in range(0, len(sampled), 2)]
    assert len(rounds) == 3 and all(sorted(r) == ["a", "b"] for r in rounds)
    orders = {tuple(r) for r in _rounds(interleaved_medians)}
    assert orders == {("a", "b"), ("b", "a")}, "the order never changes between rounds"


# tiny settings, so that a check that lets a bad value through fails fast instead of running the real benchmark
TINY = ["--shapes", "8x8", "--ops", "rms_norm", "--dtypes", "float32", "--modes", "fwd", "--no-compile", "--no-memory"]


@pytest.mark.parametrize("args, expected", [
    (["--modes", "xyz"], "--modes: invalid choice 'xyz' (choose from fwd, fwd+bwd)"),
    (["--modes", "fwd,bwd"], "--modes: invalid choice 'bwd'"),
    (["--ops", "foo"],
     "--ops: invalid choice 'foo' (choose from rms_norm, layer_norm, add_rms_norm, add_layer_norm, dyt)"),
    (["--dtypes", "int8"], "--dtypes: invalid choice 'int8' (choose from float32, bfloat16, float16)"),
    (["--shapes", "abc"], "--shapes: expected ROWSxN with positive integers"),
    (["--shapes", "0x0"], "--shapes: expected ROWSxN with positive integers"),
    (["--shapes", "64x32,64x"], "--shapes: expected ROWSxN with positive integers, e.g. 4096x768, got '64x'"),
    (["--threads", "-1"], "--threads: expected a positive integer"),
    (["--threads", "0"], "--threads: expected a positive integer"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--min-time", "nan"], "--min-time: expected a finite number > 0, got 'nan'"),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, monkeypatch, args, expected):
    from normlab.cli import main as cli

    monkeypatch.setenv("NORMLAB_BENCH_REEXEC", "1")  # no re-exec inside pytest
    with pytest.raises(SystemExit) as e:
        cli(["bench", *TINY, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {expected}" in err, err
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from normlab.cli import main as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cli(["bench", *TINY, "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert e.value.code == 2 and "argument --device: 'cuda': no CUDA device is visible" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("options, expected", [
    (dict(samples=5), "--samples must be >= 7"), (dict(min_time=0.01), "--min-time >= 0.03"),
    (dict(run_ops=False), "--no-ops without --models: nothing to time"),
    (dict(device="cuda", models=["study"]), "--models and --no-ops are CPU options"),
    (dict(device="cuda"), "no CUDA device is visible to torch"),  # through normlab.bench.cuda.benchmark
])
def test_the_library_refuses_bad_options_before_any_work(tmp_path, monkeypatch, options, expected):
    """``normlab.bench.benchmark`` takes plain parameters; ``normlab bench`` reports its refusals as usage errors."""
    from normlab.bench import BenchArgumentError, benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchArgumentError, match=expected):
        benchmark(ops=["rms_norm"], shapes=[(8, 8)], out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_samples_below_seven_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from normlab.cli import main as cli

    monkeypatch.setenv("NORMLAB_BENCH_REEXEC", "1")
    with pytest.raises(SystemExit) as e:
        cli(["bench", *TINY, "--out", str(tmp_path / "out"), "--samples", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "normlab bench: error: --samples must be >= 7" in err, err
    assert not (tmp_path / "out").exists()

# ---- the shape ladder and DyT ---------------------------------------------------------------------
def test_default_shapes_are_the_design_ladder():
    from normlab.bench import QUICK_SHAPES, STANDARD_SHAPES

    assert STANDARD_SHAPES == [(1, 64), (1, 4096), (768, 128), (4096, 768), (2048, 4096), (8192, 4096),
                               (32768, 1024), (2048, 8192)]
    assert set(QUICK_SHAPES) <= set(STANDARD_SHAPES) and (768, 128) in QUICK_SHAPES


def test_dyt_inputs_and_bytes():
    inp = make_inputs("dyt", 8, 16, torch.bfloat16, "cpu", requires_grad=True)
    assert inp.alpha.shape == (1,) and inp.alpha.dtype == torch.bfloat16 and inp.alpha.requires_grad
    assert inp.residual is None and inp.bias is not None and len(inp.tensors()) == 4
    big, params = 8 * 16 * 2, (16 + 16 + 1) * 2
    assert bytes_moved("dyt", "fwd", inp) == 2 * big + params
    assert bytes_moved("dyt", "fwd+bwd", inp) == 5 * big + 3 * params


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# relative to the largest |value| of normlab's result: bf16 forwards round once or twice; torch's bf16
# LayerNorm keeps its statistics in bf16 (its gradients are the loosest)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-1)}


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "dyt"])
def test_every_ladder_case_builds_and_its_implementations_agree(op):
    """Each implementation of each ladder case computes what normlab computes: outputs and gradients
    (rows capped to keep the test short, except 768×128; hidden sizes as in the ladder)."""
    from normlab.bench import STANDARD_SHAPES
    from normlab.bench.cases import implementations

    for rows, n in STANDARD_SHAPES:
        rows = rows if rows * n <= 768 * 128 else max(1, 4096 // n)
        impls = implementations(op, n, "cpu", compile_reference=False)
        assert "normlab" in impls and "torch" in impls
        for dtype, (fwd_tol, grad_tol) in TOLERANCE.items():
            inp = make_inputs(op, rows, n, dtype, "cpu", requires_grad=True)
            results = {}
            for name, impl in impls.items():
                outs = impl(inp)
                upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(k)).to(dtype)
                            for k, o in enumerate(outs)]
                grads = torch.autograd.grad(outs, inp.tensors(), upstream)
                results[name] = ([o.detach() for o in outs], grads)
            ours_out, ours_grads = results["normlab"]
            for name, (outs, grads) in results.items():
                case = f"{op} {rows}×{n} {dtype} {name}"
                assert len(outs) == len(ours_out), case
                for a, b in zip(outs, ours_out):
                    assert a.shape == b.shape and a.dtype == b.dtype and _relative_error(a, b) <= fwd_tol, case
                for a, b in zip(grads, ours_grads):
                    assert _relative_error(a, b) <= grad_tol, f"{case} (gradients)"


# ---- --models -------------------------------------------------------------------------------------
TINY_MODELS = dict(
    n_layer=1, d_model=32, n_head=2, block_size=16, batch_size=2, vocab_size=64,
    llama=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=64),
    llama_batches=((2, 16),), llama_prefix=15,
)
ROW_KEYS = {"model", "step", "dtype", "shape", "torch_ms", "normlab_ms", "speedup", "max_logit_diff", "normlab_modules"}


@pytest.mark.parametrize("group, expected_rows", [("study", 2), ("nanogpt", 2), ("llama", 4)])
def test_models_runner_with_tiny_models(group, expected_rows):
    """Each group runs, its rows are well formed and both sides compute the same logits."""
    from normlab.bench.models import Sizes, run_models
    from normlab.bench.report import models_markdown

    rows = run_models([group], samples=2, min_time=0.0, sizes=Sizes(**TINY_MODELS))
    assert len(rows) == expected_rows
    for r in rows:
        assert ROW_KEYS <= set(r) and "error" not in r, r
        assert (r["torch_ms"] > 0 and r["normlab_ms"] > 0
                and r["speedup"] == pytest.approx(r["torch_ms"] / r["normlab_ms"]))
        assert set(r["calls_per_sample"]) == {"torch", "normlab"}
        assert r["max_logit_diff"] <= (1e-5 if r["dtype"] == "float32" else 1e-2), r
        assert "→" in r["normlab_modules"] or "torch side" in r["normlab_modules"]
    if group == "llama":
        assert [(r["step"], r["dtype"]) for r in rows] == [("forward", "float32"), ("decode step", "float32"),
                                                          ("forward", "bfloat16"), ("decode step", "bfloat16")]
        assert rows[1]["shape"] == "1×1, 15 cached"
    assert models_markdown(rows).count("\n| ") == expected_rows + 1  # header and one line per row


def test_study_gpt_torch_twin_holds_torch_norms_with_the_same_values():
    from normlab.bench.models import Sizes, study_gpt, with_torch_norms

    for norm in ("layernorm", "rmsnorm"):
        ours, step = study_gpt(norm, Sizes(**TINY_MODELS))
        theirs = with_torch_norms(ours)
        normlab_packages = ("normlab.nn", "normlab.models.norms")
        assert not any(type(m).__module__.startswith(normlab_packages) for m in theirs.modules()), norm
        torch_norms = [m for m in theirs.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
        assert len(torch_norms) == len(ours.norm_layers()) > 0, norm
        assert not {id(p) for p in ours.parameters()} & {id(p) for p in theirs.parameters()}  # trained apart
        idx = torch.randint(0, step["vocab"], (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(theirs(idx)[0], ours(idx)[0], rtol=1e-5, atol=1e-6)


def test_study_gpt_has_the_study_default_sizes():
    from normlab.bench.models import Sizes, study_gpt

    model, step = study_gpt("layernorm", Sizes(vocab_size=64))
    c = model.config
    assert (c.n_layer, c.d_model, c.block_size, c.placement, c.norm) == (4, 128, 64, "pre", "layernorm")
    assert (step["batch"], step["seq"]) == (12, 64)


def test_models_flag_parsing():
    import argparse

    from normlab.bench import MODEL_GROUPS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).models == [] and parser.parse_args([]).run_ops
    assert parser.parse_args(["--models"]).models == list(MODEL_GROUPS)
    assert parser.parse_args(["--models", "--no-ops"]).models == list(MODEL_GROUPS)
    args = parser.parse_args(["--models", "llama,study", "--no-ops"])
    assert args.models == ["llama", "study"] and not args.run_ops


@pytest.mark.parametrize("args, expected", [
    (["--models", "bert"], "argument --models: invalid choice 'bert' (choose from study, nanogpt, llama)"),
    (["--no-ops"], "--no-ops without --models: nothing to time"),
])
def test_bad_models_arguments_are_usage_errors(tmp_path, capsys, monkeypatch, args, expected):
    from normlab.cli import main as cli

    monkeypatch.setenv("NORMLAB_BENCH_REEXEC", "1")
    with pytest.raises(SystemExit) as e:
        cli(["bench", *TINY, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_models_only_run_writes_the_models_table(tmp_path, monkeypatch):
    """``--models nanogpt,llama --no-ops`` through the CLI (tiny models): results.json holds the rows,
    results.md the table, no op results and no plot."""
    from normlab.bench import models
    from normlab.cli import main as cli

    monkeypatch.setenv("NORMLAB_BENCH_REEXEC", "1")
    tiny = models.Sizes(**TINY_MODELS)
    monkeypatch.setattr(models, "Sizes", lambda: tiny)  # what a run without --quick builds
    assert cli(["bench", "--models", "nanogpt,llama", "--no-ops", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == [] and len(data["models"]) == 6
    assert [r["model"] for r in data["models"][:2]] == ["nanoGPT, torch.nn.LayerNorm", "nanoGPT, torch.nn.RMSNorm"]
    assert all("error" not in r and r["max_logit_diff"] < 1e-2 for r in data["models"])
    assert data["environment"]["transformers"]
    md = (tmp_path / "results.md").read_text()
    assert ("| nanoGPT, torch.nn.RMSNorm | train step | float32 | 2×16 |" in md
            and "| decode step | bfloat16 | 1×1, 15 cached |" in md)
    assert not (tmp_path / "results.png").exists()


def test_quick_leaves_out_the_secondary_comparisons(tmp_path, monkeypatch):
    from normlab.bench.cases import SECONDARY, implementations

    assert set(implementations("add_rms_norm", 8, "cpu", False, secondary=False)) == {"normlab", "torch"}
    rms_impls = implementations("rms_norm", 8, "cpu", False, secondary=False)
    assert set(rms_impls) == {"normlab", "normlab, one rounding", "torch"}
    monkeypatch.setenv("NORMLAB_BENCH_REEXEC", "1")
    from normlab.cli import main as cli

    assert cli(["bench", "--quick", *TINY, "--ops", "add_layer_norm", "--out", str(tmp_path)]) == 0
    impls = {r["impl"] for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert impls == {"normlab", "torch"} and not impls & set(SECONDARY)
