"""The native ``cpu`` backend's gated RMSNorm against the reference (docs/architecture.md §7), at the kernel
contract and through the op, on every ISA build this CPU runs."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import dispatch
from normlab.kernels import cpu as K
from normlab.ops.gated_rms_norm import gated_rms_norm_bwd_ref, gated_rms_norm_fwd_ref
from tests.helpers import assert_close_same_dtype, assert_same_bits_on_every_isa, rand, threads

LOW = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5
# (n, group_size): one group, many, groups of one element, odd groups, groups longer than one 1024-block
SIZES = [(1, 1), (24, 8), (33, 11), (767, 767), (4097, 241), (2 * 1024 + 6, 1027), (40, 1)]


def _inputs(rows, n, dtype, gated=True, seed=0):
    x, z = rand(rows, n, dtype=dtype, seed=seed, mean=0.3), rand(rows, n, dtype=dtype, seed=seed + 1, scale=2.0)
    w, dy = rand(n, dtype=dtype, seed=seed + 2, mean=0.5), rand(rows, n, dtype=dtype, seed=seed + 3)
    return x, z if gated else None, w, dy


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n, group_size", SIZES)
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_forward_and_backward_vs_reference(dtype, n, group_size, before, gated):
    x, z, w, dy = _inputs(5, n, dtype, gated)
    for casting, offset in (("llama", 0.0), ("gemma", 1.0)):
        what = f"{dtype} n={n} g={group_size} before={before} gated={gated} {casting}"
        y, rstd = K.gated_rms_norm_fwd(x, z, w, EPS, group_size, before, casting, offset)
        y_same, rstd_same = gated_rms_norm_fwd_ref(x, z, w, EPS, group_size, before, casting, offset)
        y64, rstd64 = gated_rms_norm_fwd_ref(x.double(), _d(z), w.double(), EPS, group_size, before, casting, offset)
        assert rstd.shape == (5, n // group_size) and rstd.dtype == torch.float32
        assert_close_same_dtype(y, y_same, y64, f"y {what}")
        assert_close_same_dtype(rstd, rstd_same, rstd64, f"rstd {what}")
    dx, dz, dw = K.gated_rms_norm_bwd(dy, x, z, w, rstd, group_size, before, 1.0)
    with torch.no_grad():
        same = gated_rms_norm_bwd_ref(dy, x, z, w, rstd_same, EPS, group_size, before, 1.0)
        ref = gated_rms_norm_bwd_ref(dy.double(), x.double(), _d(z), w.double(), rstd64, EPS, group_size, before, 1.0)
    assert (dz is None) == (not gated)
    for name, got, s, r in zip(("dx", "dz", "dw"), (dx, dz, dw), same, ref):
        if got is not None:
            assert got.dtype == dtype
            assert_close_same_dtype(got, s, r, f"{name} {what}")


@pytest.mark.parametrize("dtype", LOW)
def test_fp32_master_weight(dtype):
    x, z, _, _ = _inputs(4, 32, dtype)
    w = rand(32, seed=9, mean=0.5)
    for casting in ("llama", "gemma"):
        y, _ = K.gated_rms_norm_fwd(x, z, w, EPS, 8, True, casting, 0.0)
        y_same, _ = gated_rms_norm_fwd_ref(x, z, w, EPS, 8, True, casting, 0.0)
        y64, _ = gated_rms_norm_fwd_ref(x.double(), z.double(), w.double(), EPS, 8, True, casting, 0.0)
        assert_close_same_dtype(y, y_same, y64, casting)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("before", [False, True])
def test_llama_rounding_within_one_ulp(dtype, before):
    """The llama mode's roundings to the half dtype: the kernel's y is the reference's or one ulp of the input
    dtype next to it (the fp32 values before the roundings differ by a few fp32 ulps, silu's exp included)."""
    x, z, w, _ = _inputs(6, 64, dtype)
    y, _ = K.gated_rms_norm_fwd(x, z, w, EPS, 16, before, "llama", 0.0)
    y_ref, _ = gated_rms_norm_fwd_ref(x, z, w, EPS, 16, before, "llama", 0.0)
    ulp = torch.finfo(dtype).eps * y_ref.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((y.double() - y_ref.double()).abs() <= ulp * 1.01).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_and_threads(dtype, monkeypatch):
    x, z, w, dy = _inputs(300, 256, dtype)

    def run(rows):
        y, rstd = K.gated_rms_norm_fwd(x[rows], z[rows], w, EPS, 64, False, "llama", 0.0)
        return [y, rstd, *K.gated_rms_norm_bwd(dy[rows], x[rows], z[rows], w, rstd, 64, False, 0.0)]

    alone = run(slice(7, 8))
    for m in (8, 255, 300):
        batch = run(slice(0, m))
        for a, b in zip(alone[:4], batch[:4]):  # y, rstd, dx, dz of row 7
            assert torch.equal(b[7:8], a)
    with threads(1, monkeypatch):
        one = run(slice(None))
    with threads(2, monkeypatch):
        two = run(slice(None))
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"


def test_weight_grad_folds_chunk_partials_in_chunk_order(monkeypatch):
    """dw is the sum of fixed 64-row chunk partials added in chunk order: the same bits for any thread count."""
    x, z, w, dy = _inputs(64 * 5 + 3, 96, torch.float32)
    _, rstd = K.gated_rms_norm_fwd(x, z, w, EPS, 32, True, "gemma", 0.0)
    with threads(2, monkeypatch):
        _, _, dw = K.gated_rms_norm_bwd(dy, x, z, w, rstd, 32, True, 0.0)
    want = torch.zeros(96)
    for start in range(0, x.shape[0], K.CHUNK):
        rows = slice(start, start + K.CHUNK)
        with threads(1, monkeypatch):
            want += K.gated_rms_norm_bwd(dy[rows], x[rows], z[rows], w, rstd[rows], 32, True, 0.0)[2]
    assert torch.equal(dw, want)


def test_nan_row_does_not_leak():
    x, z, w, dy = _inputs(6, 40, torch.float32)
    x[2, 3], z[4, 0] = float("nan"), float("inf")
    dy[2], dy[4] = 0.0, 0.0
    y, rstd = K.gated_rms_norm_fwd(x, z, w, EPS, 8, False, "llama", 0.0)
    assert torch.isnan(y[2, :8]).all() and torch.isfinite(y[2, 8:]).all()  # NaN stays in its group
    dx, dz, dw = K.gated_rms_norm_bwd(dy, x, z, w, rstd, 8, False, 0.0)
    assert torch.isfinite(dw).all()
    good = [0, 1, 3, 5]
    ref = K.gated_rms_norm_bwd(dy[good], x[good], z[good], w, rstd[good], 8, False, 0.0)
    assert torch.equal(dx[good], ref[0]) and torch.equal(dz[good], ref[1])


def test_dispatch_serves_gated_rms_norm_natively():
    x, z, w, _ = _inputs(4, 32, torch.bfloat16)
    assert dispatch.select("gated_rms_norm", x, gate=z, weight=w, group_size=8, norm_before_gate=False,
                           casting="llama", offset=0.0) == "cpu"
    assert dispatch.native("cpu", "gated_rms_norm") is torch.ops.normlab.gated_rms_norm
    y = normlab.gated_rms_norm(x, z, 32, w, group_size=8)
    assert torch.equal(y, K.gated_rms_norm_fwd(x, z, w, torch.finfo(torch.float32).eps, 8, False, "llama", 0.0)[0])
    assert dispatch.select("gated_rms_norm", x.double(), gate=z.double(), weight=w.double(), group_size=8,
                           norm_before_gate=False, casting="llama", offset=0.0) == "reference"


def _isa_outputs() -> list[torch.Tensor]:
    out = []
    for dtype in LOW:
        for n, group_size in SIZES:
            x, z, w, dy = _inputs(9, n, dtype)
            x[3, 0], z[4, -1] = float("nan"), float("inf")
            for before in (False, True):
                for casting in ("llama", "gemma"):
                    y, rstd = K.gated_rms_norm_fwd(x, z, w, EPS, group_size, before, casting, 0.5)
                    out += [y, rstd, *K.gated_rms_norm_bwd(dy, x, z, w, rstd, group_size, before, 0.5)]
            out += list(K.gated_rms_norm_fwd(x, None, w, EPS, group_size, False, "llama", 0.0))
    return out


def test_every_isa_build_gives_the_same_bits():
    """AVX2 and AVX-512 agree bitwise, silu's exp included; NaNs agree in place, not in payload."""
    assert_same_bits_on_every_isa(_isa_outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_op_passes_opcheck(dtype):
    x, z, w, _ = _inputs(6, 40, dtype)
    ops = torch.ops.normlab
    for t in (x, z, w):
        t.requires_grad_()
    torch.library.opcheck(ops.gated_rms_norm, (x, z, w, 1e-6, 10, False, "llama", 0.0))
    torch.library.opcheck(ops.gated_rms_norm, (x, z, w, 1e-6, 40, True, "gemma", 1.0))
    torch.library.opcheck(ops.gated_rms_norm, (x, None, None, 1e-6, 8, False, "llama", 0.0))


def test_native_checks_name_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="group_size must be a positive divisor of 8"):
        torch.ops.normlab.gated_rms_norm(x, None, None, 1e-6, 3, False, "llama", 0.0)
    with pytest.raises(RuntimeError, match="gate must be a CPU tensor of the input's shape"):
        torch.ops.normlab.gated_rms_norm(x, torch.randn(2, 4), None, 1e-6, 4, False, "llama", 0.0)
    with pytest.raises(RuntimeError, match="unknown casting mode 'none'"):
        torch.ops.normlab.gated_rms_norm(x, None, None, 1e-6, 4, False, "none", 0.0)
