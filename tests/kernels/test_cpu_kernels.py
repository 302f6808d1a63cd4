"""The numba ``cpu`` backend against the references (DESIGN §4), at the kernel contract and through the ops.

Shapes stay small: the cost of this file is mostly numba compiling (or loading from its cache) the two
generic kernels for fp32 and uint16 (bf16/fp16) arrays.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab import dispatch
from normlab.kernels import cpu as K
from normlab.kernels.cpu._numerics import (
    BF16, FP16, HARDWARE_BF16, _bf16_sumsq_exact, _bf16_sumsq_hardware, decode, encode, row_sumsq_min,
)
from normlab.ops.rms_norm import partial_size, rms_norm_apply_ref, rms_norm_bwd_ref, rms_norm_fwd_ref
from tests.helpers import ATOL, assert_close_same_dtype, assert_tolerance_rule, rand, threads

HALF = [torch.bfloat16, torch.float16]
LOW = [torch.float32, *HALF]
ODD_N = [1, 3, 767, 4097]
EPS32 = torch.finfo(torch.float32).eps


# ---- plain-torch LayerNorm reference (two-pass, compute dtype), written out as the spec ---------------
def ln_fwd_ref(x, w, b, eps):
    c = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(c)
    mean = xc.mean(1)
    rstd = torch.rsqrt((xc - mean[:, None]).square().mean(1) + eps)
    y = (xc - mean[:, None]) * rstd[:, None]
    if w is not None:
        y = y * w.to(c)
    if b is not None:
        y = y + b.to(c)
    return y.to(x.dtype), mean, rstd


def ln_bwd_ref(dy, x, w, mean, rstd, dsum=None):
    c = mean.dtype
    xhat = (x.to(c) - mean[:, None]) * rstd[:, None]
    dyc = dy.to(c)
    g = dyc if w is None else dyc * w.to(c)
    dx = rstd[:, None] * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True))
    if dsum is not None:
        dx = dx + dsum.to(c)
    dw = torch.where(dyc == 0, 0.0, dyc * xhat).sum(0)
    return dx.to(x.dtype), dw, dyc.sum(0)


# ---- bf16 / fp16 bit patterns -------------------------------------------------------------------
@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, BF16), (torch.float16, FP16)])
def test_decode_every_half_pattern(dtype, kind):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = np.empty(65536, np.float32)
    decode(bits, got, kind)
    want = torch.from_numpy(bits.view(np.int16)).view(dtype).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # bitwise, signed zeros too


def _edge_floats():
    f32 = np.float32
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0,
                3.3895314e38, 3.4028235e38, -3.4028235e38, 1e-45, 5.96e-8, 2.98e-8, 2.9802322e-8, 6.1e-5,
                6.097555e-5, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-9]
    g = np.random.default_rng(0)
    rand_bits = g.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # exact ties for both formats: a representable value plus half an ulp
    base = g.standard_normal(20_000).astype(np.float32)
    ties_bf16 = (base.view(np.uint32) & np.uint32(0xFFFF0000) | np.uint32(0x8000)).view(np.float32)
    ties_f16 = (base.view(np.uint32) & np.uint32(0xFFFFE000) | np.uint32(0x1000)).view(np.float32)
    small = (g.standard_normal(20_000) * 1e-5).astype(np.float32)  # fp16 subnormal range
    return np.concatenate([np.array(specials, f32), rand_bits, ties_bf16, ties_f16, small])


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, BF16), (torch.float16, FP16)])
def test_encode_rounds_to_nearest_even(dtype, kind):
    """fp32 → half: bitwise torch's cast (round to nearest even, overflow to inf, subnormals), NaN stays NaN."""
    src = _edge_floats()
    got = np.empty(src.shape, np.uint16)
    encode(src, got, kind)
    want = torch.from_numpy(src).to(dtype).view(torch.int16).numpy().view(np.uint16)
    got_f = torch.from_numpy(got.view(np.int16)).view(dtype).float().numpy()
    nan = np.isnan(src)
    assert np.isnan(got_f[nan]).all(), "a NaN was not kept a NaN"
    bad = np.nonzero(got[~nan] != want[~nan])[0]
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {src[~nan][bad[:5]]} -> {got[~nan][bad[:5]]} (torch {want[~nan][bad[:5]]})"
    # spot checks of the rules themselves
    one = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38], dtype=torch.float32).numpy()
    out = np.empty(3, np.uint16)
    encode(one, out, BF16)
    assert list(out) == [0x3F80, 0x3F82, 0x7F80]  # tie → even (down), tie → even (up), overflow → inf


# ---- RMSNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("partial", [None, 0.3])
def test_rms_forward_options(dtype, casting, offset, partial):
    x, w = rand(5, 67, dtype=dtype, mean=0.5), rand(67, dtype=dtype, seed=1)
    k = partial_size(67, partial)
    y, rstd = K.rms_norm_fwd(x, w, 1e-5, casting, offset, k)
    y_same, rstd_same = rms_norm_fwd_ref(x, w, 1e-5, casting, offset, k)
    y64, _ = rms_norm_fwd_ref(x.double(), w.double(), 1e-5, casting, offset, k)
    assert y.dtype == dtype and rstd.dtype == torch.float32
    assert_close_same_dtype(y, y_same, y64, f"{dtype} {casting} o={offset} p={partial}")
    torch.testing.assert_close(rstd, rstd_same, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("weight_dtype", ["input", "fp32"])
def test_rms_casting_modes_round_exactly_like_the_reference(dtype, weight_dtype):
    """Given the kernel's rstd, every casting mode's output is the reference's second half bitwise, with
    weights in the input dtype or fp32 masters (accuracy alone cannot tell: a skipped intermediate
    rounding is more accurate, not less)."""
    x = rand(64, 256, dtype=dtype)
    w = rand(256, dtype=dtype if weight_dtype == "input" else torch.float32, seed=3)
    for casting in ("llama", "none", "gemma"):
        for offset in (0.0, 0.5):
            y, rstd = K.rms_norm_fwd(x, w, 1e-5, casting, offset, 256)
            assert torch.equal(y, rms_norm_apply_ref(x, w, rstd, casting, offset)), f"{casting} offset={offset}"


@pytest.mark.parametrize("n", [8193, 100_000])
def test_long_rows_far_from_zero_meet_the_tolerance_rule(n):
    """fp32 rows of values all near 10⁴: every square has the same sign, and one running sum per vector
    lane piled up n/64 half-ulps (4e-6 relative at n = 8193, twice torch's cascade sum's error plus
    atol). The blocked sums keep the kernels within the rule, forward and backward."""
    x = rand(1, n, dtype=torch.float64, scale=1e-3, mean=1e4).float()
    w, dy = rand(n, seed=1), rand(1, n, seed=2)
    y, rstd = K.rms_norm_fwd(x, w, EPS32, "gemma", 0.0, n)
    ref64, rstd64 = rms_norm_fwd_ref(x.double(), w.double(), EPS32, "gemma", 0.0, n)
    assert_tolerance_rule(y, F.rms_norm(x, (n,), w), ref64, f"rms n={n}")
    dx, _ = K.rms_norm_bwd(dy, x, w, rstd, 0.0, n)
    xt = x.clone().requires_grad_()
    (dx_torch,) = torch.autograd.grad(F.rms_norm(xt, (n,), w), xt, dy)
    dx64, _ = rms_norm_bwd_ref(dy.double(), x.double(), w.double(), rstd64, 0.0, n, EPS32)
    assert_tolerance_rule(dx, dx_torch, dx64, f"rms dx n={n}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", ODD_N)
def test_rms_odd_sizes_vs_torch(dtype, n):
    x, w = rand(3, n, dtype=dtype), rand(n, dtype=dtype, seed=1)
    y, _ = K.rms_norm_fwd(x, w, EPS32, "gemma", 0.0, n)
    ref64, _ = rms_norm_fwd_ref(x.double(), w.double(), EPS32, "gemma", 0.0, n)
    assert_tolerance_rule(y, F.rms_norm(x, (n,), w), ref64, f"rms {dtype} n={n}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", ODD_N)
@pytest.mark.parametrize("partial,offset,affine,dsum", [(None, 0.0, True, False), (0.4, 1.0, True, True), (None, 0.0, False, True)])
def test_rms_backward(dtype, n, partial, offset, affine, dsum):
    """Gradients vs the fp64 reference; torch's place in the rule is the reference in the same dtype."""
    k = partial_size(n, partial)
    x, dy = rand(4, n, dtype=dtype, seed=2), rand(4, n, dtype=dtype, seed=3)
    w = rand(n, dtype=dtype, seed=4) if affine else None
    ds = rand(4, n, dtype=dtype, seed=5) if dsum else None
    _, rstd = K.rms_norm_fwd(x, w, 1e-5, "gemma", offset, k)
    dx, dw = K.rms_norm_bwd(dy, x, w, rstd, offset, k, ds)
    torch.set_grad_enabled(False)
    try:
        dx_same, dw_same = rms_norm_bwd_ref(dy, x, w, rstd, offset, k, 1e-5, ds)
        _, rstd64 = rms_norm_fwd_ref(x.double(), None, 1e-5, "gemma", 0.0, k)
        w64 = None if w is None else w.double()
        dx64, dw64 = rms_norm_bwd_ref(dy.double(), x.double(), w64, rstd64, offset, k, 1e-5, None if ds is None else ds.double())
    finally:
        torch.set_grad_enabled(True)
    assert dx.dtype == dtype
    assert_close_same_dtype(dx, dx_same, dx64, f"dx {dtype} n={n}")
    if affine:
        assert dw.dtype == dtype
        assert_close_same_dtype(dw, dw_same, dw64, f"dw {dtype} n={n}")
    else:
        assert dw is None


def test_rms_fp32_grads_vs_fp64_autograd():
    """The fp32 kernels through the op's autograd against fp64 autograd of the reference formula."""
    x = rand(7, 3, 33, seed=1, scale=2.0)
    w = rand(33, seed=2)
    for casting, offset, partial in [("llama", 0.0, None), ("gemma", 1.0, 0.5)]:
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        normlab.rms_norm(xs, 33, ws, 1e-6, casting=casting, offset=offset, partial=partial, backend="cpu").sin().sum().backward()
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        normlab.rms_norm(x64, 33, w64, 1e-6, casting=casting, offset=offset, partial=partial).sin().sum().backward()
        torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


# ---- LayerNorm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", ODD_N)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_forward_backward(dtype, n, affine):
    x = rand(4, n, dtype=dtype, seed=1, mean=3.0)
    w = rand(n, dtype=dtype, seed=2) if affine != "none" else None
    b = rand(n, dtype=dtype, seed=3) if affine == "wb" else None
    dy = rand(4, n, dtype=dtype, seed=4)
    y, mean, rstd = K.layer_norm_fwd(x, w, b, 1e-5)
    y64, mean64, rstd64 = ln_fwd_ref(x.double(), None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    assert_tolerance_rule(y, F.layer_norm(x, (n,), w, b, 1e-5), y64, f"ln fwd {dtype} n={n}")
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    dx, dw, db = K.layer_norm_bwd(dy, x, w, b, mean, rstd)
    # torch's own gradients in the same dtype take torch's place in the rule
    xt = x.clone().requires_grad_()
    wt = None if w is None else w.clone().requires_grad_()
    bt = None if b is None else b.clone().requires_grad_()
    F.layer_norm(xt, (n,), wt, bt, 1e-5).backward(dy)
    dx64, dw64, db64 = ln_bwd_ref(dy.double(), x.double(), None if w is None else w.double(), mean64, rstd64)
    assert_tolerance_rule(dx, xt.grad, dx64, f"ln dx {dtype} n={n}")
    if w is not None:
        assert_tolerance_rule(dw, wt.grad, dw64, f"ln dw {dtype} n={n}")
    else:
        assert dw is None
    if b is not None:
        assert_tolerance_rule(db, bt.grad, db64, f"ln db {dtype} n={n}")
    else:
        assert db is None


@pytest.mark.parametrize("mean,scale", [(1e4, 1e-2), (10.0, 1e-3)])
def test_layer_norm_large_mean_tiny_variance(mean, scale):
    """Corrected two-pass variance: no cancellation at mean 1e4 (E[x²] − E[x]² would give garbage), and
    deviations accurate to the spread of the row, not to ulp(mean) — forward and backward."""
    x, dy, w = rand(8, 52, scale=scale, mean=mean), rand(8, 52, seed=1), rand(52, seed=2)
    y, m, rstd = K.layer_norm_fwd(x, w, None, 1e-5)
    y64, m64, rstd64 = ln_fwd_ref(x.double(), w.double(), None, 1e-5)
    assert torch.isfinite(rstd).all()
    assert_tolerance_rule(y, F.layer_norm(x, (52,), w, eps=1e-5), y64, "large mean")
    dx, dw, _ = K.layer_norm_bwd(dy, x, w, None, m, rstd)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.layer_norm(xt, (52,), wt, eps=1e-5).backward(dy)
    dx64, dw64, _ = ln_bwd_ref(dy.double(), x.double(), w.double(), m64, rstd64)
    assert_tolerance_rule(dx, xt.grad, dx64, "large mean dx")
    assert_tolerance_rule(dw, wt.grad, dw64, "large mean dw")


def test_layer_norm_dsum_and_fp32_master_weight():
    x, dy, ds = rand(6, 100, dtype=torch.bfloat16), rand(6, 100, dtype=torch.bfloat16, seed=1), rand(6, 100, dtype=torch.bfloat16, seed=2)
    w, b = rand(100, seed=3), rand(100, seed=4)
    y, mean, rstd = K.layer_norm_fwd(x, w, b, 1e-5)
    y_same, m_same, r_same = ln_fwd_ref(x, w, b, 1e-5)
    y64, _, _ = ln_fwd_ref(x.double(), w.double(), b.double(), 1e-5)
    assert_close_same_dtype(y, y_same, y64, "fp32 master weight")
    dx, dw, db = K.layer_norm_bwd(dy, x, w, b, mean, rstd, ds)
    dx_same, _, _ = ln_bwd_ref(dy, x, w, m_same, r_same, ds)
    dx64, dw64, db64 = ln_bwd_ref(dy.double(), x.double(), w.double(), m_same.double(), r_same.double(), ds.double())
    assert dw.dtype == db.dtype == torch.float32
    assert_close_same_dtype(dx, dx_same, dx64, "dx with dsum")
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), db64, rtol=1e-5, atol=1e-5)


# ---- fused residual add ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("layer", [False, True])
def test_fused_add_equals_add_then_norm(dtype, layer):
    """s = (x + r) in fp32 rounded once; y bitwise the plain kernel applied to s."""
    x, r, w = rand(9, 130, dtype=dtype), rand(9, 130, dtype=dtype, seed=1), rand(130, dtype=dtype, seed=2)
    s_want = (x.float() + r.float()).to(dtype)
    if layer:
        y, s, mean, rstd = K.add_layer_norm_fwd(x, r, w, w, 1e-5, dtype)
        y_plain, mean_p, rstd_p = K.layer_norm_fwd(s_want, w, w, 1e-5)
        assert torch.equal(mean, mean_p)
    else:
        y, s, rstd = K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.5, 100, dtype)
        y_plain, rstd_p = K.rms_norm_fwd(s_want, w, 1e-5, "llama", 0.5, 100)
    assert torch.equal(s, s_want) and torch.equal(y, y_plain) and torch.equal(rstd, rstd_p)


@pytest.mark.parametrize("layer", [False, True])
def test_fused_add_fp32_residual_stream(layer):
    """bf16 activations with an fp32 residual stream: s in fp32, the norm of s cast to bf16 at the end."""
    x, r, w = rand(5, 96, dtype=torch.bfloat16), rand(5, 96, dtype=torch.bfloat16, seed=1), rand(96, dtype=torch.bfloat16, seed=2)
    s_want = x.float() + r.float()
    if layer:
        y, s, _, _ = K.add_layer_norm_fwd(x, r, w, None, 1e-5, torch.float32)
        y_ref = ln_fwd_ref(s_want, w, None, 1e-5)[0].to(torch.bfloat16)
    else:
        y, s, _ = K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, 96, torch.float32)
        y_ref = rms_norm_fwd_ref(s_want, w, 1e-5, "llama", 0.0, 96)[0].to(torch.bfloat16)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(s, s_want)
    assert (y.float() - y_ref.float()).abs().max().item() <= ATOL[torch.bfloat16]


def test_add_rms_norm_op_through_cpu_backend():
    x, r = rand(4, 3, 40, dtype=torch.bfloat16).requires_grad_(), rand(4, 3, 40, dtype=torch.bfloat16, seed=1).requires_grad_()
    w = rand(40, dtype=torch.bfloat16, seed=2).requires_grad_()
    y, s = normlab.add_rms_norm(x, r, 40, w, backend="cpu")
    (y.float().square().sum() + s.float().sum()).backward()
    grads = [t.grad for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    y2, s2 = normlab.add_rms_norm(x, r, 40, w, backend="reference")
    (y2.float().square().sum() + s2.float().sum()).backward()
    assert torch.equal(s, s2)
    torch.testing.assert_close(y, y2, rtol=0, atol=ATOL[torch.bfloat16])
    for a, b in zip(grads, (x.grad, r.grad, w.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)


# ---- layout, invariance, determinism --------------------------------------------------------------
def test_non_contiguous_inputs():
    base = rand(6, 2 * 50, seed=3)
    x = base[:, ::2]  # strided rows
    xt = rand(50, 6, seed=4).t()  # transposed
    w = rand(50, seed=5)
    for inp in (x, xt):
        assert not inp.is_contiguous()
        torch.testing.assert_close(normlab.rms_norm(inp, 50, w, backend="cpu"), normlab.rms_norm(inp.contiguous(), 50, w, backend="cpu"), rtol=0, atol=0)
        y, _ = K.rms_norm_fwd(inp, w, EPS32, "llama", 0.0, 50)
        torch.testing.assert_close(y, K.rms_norm_fwd(inp.contiguous(), w, EPS32, "llama", 0.0, 50)[0], rtol=0, atol=0)
        y, _, _ = K.layer_norm_fwd(inp, w, w, 1e-5)
        torch.testing.assert_close(y, K.layer_norm_fwd(inp.contiguous(), w, w, 1e-5)[0], rtol=0, atol=0)
    # an expanded (stride-0) upstream gradient, as autograd hands out for .sum()
    xs = x.contiguous()
    _, rstd = K.rms_norm_fwd(xs, w, EPS32, "llama", 0.0, 50)
    dy = torch.ones(()).expand(6, 50)
    dx, dw = K.rms_norm_bwd(dy, xs, w, rstd, 0.0, 50)
    dx2, dw2 = K.rms_norm_bwd(dy.contiguous(), xs, w, rstd, 0.0, 50)
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2)


def _all_forward(x, r, w, b):
    n = x.shape[1]
    return [
        K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, n)[0],
        K.rms_norm_fwd(x, w, 1e-5, "none", 1.0, max(1, n // 2))[0],
        K.layer_norm_fwd(x, w, b, 1e-5)[0],
        *K.add_rms_norm_fwd(x, r, w, 1e-5, "gemma", 0.0, n, x.dtype)[:2],
        *K.add_layer_norm_fwd(x, r, w, b, 1e-5, x.dtype)[:2],
    ]


def _all_backward(x, r, w, b, dy):
    n = x.shape[1]
    _, rstd = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, n)
    _, rstd_p = K.rms_norm_fwd(x, w, 1e-5, "none", 1.0, max(1, n // 2))
    _, mean, lrstd = K.layer_norm_fwd(x, w, b, 1e-5)
    return [
        *K.rms_norm_bwd(dy, x, w, rstd, 0.0, n),
        *K.rms_norm_bwd(dy, x, w, rstd_p, 1.0, max(1, n // 2), r),
        *K.layer_norm_bwd(dy, x, w, b, mean, lrstd),
        *K.layer_norm_bwd(dy, x, w, b, mean, lrstd, r),
    ]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", [*ODD_N, 1024])
def test_streaming_stores_write_the_same_values(dtype, n, monkeypatch):
    """Large calls write through a staging buffer with non-temporal stores (aligned middle of each row,
    ordinary stores for the head and tail): bitwise the same outputs and gradients as ordinary stores,
    whatever the row alignment (odd n: most rows start off a 64-byte boundary)."""
    rows = 67  # two chunks, the second partial
    x, r, dy = rand(rows, n, dtype=dtype), rand(rows, n, dtype=dtype, seed=1), rand(rows, n, dtype=dtype, seed=4)
    w, b = rand(n, dtype=dtype, seed=2), rand(n, dtype=dtype, seed=3)
    results = {}
    for stream in (False, True):
        monkeypatch.setattr(K, "_streams", lambda *_, stream=stream: stream)
        results[stream] = _all_forward(x, r, w, b) + _all_backward(x, r, w, b, dy)
        results[stream].append(K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, n, torch.float32)[1])  # fp32 s
    for plain, streamed in zip(results[False], results[True]):
        assert torch.equal(plain, streamed)


def test_streaming_is_chosen_for_large_fp32_calls_only():
    big = torch.empty(K.STREAM_ABOVE // 4 + 1, dtype=torch.float32)
    assert K._streams(big, big) and not K._streams(big[:16], big[:16])
    assert not K._streams(big.to(torch.bfloat16), big)  # 16-bit outputs: compute-bound, never streamed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    """A row's outputs (forward, and dx of the backward) are bitwise the same in a batch of 1, 255 or 300."""
    x, r = rand(300, 257, dtype=dtype), rand(300, 257, dtype=dtype, seed=1)
    w, b = rand(257, dtype=dtype, seed=2), rand(257, dtype=dtype, seed=3)
    dy = rand(300, 257, dtype=dtype, seed=4)
    row = 131
    alone = _all_forward(x[row:row + 1], r[row:row + 1], w, b)
    _, rstd1 = K.rms_norm_fwd(x[row:row + 1], w, 1e-5, "llama", 0.0, 257)
    _, mean1, lrstd1 = K.layer_norm_fwd(x[row:row + 1], w, b, 1e-5)
    dx1 = K.rms_norm_bwd(dy[row:row + 1], x[row:row + 1], w, rstd1, 0.0, 257)[0]
    dl1 = K.layer_norm_bwd(dy[row:row + 1], x[row:row + 1], w, b, mean1, lrstd1)[0]
    for m in (255, 300):
        for a, big in zip(alone, _all_forward(x[:m], r[:m], w, b)):
            assert torch.equal(big[row:row + 1], a)
        _, rstd = K.rms_norm_fwd(x[:m], w, 1e-5, "llama", 0.0, 257)
        _, mean, lrstd = K.layer_norm_fwd(x[:m], w, b, 1e-5)
        assert torch.equal(K.rms_norm_bwd(dy[:m], x[:m], w, rstd, 0.0, 257)[0][row:row + 1], dx1)
        assert torch.equal(K.layer_norm_bwd(dy[:m], x[:m], w, b, mean, lrstd)[0][row:row + 1], dl1)


def _grads(dtype):
    x, dy = rand(1000, 130, dtype=dtype), rand(1000, 130, dtype=dtype, seed=1)
    w, b = rand(130, dtype=dtype, seed=2), rand(130, dtype=dtype, seed=3)
    y, rstd = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 91)
    dx, dw = K.rms_norm_bwd(dy, x, w, rstd, 0.0, 91)
    yl, mean, lrstd = K.layer_norm_fwd(x, w, b, 1e-5)
    dxl, dwl, dbl = K.layer_norm_bwd(dy, x, w, b, mean, lrstd, dy)
    return y, dx, dw, yl, dxl, dwl, dbl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_determinism_runs_and_threads(dtype, monkeypatch):
    """Bitwise equal across runs and across 1 vs 2 numba threads, forward and weight/bias gradients."""
    with threads(1, monkeypatch):
        one = _grads(dtype)
    with threads(2, monkeypatch):
        two, again = _grads(dtype), _grads(dtype)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("layer", [False, True])
def test_weight_grads_fold_chunk_partials_in_chunk_order(layer, monkeypatch):
    """dw / db are the fp32 sum, in chunk order, of every chunk's partial, however many threads computed
    the chunks (and however few partial slots they had): the partials of each chunk alone, folded here
    one after another, give the same bits."""
    rows, n = 23 * K.CHUNK + 5, 129
    x, dy = rand(rows, n), rand(rows, n, seed=1)
    w, b = rand(n, seed=2), rand(n, seed=3)

    def grads(xs, dys):
        if layer:
            _, mean, rstd = K.layer_norm_fwd(xs, w, b, 1e-5)
            return K.layer_norm_bwd(dys, xs, w, b, mean, rstd)[1:]
        _, rstd = K.rms_norm_fwd(xs, w, 1e-5, "llama", 0.0, n)
        return K.rms_norm_bwd(dys, xs, w, rstd, 0.0, n)[1:]

    folded = [torch.zeros(n) for _ in range(2 if layer else 1)]
    for lo in range(0, rows, K.CHUNK):
        for acc, part in zip(folded, grads(x[lo:lo + K.CHUNK], dy[lo:lo + K.CHUNK])):
            acc += part  # one chunk alone: its partial, added to zeros
    for count in (1, 2):
        with threads(count, monkeypatch):
            for got, want in zip(grads(x, dy), folded):
                assert torch.equal(got, want)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_fwd_bwd_peak_memory_not_above_torch(op, monkeypatch):
    """Peak of the bytes allocated through torch during forward + backward (the bench's measure):
    normlab's is no higher than torch's — the weight-gradient partials take one slot per thread, as
    torch's per-thread buffers, and no zero gradient is made for the statistics."""
    from normlab.bench.run import peak_bytes

    rows, n = 1024, 512  # above SERIAL_BELOW: both threads, 16 chunks
    x, dy = rand(rows, n).requires_grad_(), rand(rows, n, seed=1)
    w, b = rand(n, seed=2).requires_grad_(), rand(n, seed=3).requires_grad_()
    if op == "layer_norm":
        ours, theirs = (lambda: normlab.layer_norm(x, n, w, b)), (lambda: F.layer_norm(x, (n,), w, b))
    else:
        ours, theirs = (lambda: normlab.rms_norm(x, n, w)), (lambda: F.rms_norm(x, (n,), w))
    params = (x, w, b) if op == "layer_norm" else (x, w)
    with threads(numba.get_num_threads(), monkeypatch):  # torch's buffers: one per thread, as many as numba's
        peaks = [peak_bytes(lambda f=f: torch.autograd.grad(f(), params, dy), "cpu") for f in (ours, theirs)]
    assert peaks[0] <= peaks[1], peaks


def test_nan_row_does_not_leak_into_parameter_grads():
    x, w, b = rand(8, 40), rand(40, seed=1), rand(40, seed=2)
    x[3, 7] = float("nan")
    x[5] = float("inf")
    dy = rand(8, 40, seed=3)
    dy[3] = 0
    dy[5] = 0
    good = [0, 1, 2, 4, 6, 7]
    _, rstd = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 40)
    _, mean, lrstd = K.layer_norm_fwd(x, w, b, 1e-5)
    _, dw = K.rms_norm_bwd(dy, x, w, rstd, 0.0, 40)
    _, dwl, dbl = K.layer_norm_bwd(dy, x, w, b, mean, lrstd)
    _, dw_ok = K.rms_norm_bwd(dy[good], x[good], w, rstd[good], 0.0, 40)
    _, dwl_ok, dbl_ok = K.layer_norm_bwd(dy[good], x[good], w, b, mean[good], lrstd[good])
    for got, ok in [(dw, dw_ok), (dwl, dwl_ok), (dbl, dbl_ok)]:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ok, rtol=1e-6, atol=1e-6)


# ---- dispatch and out= ----------------------------------------------------------------------------
def test_default_dispatch_picks_cpu_and_falls_back_for_fp64():
    for dtype in LOW:
        x = rand(4, 8, dtype=dtype)
        assert dispatch.select("rms_norm", x, weight=None, casting="llama", offset=0.0, k=8) == "cpu"
        assert dispatch.select("layer_norm", x, weight=None, bias=None) == "cpu"
        assert dispatch.select("add_rms_norm", x, residual=x, weight=None, casting="llama", offset=0.0, k=8, residual_dtype=torch.float32) == "cpu"
        assert dispatch.select("add_layer_norm", x, residual=x, weight=None, bias=None, residual_dtype=dtype) == "cpu"
    x64 = rand(4, 8, dtype=torch.float64)
    assert dispatch.select("rms_norm", x64, weight=None, casting="llama", offset=0.0, k=8) == "reference"
    assert dispatch.select("rms_norm", x64, "cpu", weight=None, casting="llama", offset=0.0, k=8) == "reference"
    x = rand(4, 8)
    assert dispatch.select("add_rms_norm", x, residual=x, weight=None, casting="llama", offset=0.0, k=8, residual_dtype=torch.float64) == "reference"
    # the answer never depends on the number of rows
    assert {K.supports("rms_norm", rand(m, 8)) for m in (1, 64, 65, 4096)} == {True}
    # and the op through the default choice equals the explicit cpu backend
    x = rand(3, 16)
    assert torch.equal(normlab.rms_norm(x, 16), normlab.rms_norm(x, 16, backend="cpu"))


def test_out_buffers():
    x, r, w = rand(8, 32), rand(8, 32, seed=1), rand(32, seed=2)
    out = torch.empty_like(x)
    y, _ = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 32, out=out)
    assert y is out and torch.equal(out, K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 32)[0])
    y, _, _ = K.layer_norm_fwd(x, w, w, 1e-5, out=out)
    assert y is out and torch.equal(out, K.layer_norm_fwd(x, w, w, 1e-5)[0])
    res = torch.empty_like(x)
    y, s, _ = K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, 32, torch.float32, out=out, residual_out=res)
    assert y is out and s is res and torch.equal(res, x + r)
    y, s, _, _ = K.add_layer_norm_fwd(x, r, w, w, 1e-5, torch.float32, out=out, residual_out=res)
    assert y is out and s is res and torch.equal(out, K.layer_norm_fwd(x + r, w, w, 1e-5)[0])
    x.copy_(rand(8, 32, seed=7))
    y_new = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 32)[0]
    assert torch.equal(K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 32, out=x)[0], y_new)  # in place is safe
    with pytest.raises(ValueError, match="out must be a contiguous CPU tensor of shape \\[8, 32\\] and dtype torch.float32"):
        K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 32, out=torch.empty(8, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual_out must be"):
        K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, 32, torch.float32, residual_out=torch.empty(64, 16).t())
    # through the op API
    out = torch.empty(8, 32, dtype=torch.bfloat16)
    xb = x.bfloat16()
    assert normlab.rms_norm(xb, 32, w, out=out) is out and torch.equal(out, normlab.rms_norm(xb, 32, w))


@pytest.mark.skipif(not HARDWARE_BF16, reason="needs AVX512-BF16 (vdpbf16ps)")
def test_bf16_sum_of_squares_vdpbf16ps_equals_its_emulation():
    """The bf16 RMSNorm statistic: ``vdpbf16ps`` gives bitwise the sums of the emulated order wherever
    the magnitudes allow it (every nonzero |x| in [2⁻⁶³, 2⁶⁴)), and rows outside that range (subnormal
    squares, overflow, NaN, inf) are summed by the emulation; the sums stay accurate (fp64 check)."""
    rng = np.random.default_rng(5)
    rows, n = 400, 1024 + 128 * 3
    exps = rng.integers(-63, 63, size=(rows, n))
    exps[:100] = rng.integers(-8, 8, size=(100, n))  # typical activations
    v = np.ldexp(rng.uniform(1, 2, size=(rows, n)), exps) * rng.choice([-1.0, 1.0], size=(rows, n))
    v[::7, 3] = 0.0
    v[300] = np.ldexp(rng.uniform(1, 2, size=n), rng.integers(-75, -64, size=n))  # subnormal squares only
    v[301] = np.ldexp(rng.uniform(1, 2, size=n), rng.integers(-70, -60, size=n))  # some of them
    v[302] = (2 - 2.0**-7) * 2.0**-64  # the largest bf16 below 2⁻⁶³ (0x1FFF) ...
    v[302, 5] = 2.0**-63  # ... next to the smallest allowed value
    v[299] = 2.0**-63  # the limits themselves, 0x2000 and 0x5F7F: still the instruction's
    v[299, 1::97] = (2 - 2.0**-7) * 2.0**63
    outside = np.array([2.0**-130, 2.0**64, 3e38, np.inf, np.nan], np.float32)
    for r, value in enumerate(outside):  # one value out of range in an ordinary row
        v[303 + r, 17 + r] = value
    bits = torch.from_numpy(v.astype(np.float32)).bfloat16().view(torch.int16).numpy().view(np.uint16).copy()
    hardware, exact, used = _sums_of_squares(bits)
    inside = np.ones(rows, bool)
    inside[300:303 + len(outside)] = False
    assert not np.array_equal(hardware[300:303].view(np.uint32), exact[300:303].view(np.uint32))  # flushed
    assert np.array_equal(hardware[inside].view(np.uint32), exact[inside].view(np.uint32))
    assert np.array_equal(used.view(np.uint32), exact.view(np.uint32))  # the fallback rows included
    want = (torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).double() ** 2).sum(1).numpy()
    finite = np.isfinite(want) & (want < 3e38)
    np.testing.assert_allclose(exact[finite], want[finite], rtol=64 * EPS32)


@numba.njit
def _sums_fill(bits, hardware, exact, used):
    for i in range(bits.shape[0]):
        hardware[i] = _bf16_sumsq_hardware(bits, i, bits.shape[1])[0]
        exact[i] = _bf16_sumsq_exact(bits, i, bits.shape[1])[0]
        used[i] = row_sumsq_min(bits, i, bits.shape[1])[0]


def _sums_of_squares(bits):
    out = [np.empty(bits.shape[0], np.float32) for _ in range(3)]
    _sums_fill(bits, *out)
    return out


def test_bf16_round_trip_equals_encode_then_decode():
    from normlab.kernels.cpu._numerics import round_bf16

    src = _edge_floats()
    enc = np.empty(src.shape, np.uint16)
    encode(src, enc, BF16)
    want = np.empty(src.shape, np.float32)
    decode(enc, want, BF16)
    got = np.array([round_bf16(np.float32(v)) for v in src[:5000]], np.float32)
    nan = np.isnan(want[:5000])
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[:5000][~nan].view(np.uint32))


# ---- bf16 through the hardware rounding ---------------------------------------------------------------
def _bf16_special_outputs() -> list[torch.Tensor]:
    """Every bf16 → bf16 forward on rows that meet each case of the hardware rounding: ordinary rows
    (proven free of NaN and subnormals: no classification), a NaN, an inf, subnormal inputs and results
    anywhere in the row, a fused add whose sum is subnormal, an all-zero row, overflow to inf; weights
    with tiny entries (subnormal products) and a bias that is the whole output where the weight is 0."""
    outs = []
    for n in (48, 67, 4097):
        x = rand(16, n, dtype=torch.float32, seed=n)
        x[8, 5] = float("nan")
        x[9, n // 2] = float("inf")
        x[10, :3] = torch.tensor([1e-38, 2e-39, -3e-40])
        x[11] = 0.0
        x[12] *= 1e38
        x[13, -1] = 2e-39  # a subnormal in the last column (the scalar tail of the row proof)
        x[14, 1::37] = 3e-39  # subnormals spread over the row proof's vectors
        x, r = x.to(torch.bfloat16), rand(16, n, dtype=torch.bfloat16, seed=n + 1)
        x[15, -1], r[15, -1] = 1.5e-38, -1.4e-38  # two normal values whose sum is subnormal
        for tiny in (False, True):
            w, b = rand(n, dtype=torch.float32, seed=2) * 3, rand(n, dtype=torch.float32, seed=3)
            if tiny:
                w[1], w[3], b[3], w[n - 1] = 1e-38, 0.0, 1e-39, 3e38
            w, b = w.to(torch.bfloat16), b.to(torch.bfloat16)
            for casting in ("llama", "gemma", "none"):
                outs += K.rms_norm_fwd(x, w, 1e-6, casting, 0.0, n)
                outs += K.add_rms_norm_fwd(x, r, w, 1e-6, casting, 0.0, n, torch.bfloat16)
            outs += K.rms_norm_fwd(x, w, 0.0, "gemma", 1.0, n)  # eps 0: the zero row's rstd is inf
            outs += K.rms_norm_fwd(x, w, 1e-6, "llama", 0.0, max(1, n // 3))  # partial: no row proof
            outs += K.layer_norm_fwd(x, w, b, 1e-6)
            outs += K.add_layer_norm_fwd(x, r, w, b, 1e-6, torch.bfloat16)
    return outs


def test_hardware_bf16_rounding_writes_the_exact_values(tmp_path):
    """With AVX512-BF16, bf16 rows are rounded 16 values at a time by ``vcvtneps2bf16``, which flushes
    subnormals and writes its own NaN; blocks that meet either are formed again exactly. The outputs are
    bitwise those of the exact integer rounding alone (``NORMLAB_BF16_HARDWARE=0``, another process),
    NaN payloads and signed zeros included. (Without AVX512-BF16 both runs take the exact path.)"""
    import os
    import subprocess
    import sys

    from normlab.kernels.cpu import _numerics

    exact_file = tmp_path / "exact.pt"
    code = (
        "import torch, tests.kernels.test_cpu_kernels as t; "
        f"torch.save(t._bf16_special_outputs(), {str(exact_file)!r})"
    )
    env = {**os.environ, "NORMLAB_BF16_HARDWARE": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).parents[2])
    exact = torch.load(exact_file)
    fast = _bf16_special_outputs()
    assert len(fast) == len(exact)
    for i, (a, b) in enumerate(zip(fast, exact)):
        bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits)), f"output {i} differs ({_numerics.HARDWARE_BF16=})"


@pytest.mark.skipif(not HARDWARE_BF16, reason="the bf16 weights are read by the AVX512-BF16 blocks only")
def test_bf16_weights_write_the_same_values(monkeypatch):
    """Large, wide bf16 RMSNorm calls read the weights as bf16 bit patterns (the same values, half the
    bytes in cache): forced onto every call, each output and statistic is bitwise the one of the fp32
    weights, on rows with NaN, inf, subnormals, zeros and overflow, every casting mode, fused or not."""
    plain = _bf16_special_outputs()
    used = []
    kernel = K.norm_fwd
    monkeypatch.setattr(K, "norm_fwd", lambda *args: used.append(args[-1] is not None) or kernel(*args))
    monkeypatch.setattr(K, "HALF_WEIGHT_ROW", 0)
    monkeypatch.setattr(K, "HALF_WEIGHT_MOVED", 0)
    half = _bf16_special_outputs()
    # per row length and weight set: 3 castings × {rms_norm, add_rms_norm}, and the partial llama call;
    # not gemma with offset 1 (fp32 weights), nor LayerNorm
    assert used.count(True) == 3 * 2 * (3 * 2 + 1)
    for i, (a, b) in enumerate(zip(half, plain)):
        bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits)), f"output {i} differs"


@pytest.mark.skipif(not HARDWARE_BF16, reason="the bf16 weights are read by the AVX512-BF16 blocks only")
@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("offset", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_bf16_weights_hold_the_casting_modes_values(casting, offset, weight_dtype, monkeypatch):
    """Whatever the casting mode, offset and weight dtype, the weights the blocks read (bf16 ones where
    the mode's values are bf16) give bitwise the outputs of the fp32 weights, plain and fused, partial
    RMSNorm included."""
    n = 80  # five 16-value blocks, no tail
    x, r = rand(64, n, dtype=torch.bfloat16), rand(64, n, dtype=torch.bfloat16, seed=1)
    w = (rand(n, seed=2) * 3).to(weight_dtype)
    results = {}
    for forced in (False, True):
        monkeypatch.setattr(K, "HALF_WEIGHT_ROW", 0 if forced else 1 << 62)
        monkeypatch.setattr(K, "HALF_WEIGHT_MOVED", 0 if forced else 1 << 62)
        results[forced] = [
            *K.rms_norm_fwd(x, w, 1e-6, casting, offset, n),
            *K.rms_norm_fwd(x, w, 1e-6, casting, offset, n // 2),
            *K.add_rms_norm_fwd(x, r, w, 1e-6, casting, offset, n, torch.bfloat16),
        ]
    for plain, half in zip(results[False], results[True]):
        bits = torch.int16 if plain.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(plain.view(bits), half.view(bits))


@pytest.mark.skipif(not HARDWARE_BF16, reason="the bf16 weights are read by the AVX512-BF16 blocks only")
def test_the_blocks_read_the_bf16_weights_they_are_given():
    """The bf16 weights reach the 16-value blocks (and only them): given zeros there, the whole blocks
    come out zero while the scalar tail still uses the fp32 weights."""
    from normlab.kernels.cpu._kernels import MODE_FP32
    from normlab.kernels.cpu._numerics import LANES

    n = 4 * LANES + 5
    x = rand(8, n, dtype=torch.bfloat16)
    w = torch.ones(n)
    y, rstd = torch.empty_like(x), torch.empty(8)
    nothing = np.empty((0, 0), np.uint16)
    K.norm_fwd(K._np(x), nothing, nothing, False, K._np(y), w.numpy(), w.numpy(), 1e-6, n, False, MODE_FP32,
               np.empty(0, np.float32), rstd.numpy(), False, w_bf16=np.zeros(n, np.uint16))
    assert torch.equal(y[:, : 4 * LANES].float(), torch.zeros(8, 4 * LANES))
    expected = (x[:, 4 * LANES:].float() * rstd[:, None]).to(torch.bfloat16)
    assert torch.equal(y[:, 4 * LANES:].view(torch.int16), expected.view(torch.int16))


def test_bf16_weights_are_chosen_for_large_wide_bf16_calls_only():
    # the narrowest rows whose rows and fp32 weights fill L1 (4096 with a 32 KB L1 data cache)
    n = max(4096, -(-K.HALF_WEIGHT_ROW // 8))
    rows = K.HALF_WEIGHT_MOVED // (2 * 2 * n) + 1
    x, y = torch.empty(rows, n, dtype=torch.bfloat16), torch.empty(rows, n, dtype=torch.bfloat16)
    w16 = torch.zeros(n, dtype=torch.bfloat16)
    chosen = K._half_weight(w16, [y, x])
    if HARDWARE_BF16:
        assert chosen.dtype == np.uint16 and chosen.ctypes.data == w16.data_ptr()  # a view, no copy
    else:
        assert chosen is None
    assert K._half_weight(w16, [y[:16], x[:16]]) is None  # in cache: the widening costs more
    narrow = torch.empty(rows * 8, n // 8, dtype=torch.bfloat16)  # its rows and weights fit in L1 anyway
    assert K._half_weight(w16[: n // 8], [narrow, narrow]) is None
    assert K._half_weight(None, [y, x]) is None
    half = x.view(torch.float16)
    assert K._half_weight(w16, [half, half]) is None
    # which weights are exact in bf16: the mode's own bf16 values, never an fp32 offset + w
    wb, wf = rand(n, dtype=torch.bfloat16), rand(n, dtype=torch.float32)
    exact = {c: K._rms_weight(wb, 0.0, c, torch.bfloat16, n)[2] for c in ("llama", "none", "gemma")}
    assert all(v is not None and torch.equal(v.view(torch.int16), wb.view(torch.int16)) for v in exact.values())
    assert K._rms_weight(wb, 1.0, "llama", torch.bfloat16, n)[2] is not None  # w.to(bf16) + 1 in bf16
    assert K._rms_weight(wb, 1.0, "gemma", torch.bfloat16, n)[2] is None  # w.float() + 1 in fp32
    assert K._rms_weight(wf, 0.0, "gemma", torch.bfloat16, n)[2] is None
    assert K._rms_weight(wb, 0.0, "llama", torch.float16, n)[2] is None
    assert K._rms_weight(None, 0.0, "llama", torch.bfloat16, n)[2] is None
