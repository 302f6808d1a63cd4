"""The benchmark's plumbing on a tiny shape: it measures, counts bytes as DESIGN §5 says and reports."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.bench import add_arguments, main
from normlab.bench.cases import bytes_moved, make_inputs
from normlab.bench.report import markdown


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
    args = parser.parse_args(["--shapes", "64x32", "--ops", "add_rms_norm", "--dtypes", "float32", "--no-compile", "--out", str(tmp_path)])
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
    (["--ops", "foo"], "--ops: invalid choice 'foo' (choose from rms_norm, layer_norm, add_rms_norm, add_layer_norm, dyt)"),
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
