"""The native ``cpu`` backend against the references (docs/architecture.md §7), at the kernel contract and
through the ops, on every ISA build this CPU runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab import dispatch
from normlab.kernels import cpu as K
from normlab.ops.rms_norm import partial_size, rms_norm_apply_ref, rms_norm_bwd_ref, rms_norm_fwd_ref
from tests.helpers import (
    ATOL,
    assert_close_same_dtype,
    assert_same_bits_on_every_isa,
    assert_tolerance_rule,
    rand,
    threads,
)

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


# ---- bf16 / fp16 conversions ----------------------------------------------------------------------
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


def _stored_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fused add's stored sum ``x + 0`` in ``dtype``: the kernels' own conversion of x's values."""
    x = x.reshape(1, -1)
    return K.add_rms_norm_fwd(x, torch.zeros_like(x), None, 1e-5, "llama", 0.0, x.shape[1], dtype)[1].reshape(-1)


@pytest.mark.parametrize("dtype", HALF)
def test_fp32_to_half_rounds_like_torch(dtype):
    """fp32 → half in the kernels: bitwise torch's cast (round to nearest even, overflow to inf, subnormals),
    NaN stays NaN."""
    src = torch.from_numpy(_edge_floats())
    got, want = _stored_sum(src, dtype), src.to(dtype)
    nan = torch.isnan(src)
    assert torch.isnan(got[nan]).all(), "a NaN was not kept a NaN"
    kept = ~nan & ~((src == 0) & torch.signbit(src))  # x + 0 turns -0 into +0
    mismatch = (got.view(torch.int16) != want.view(torch.int16)) & kept
    assert not mismatch.any(), f"{int(mismatch.sum())} mismatches, e.g. {src[mismatch][:5]}"
    spots = _stored_sum(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38]), torch.bfloat16)
    # tie → even (down), tie → even (up), overflow → inf
    assert spots.view(torch.int16).tolist() == [0x3F80, 0x3F82, 0x7F80]


@pytest.mark.parametrize("dtype", HALF)
def test_every_half_value_widens_exactly(dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    got, want = _stored_sum(x, torch.float32), x.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    # x + 0 turns -0 into +0; every other value is bitwise the widened one
    assert torch.equal(got[~nan], want[~nan])


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
@pytest.mark.parametrize(
    "partial,offset,affine,dsum", [(None, 0.0, True, False), (0.4, 1.0, True, True), (None, 0.0, False, True)]
)
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
        ds64 = None if ds is None else ds.double()
        dx64, dw64 = rms_norm_bwd_ref(dy.double(), x.double(), w64, rstd64, offset, k, 1e-5, ds64)
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
        y = normlab.rms_norm(xs, 33, ws, 1e-6, casting=casting, offset=offset, partial=partial, backend="cpu")
        y.sin().sum().backward()
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
    w64, b64 = (None if p is None else p.double() for p in (w, b))
    y64, mean64, rstd64 = ln_fwd_ref(x.double(), w64, b64, 1e-5)
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
    x, dy, ds = (rand(6, 100, dtype=torch.bfloat16, seed=seed) for seed in (0, 1, 2))
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
    x, r = rand(5, 96, dtype=torch.bfloat16), rand(5, 96, dtype=torch.bfloat16, seed=1)
    w = rand(96, dtype=torch.bfloat16, seed=2)
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
    x = rand(4, 3, 40, dtype=torch.bfloat16).requires_grad_()
    r = rand(4, 3, 40, dtype=torch.bfloat16, seed=1).requires_grad_()
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
        torch.testing.assert_close(
            normlab.rms_norm(inp, 50, w, backend="cpu"), normlab.rms_norm(inp.contiguous(), 50, w, backend="cpu"),
            rtol=0, atol=0,
        )
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
    """Bitwise equal across runs and across 1 vs 2 threads, forward and weight/bias gradients."""
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
    chunk = K.CHUNK
    x, dy = rand(rows, n), rand(rows, n, seed=1)
    w, b = rand(n, seed=2), rand(n, seed=3)

    def grads(xs, dys):
        if layer:
            _, mean, rstd = K.layer_norm_fwd(xs, w, b, 1e-5)
            return K.layer_norm_bwd(dys, xs, w, b, mean, rstd)[1:]
        _, rstd = K.rms_norm_fwd(xs, w, 1e-5, "llama", 0.0, n)
        return K.rms_norm_bwd(dys, xs, w, rstd, 0.0, n)[1:]

    folded = [torch.zeros(n) for _ in range(2 if layer else 1)]
    for lo in range(0, rows, chunk):
        for acc, part in zip(folded, grads(x[lo:lo + chunk], dy[lo:lo + chunk])):
            acc += part  # one chunk alone: its partial, added to zeros
    for count in (1, 2):
        with threads(count, monkeypatch):
            for got, want in zip(grads(x, dy), folded):
                assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 40, 129, 256])
def test_short_rows_in_blocks_give_the_row_by_row_bits(dtype, n):
    """Short rows with weight gradients run in blocks of rows (the partials held across the block); without weight
    gradients row by row: dx has the same bits either way (LayerNorm, RMSNorm, partial RMSNorm, the fused add's)."""
    x, dy, ds = rand(150, n, dtype=dtype), rand(150, n, dtype=dtype, seed=1), rand(150, n, dtype=dtype, seed=4)
    w = rand(n, dtype=dtype, seed=2)
    ops = torch.ops.normlab
    _, mean, rstd = K.layer_norm_fwd(x, w, None, 1e-5)
    for dsum in (None, ds):
        blocks = ops.layer_norm_backward(dy, x, w, mean, rstd, dsum, True, True)[0]
        assert torch.equal(blocks, ops.layer_norm_backward(dy, x, w, mean, rstd, dsum, False, False)[0])
    for k in {n, max(1, n // 3)}:
        _, rstd = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, k)
        blocks = ops.rms_norm_backward(dy, x, w, rstd, 0.0, k, None, True)[0]
        assert torch.equal(blocks, ops.rms_norm_backward(dy, x, w, rstd, 0.0, k, None, False)[0])


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_fwd_bwd_peak_memory_not_above_torch(op, monkeypatch):
    """Peak of the bytes allocated through torch during forward + backward (the bench's measure):
    normlab's is no higher than torch's — the weight-gradient partials take one slot per thread, as
    torch's per-thread buffers, and no zero gradient is made for the statistics."""
    from normlab.bench.run import peak_bytes

    rows, n = 1024, 512  # both threads, 16 chunks
    x, dy = rand(rows, n).requires_grad_(), rand(rows, n, seed=1)
    w, b = rand(n, seed=2).requires_grad_(), rand(n, seed=3).requires_grad_()
    if op == "layer_norm":
        ours, theirs = (lambda: normlab.layer_norm(x, n, w, b)), (lambda: F.layer_norm(x, (n,), w, b))
    else:
        ours, theirs = (lambda: normlab.rms_norm(x, n, w)), (lambda: F.rms_norm(x, (n,), w))
    params = (x, w, b) if op == "layer_norm" else (x, w)
    with threads(2, monkeypatch):
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
        add_rms = dict(residual=x, weight=None, casting="llama", offset=0.0, k=8, residual_dtype=torch.float32)
        assert dispatch.select("add_rms_norm", x, **add_rms) == "cpu"
        assert dispatch.select("add_layer_norm", x, residual=x, weight=None, bias=None, residual_dtype=dtype) == "cpu"
    x64 = rand(4, 8, dtype=torch.float64)
    assert dispatch.select("rms_norm", x64, weight=None, casting="llama", offset=0.0, k=8) == "reference"
    assert dispatch.select("rms_norm", x64, "cpu", weight=None, casting="llama", offset=0.0, k=8) == "reference"
    x = rand(4, 8)
    add_rms = dict(residual=x, weight=None, casting="llama", offset=0.0, k=8, residual_dtype=torch.float64)
    assert dispatch.select("add_rms_norm", x, **add_rms) == "reference"
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
    with pytest.raises(
        ValueError, match="out must be a contiguous CPU tensor of shape \\[8, 32\\] and dtype torch.float32"
    ):
        K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, 32, out=torch.empty(8, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual_out must be"):
        K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, 32, torch.float32, residual_out=torch.empty(64, 16).t())
    # through the op API
    out = torch.empty(8, 32, dtype=torch.bfloat16)
    xb = x.bfloat16()
    assert normlab.rms_norm(xb, 32, w, out=out) is out and torch.equal(out, normlab.rms_norm(xb, 32, w))




# ---- the native build -------------------------------------------------------------------------------
def test_native_backend_is_loaded():
    """CI must fail when the extension did not build: the cpu backend loads and serves CPU tensors."""
    assert dispatch.available()["cpu"] == "ok"
    assert K.isa() in K.isas() and "avx2" in K.isas()


def _isa_outputs() -> list[torch.Tensor]:
    """Every kernel, odd sizes and special values, forward and backward."""
    out = []
    for dtype in LOW:
        for n in (1, 17, 767, 4097):
            x, r = rand(33, n, dtype=dtype, mean=0.3), rand(33, n, dtype=dtype, seed=1)
            dy = rand(33, n, dtype=dtype, seed=4)
            x[3, 0], x[4, -1], x[5] = float("nan"), float("inf"), 0.0
            w, b = rand(n, dtype=dtype, seed=2), rand(n, dtype=dtype, seed=3)
            out += _all_forward(x, r, w, b) + _all_backward(x, r, w, b, dy)
            # fp32 denormals on their way to 16 bits (the AVX512-BF16 build's conversion reads them as zero
            # and must fall back): sums of tiny inputs, and a weight that scales x̂ below fp32's smallest normal
            tiny = x * 1e-39 if dtype == torch.float32 else (x.float() * 1e-39).to(dtype)
            out += list(K.add_rms_norm_fwd(tiny, tiny, w * 1e-38, 1e-5, "gemma", 0.0, n, dtype)[:2])
            out += [K.rms_norm_fwd(x, w * 1e-38, 1e-5, "llama", 0.0, n)[0]]
            for casting in ("llama", "gemma", "none"):
                out += list(K.rms_norm_fwd(x, w, 1e-5, casting, 0.5, max(1, n // 3)))
            out += list(K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, n, torch.float32))
            out += [normlab.dyt(x, torch.tensor(0.7), w, b)]
            out += [torch.ops.normlab.rms_norm(x, w, 1e-5, "llama", 0.0, n, b)[0]]  # RMSNorm + bias
            rstd = torch.ops.normlab.rms_norm(x, w, 1e-5, "llama", 0.0, n)[1]
            out += list(torch.ops.normlab.rms_norm_backward(dy, x, w, rstd, 0.0, n, None, True, True))
    return out


def test_every_isa_build_gives_the_same_bits():
    """The AVX2 and AVX-512 builds (each one this CPU runs) agree bitwise on every kernel, DyT's tanh
    included: the same IEEE operations per element and the same 16-lane sums. NaNs agree in place, not in
    payload: x86 keeps the first operand's payload, and the compiler orders commutative operands per build."""
    assert_same_bits_on_every_isa(_isa_outputs)


def test_isa_chosen_at_load_time_follows_the_environment():
    code = "import torch, normlab.kernels.cpu as K; print(K.isa())"
    for isa in K.isas():
        env = {**__import__("os").environ, "NORMLAB_CPU_ISA": isa}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        got = run.stdout.strip()
        assert got == isa
    with pytest.raises(RuntimeError, match="does not run the 'sse2' build"):
        K.set_isa("sse2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_ops_pass_opcheck(dtype):
    x, r = rand(6, 40, dtype=dtype), rand(6, 40, dtype=dtype, seed=1)
    w, b = rand(40, dtype=dtype, seed=2), rand(40, dtype=dtype, seed=3)
    ops = torch.ops.normlab
    torch.library.opcheck(ops.rms_norm, (x, w, 1e-6, "llama", 0.0, 40))
    torch.library.opcheck(ops.rms_norm, (x, None, 1e-6, "none", 0.0, 13))
    torch.library.opcheck(ops.add_rms_norm, (x, r, w, 1e-6, "gemma", 1.0, 40, torch.float32))
    torch.library.opcheck(ops.layer_norm, (x, w, b, 1e-5))
    torch.library.opcheck(ops.add_layer_norm, (x, r, w, None, 1e-5, dtype))
    torch.library.opcheck(ops.dyt, (x, torch.tensor(0.5), w, b))
    torch.library.opcheck(ops.dyt_forward, (x, torch.tensor(0.5), w, None))


def test_compiled_step_calls_the_native_ops():
    """torch.compile(fullgraph=True) puts the native forward and backward operators themselves in the forward
    and backward graphs: no normlab Python runs in the compiled step."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, _inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return make_boxed_func(gm.forward)

    def step(x, r, w, b, a):
        y, s = normlab.add_rms_norm(x, r, 32, w)
        return (normlab.layer_norm(y, 32, w, b) + normlab.rms_norm(s, 32, w) + normlab.dyt(x, a, w, b)).sum()

    torch._dynamo.reset()
    x, r = rand(4, 32).requires_grad_(), rand(4, 32, seed=1)
    w, b = rand(32, seed=2).requires_grad_(), rand(32, seed=3).requires_grad_()
    a = torch.tensor(0.5, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    out = compiled(x, r, w, b, a)
    grads = torch.autograd.grad(out, (x, w, b, a))
    forward, backward = graphs
    native_forward = {
        "normlab.add_rms_norm.default", "normlab.layer_norm.default", "normlab.rms_norm.default",
        "normlab.dyt_forward.default",  # a differentiated DyT's forward, which keeps tanh(αx) for the backward
    }
    native_backward = {
        "normlab.rms_norm_backward.default", "normlab.layer_norm_backward.default", "normlab.dyt_backward.default"
    }
    assert native_forward <= forward
    assert native_backward <= backward
    assert not any("py_" in target for target in forward | backward)
    eager = step(x, r, w, b, a)
    torch.testing.assert_close(out, eager)
    for c, e in zip(grads, torch.autograd.grad(eager, (x, w, b, a))):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_outputs_write_the_same_values(dtype):
    """Outputs larger than the last-level cache go out with non-temporal stores (32 MB here, or the machine's
    own): the rows hold the same bits as the same rows of a small call, forward (fused too) and dx, on every
    ISA build; rows of 4097 elements put most steps off the vector alignment, which take ordinary stores."""
    for n in (4096, 4097):
        rows = (64 << 20) // (n * dtype.itemsize) + 64  # 64 MB of output: above any last-level cache here
        x, dy, r = rand(rows, n, dtype=dtype), rand(rows, n, dtype=dtype, seed=1), rand(rows, n, dtype=dtype, seed=4)
        w, b = rand(n, dtype=dtype, seed=2), rand(n, dtype=dtype, seed=3)
        head, tail = slice(0, 64), slice(rows - 64, rows)
        for isa in K.isas():
            before = K.set_isa(isa)
            try:
                y, rstd = K.rms_norm_fwd(x, w, 1e-5, "llama", 0.0, n)
                yl, mean, lrstd = K.layer_norm_fwd(x, w, b, 1e-5)
                ys = K.add_rms_norm_fwd(x, r, w, 1e-5, "llama", 0.0, n, dtype)[0]
                dx = K.rms_norm_bwd(dy, x, w, rstd, 0.0, n)[0]
                dxl = K.layer_norm_bwd(dy, x, w, b, mean, lrstd)[0]
                for rows_ in (head, tail):
                    y_small, rstd_small = K.rms_norm_fwd(x[rows_], w, 1e-5, "llama", 0.0, n)
                    assert torch.equal(y[rows_], y_small)
                    assert torch.equal(ys[rows_], K.add_rms_norm_fwd(x[rows_], r[rows_], w, 1e-5, "llama", 0.0, n,
                                                                     dtype)[0])
                    assert torch.equal(dx[rows_], K.rms_norm_bwd(dy[rows_], x[rows_], w, rstd_small, 0.0, n)[0])
                    yl_small, mean_small, lrstd_small = K.layer_norm_fwd(x[rows_], w, b, 1e-5)
                    assert torch.equal(yl[rows_], yl_small)
                    assert torch.equal(dxl[rows_], K.layer_norm_bwd(dy[rows_], x[rows_], w, b, mean_small,
                                                                    lrstd_small)[0])
            finally:
                K.set_isa(before)


# ---- the autograd nodes ---------------------------------------------------------------------------------------
def _differentiable_calls(n=24):
    """Each native forward op with every input requiring grad: name → (inputs, call returning the differentiable
    outputs)."""
    ops = torch.ops.normlab
    x, r, z = rand(5, n).requires_grad_(), rand(5, n, seed=1).requires_grad_(), rand(5, n, seed=4).requires_grad_()
    w, b = rand(n, seed=2).requires_grad_(), rand(n, seed=3).requires_grad_()
    a = torch.tensor(0.7, requires_grad=True)
    return {
        "RmsNorm": ((x, w), lambda: ops.rms_norm(x, w, 1e-6, "llama", 0.0, n)[:1]),
        "AddRmsNorm": ((x, r, w), lambda: ops.add_rms_norm(x, r, w, 1e-6, "gemma", 1.0, n, torch.float32)[:2]),
        "LayerNorm": ((x, w, b), lambda: ops.layer_norm(x, w, b, 1e-5)[:1]),
        "AddLayerNorm": ((x, r, w, b), lambda: ops.add_layer_norm(x, r, w, b, 1e-5, torch.float32)[:2]),
        "Dyt": ((x, a, w, b), lambda: (ops.dyt(x, a, w, b),)),
        "GatedRmsNorm": ((x, z, w), lambda: ops.gated_rms_norm(x, z, w, 1e-6, 8, False, "llama", 0.0)[:1]),
    }


def _grads_of(inputs, outputs, **kwargs):
    ups = [rand(*o.shape, seed=9 + i) for i, o in enumerate(outputs)]
    return torch.autograd.grad(outputs, inputs, ups, **kwargs)


@pytest.mark.parametrize("name", list(_differentiable_calls()))
def test_node_saves_through_hooks_frees_its_graph_and_guards_versions(name):
    """Every op records one named node whose saved tensors go through torch's saved-tensor hooks (offloading,
    checkpointing), are freed after a backward that keeps no graph, and are checked against in-place changes."""
    inputs, call = _differentiable_calls()[name]
    outputs = call()
    assert outputs[0].grad_fn.name() == f"normlab::{name}Backward"
    assert [f is not None for f, _ in outputs[0].grad_fn.next_functions] == [True] * len(inputs)
    expected = _grads_of(inputs, outputs)

    packed, unpacked = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: unpacked.append(t) or t):
        outputs = call()
    assert packed and len(unpacked) <= len(packed)
    for got, want in zip(_grads_of(inputs, outputs), expected):
        assert torch.equal(got, want)
    assert len(unpacked) >= 2
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _grads_of(inputs, outputs)

    outputs = call()
    weight = next(t for t in inputs if t.dim() == 1)  # saved by every node
    with torch.no_grad():
        weight.add_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads_of(inputs, outputs)


@pytest.mark.parametrize("name", list(_differentiable_calls()))
def test_node_computes_what_is_asked(name):
    """A gradient asked for one input alone equals that input's part of the full gradient."""
    inputs, call = _differentiable_calls()[name]
    full = _grads_of(inputs, call())
    for i, x in enumerate(inputs):
        (alone,) = _grads_of((x,), call())
        assert torch.equal(alone, full[i])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", ODD_N)
def test_dyt_backward_from_the_kept_tanh_gives_the_recomputed_bits(dtype, n):
    """A differentiated DyT keeps its forward's fp32 tanh(αx) (dyt_forward) and the backward takes it: the same
    outputs and gradients, bit for bit, as the forward without it and the backward that computes tanh again."""
    ops = torch.ops.normlab
    x, dy = rand(5, n, dtype=dtype, mean=0.2), rand(5, n, dtype=dtype, seed=1)
    a = torch.tensor([0.7], dtype=dtype)
    w, b = rand(n, dtype=dtype, seed=2), rand(n, dtype=dtype, seed=3)
    y, t = ops.dyt_forward(x, a, w, b)
    assert torch.equal(y, ops.dyt(x, a, w, b)) and t.dtype == torch.float32 and t.shape == x.shape
    torch.testing.assert_close(t, torch.tanh(a.float() * x.float()), rtol=1e-6, atol=1e-7)
    for weight in (w, None):
        kept = ops.dyt_backward(dy, x, a, weight, weight is not None, True, t)
        again = ops.dyt_backward(dy, x, a, weight, weight is not None, True)
        for got, want in zip(kept, again):
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="tanh must be the forward's fp32 tanh"):
        ops.dyt_backward(dy, x, a, w, True, True, t.to(dtype) if dtype != torch.float32 else t[:1])


def test_dyt_keeps_tanh_only_for_a_call_it_differentiates():
    """Without a node to record, DyT computes y alone: no fp32 tanh is kept (no memory spent)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b = rand(4, 16), rand(16, seed=1), rand(16, seed=2)
    a = torch.tensor([0.5], requires_grad=True)
    for grad_wanted, expected in ((True, "normlab.dyt_forward.default"), (False, "normlab.dyt.default")):
        with torch.set_grad_enabled(grad_wanted), Calls() as calls:
            y = normlab.dyt(x, a, w, b)
        assert expected in calls.names and (y.grad_fn is not None) == grad_wanted
    assert "normlab.dyt_forward.default" not in calls.names


@pytest.mark.parametrize("name", ["AddRmsNorm", "AddLayerNorm"])
def test_fused_add_node_holds_no_reference_cycle(name):
    """The stored sum is an output of the node that saves it: saved as an output, so dropping the outputs
    frees the sum and the node (a cycle through C++ reference counts would keep them forever)."""
    import weakref

    _, call = _differentiable_calls()[name]
    y, s = call()
    node, ref = weakref.ref(s), weakref.ref(y)
    del y, s
    assert node() is None and ref() is None


def test_forward_mode_ad_is_refused_with_a_clear_error():
    import torch.autograd.forward_ad as fwAD

    x, t = rand(4, 8), rand(4, 8, seed=1)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="no forward-mode AD formula"):
        normlab.layer_norm(fwAD.make_dual(x, t), 8)
