"""The GPU bench's case logic on CPU tensors: the same inputs, byte counts and timed calls as the CPU
bench (normlab.bench.cases), its result rows and report. Triton falls back to the reference on CPU, so
this checks the plumbing, not the kernels."""

from __future__ import annotations

import pytest
import torch

from normlab.bench import cases, cuda


@pytest.mark.parametrize("op", cuda.OPS)
def test_implementations_are_the_cases_under_the_gpu_names(op):
    impls = cuda.implementations(op, 16, compile_reference=False, device="cpu")
    assert set(impls) == {"normlab (triton)", "torch"}  # Liger only where importable, and only on CUDA
    inp = cases.make_inputs(op, 4, 16, torch.float32, "cpu", requires_grad=False)
    want = cases.implementations(op, 16, "cpu", compile_reference=False)["torch"](inp)
    for name, fn in impls.items():
        got = fn(inp)
        assert len(got) == len(want), name
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, mode", [("rms_norm", "fwd"), ("add_layer_norm", "fwd+bwd")])
def test_run_case_rows_count_bytes_as_the_cpu_bench(op, mode):
    impls = cuda.implementations(op, 32, compile_reference=False, device="cpu")

    def broken(inputs):
        raise RuntimeError("unsupported here")

    impls["broken"] = broken
    rows = cuda.run_case(op, 8, 32, torch.float32, mode, "cpu", impls, samples=1, min_time=0.0)
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"normlab (triton)", "torch", "broken"}
    assert "unsupported here" in by_impl["broken"]["error"] and "ms" not in by_impl["broken"]
    nbytes = cases.bytes_moved(op, mode, cases.make_inputs(op, 8, 32, torch.float32, "cpu", requires_grad=False))
    for name in ("normlab (triton)", "torch"):
        r = by_impl[name]
        assert (r["op"], r["rows"], r["n"], r["dtype"], r["mode"]) == (op, 8, 32, "float32", mode)
        assert r["ms"] > 0 and r["GB/s"] * 1e9 * r["ms"] / 1e3 == pytest.approx(nbytes)
        assert r["% of copy"] == pytest.approx(100 * r["GB/s"] / r["copy GB/s"])
        assert r["x torch"] == pytest.approx(by_impl["torch"]["ms"] / r["ms"]) and r["x compiled"] is None
        assert (r["peak MiB"] is None) == (mode == "fwd")
    table = cuda.markdown(rows, "cpu")
    assert table.count(f"| {op} | 8×32 | float32 | {mode} |") == 3 and "error: RuntimeError" in table
    checks = cuda.targets(rows)
    assert all(c.startswith(("ok ", "MISS")) for c in checks)
    # n < 1024: no forward target; fwd+bwd of a plain norm against torch
    assert len(checks) == (1 if mode == "fwd+bwd" and op in ("rms_norm", "layer_norm") else 0)
