"""layer_norm / add_layer_norm against torch, the textbook formula and the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
from normlab.ops.layer_norm import add_layer_norm_reference, layer_norm_reference
from tests.helpers import (
    ATOL,
    DTYPES,
    assert_close_same_dtype,
    assert_compiled_matches_eager,
    assert_tolerance_rule,
    max_err,
    rand,
)

SHAPES = [(4, 16), (3, 5, 33), (7, 1), (2, 767), (1, 4097)]
AFFINE = ["none", "weight", "bias", "both"]


def params(affine, shape, dtype=torch.float64, seed=1):
    w = rand(*shape, dtype=dtype, seed=seed) if affine in ("weight", "both") else None
    b = rand(*shape, dtype=dtype, seed=seed + 1) if affine in ("bias", "both") else None
    return w, b


def d64(t):
    return None if t is None else t.double()


def layer_norm_textbook(x, w, b, eps):
    """The formula as written in Ba et al. 2016 / torch.nn.LayerNorm's docs, in fp32 (fp64 for fp64)."""
    h = x.double() if x.dtype == torch.float64 else x.float()
    mu = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    y = (h - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.to(h.dtype)
    if b is not None:
        y = y + b.to(h.dtype)
    return y.to(x.dtype)


def one_pass_layer_norm(x, w, b, eps):
    """The formula the spec forbids: var = E[x²] − E[x]² (catastrophic cancellation at large means)."""
    m = x.mean(-1, keepdim=True)
    var = (x * x).mean(-1, keepdim=True) - m * m
    return (x - m) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
def test_matches_torch_layer_norm(dtype, shape, affine):
    n = shape[-1]
    x = rand(*shape, dtype=dtype)
    w, b = params(affine, (n,), dtype)
    fast = normlab.layer_norm(x, (n,), w, b)
    assert fast.dtype == dtype and fast.shape == x.shape
    ref64 = layer_norm_reference(x.double(), (n,), d64(w), d64(b))
    assert_tolerance_rule(fast, F.layer_norm(x, (n,), w, b), ref64, f"layer_norm {dtype} {shape} {affine}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dim_normalized_shape(dtype):
    x = rand(4, 3, 5, 7, dtype=dtype)
    w, b = params("both", (5, 7), dtype)
    ref64 = layer_norm_reference(x.double(), (5, 7), d64(w), d64(b), 1e-4)
    assert_tolerance_rule(normlab.layer_norm(x, (5, 7), w, b, 1e-4), F.layer_norm(x, (5, 7), w, b, 1e-4), ref64, "2-D")
    ref64 = layer_norm_reference(x.double(), (3, 5, 7))
    assert_tolerance_rule(normlab.layer_norm(x, [3, 5, 7]), F.layer_norm(x, (3, 5, 7)), ref64, "3-D no affine")


@pytest.mark.parametrize("dtype", DTYPES)
def test_textbook(dtype):
    x = rand(6, 64, dtype=dtype, mean=3.0, scale=2.0)
    w, b = params("both", (64,), dtype)
    eps = 1e-6
    ref64 = layer_norm_reference(x.double(), 64, d64(w), d64(b), eps)
    assert_tolerance_rule(normlab.layer_norm(x, 64, w, b, eps), layer_norm_textbook(x, w, b, eps), ref64, "textbook")
    if dtype == torch.float64:
        torch.testing.assert_close(
            normlab.layer_norm(x, 64, w, b, eps), layer_norm_textbook(x, w, b, eps), rtol=0, atol=1e-13
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "both"])
def test_backward_matches_torch(dtype, affine):
    x = rand(6, 40, dtype=dtype, mean=1.0)
    w, b = params(affine, (40,), dtype)
    dy = rand(6, 40, dtype=dtype, seed=7)

    def grads(fn, *args):
        leaves = [a.detach().clone().requires_grad_() for a in args if a is not None]
        it = iter(leaves)
        full = [next(it) if a is not None else None for a in args]
        fn(full[0], (40,), full[1], full[2]).backward(dy.to(full[0].dtype))
        return [t.grad for t in leaves]

    mine = grads(normlab.layer_norm, x, w, b)
    theirs = grads(F.layer_norm, x, w, b)
    ref = grads(layer_norm_reference, x.double(), d64(w), d64(b))
    for name, f, t, r in zip(["dx", "dw", "db"] if w is not None else ["dx"], mine, theirs, ref):
        assert_tolerance_rule(f, t, r, f"{name} {dtype}")


def test_fp32_master_weight_with_half_input():
    x = rand(4, 16, dtype=torch.bfloat16)
    w, b = params("both", (16,), torch.float32)
    y = normlab.layer_norm(x, 16, w, b)
    assert y.dtype == torch.bfloat16
    ref64 = layer_norm_reference(x.double(), 16, d64(w), d64(b))
    assert_tolerance_rule(y, F.layer_norm(x, (16,), w, b), ref64, "bf16 x, fp32 w")


@pytest.mark.parametrize("mean", [1e4, 1e5])
def test_large_mean_two_pass(mean):
    """At input mean 1e4 / 1e5 (spread 1) in fp32: within 2× torch's error; E[x²] − E[x]² is not."""
    n = 1024
    x = rand(16, n, mean=mean)
    w, b = rand(n, seed=1), rand(n, seed=2)
    ref64 = layer_norm_reference(x.double(), n, w.double(), b.double())
    t = F.layer_norm(x, (n,), w, b)
    assert_tolerance_rule(normlab.layer_norm(x, n, w, b), t, ref64, f"mean {mean}")
    e_one, bound = max_err(one_pass_layer_norm(x, w, b, 1e-5), ref64), 2 * max_err(t, ref64) + ATOL[torch.float32]
    assert not e_one <= bound, f"the one-pass formula should fail the rule here (err {e_one} vs bound {bound})"
    # the backward stays as accurate as torch's too
    xg, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    dy = rand(16, n, seed=3)
    normlab.layer_norm(xg, n, w, b).backward(dy)
    F.layer_norm(xt, (n,), w, b).backward(dy)
    layer_norm_reference(x64, n, w.double(), b.double()).backward(dy.double())
    assert_tolerance_rule(xg.grad, xt.grad, x64.grad, f"dx at mean {mean}")


@pytest.mark.parametrize("mean, spread", [(10.0, 1e-3), (1e4, 1.0), (1e5, 1.0)])
def test_large_mean_small_spread_to_output_rounding(mean, spread):
    """The corrected two-pass keeps fp32 output within a few ulps of the fp64 result of the same input,
    also where the rounding of the fp32 mean (ulp(mean)/2) is comparable to the spread."""
    x, w, b = rand(8, 257, mean=mean, scale=spread), rand(257, seed=1), rand(257, seed=2)
    ref64 = layer_norm_reference(x.double(), 257, w.double(), b.double())
    err = max_err(normlab.layer_norm(x, 257, w, b, backend="reference"), ref64)
    assert err <= 4 * torch.finfo(torch.float32).eps * ref64.abs().max().item(), err


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", [(10,), (3, 10)])
def test_gradcheck(affine, shape):
    x = rand(4, 3, 10, dtype=torch.float64, mean=0.5).requires_grad_()
    w, b = params(affine, shape)
    leaves = [t.requires_grad_() for t in (w, b) if t is not None]

    def f(a, *p):
        it = iter(p)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return normlab.layer_norm(a, shape, ww, bb, 1e-5)

    assert torch.autograd.gradcheck(f, (x, *leaves))
    assert torch.autograd.gradgradcheck(f, (x, *leaves))


@pytest.mark.parametrize("residual_dtype", [None, torch.float64])
@pytest.mark.parametrize("affine", ["none", "both"])
def test_add_layer_norm_gradcheck(residual_dtype, affine):
    x, r = rand(5, 12, dtype=torch.float64).requires_grad_(), rand(5, 12, dtype=torch.float64, seed=4).requires_grad_()
    w, b = params(affine, (12,))
    leaves = [t.requires_grad_() for t in (w, b) if t is not None]
    f = lambda a, c, *p: normlab.add_layer_norm(a, c, 12, *p, eps=1e-5, residual_dtype=residual_dtype)
    assert torch.autograd.gradcheck(f, (x, r, *leaves))
    assert torch.autograd.gradgradcheck(f, (x, r, *leaves))


def test_add_layer_norm_gradcheck_mixed_residual_dtype():
    """fp32 input, fp64 residual stream: gradients flow back in each input's own dtype."""
    x = rand(3, 8, dtype=torch.float32).requires_grad_()
    r = rand(3, 8, dtype=torch.float32, seed=1).requires_grad_()
    y, s = normlab.add_layer_norm(x, r, 8, residual_dtype=torch.float64)
    assert y.dtype == torch.float32 and s.dtype == torch.float64
    (y.sum() + s.square().sum()).backward()
    assert x.grad.dtype == r.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    s64 = x64 + r.detach().double()
    (layer_norm_reference(s64, 8).sum() + s64.square().sum()).backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_add_layer_norm_values(dtype, residual_dtype):
    x, r = rand(6, 40, dtype=dtype), rand(6, 40, dtype=dtype, seed=5)
    w, b = params("both", (40,), dtype, seed=6)
    y, s = normlab.add_layer_norm(x, r, 40, w, b, residual_dtype=residual_dtype)
    y_ref, s_ref = add_layer_norm_reference(x, r, 40, w, b, residual_dtype=residual_dtype)
    assert s.dtype == (residual_dtype or dtype) and y.dtype == dtype
    assert torch.equal(s, s_ref)
    y64, _ = add_layer_norm_reference(x.double(), r.double(), 40, d64(w), d64(b))
    assert_close_same_dtype(y, y_ref, y64, "add_layer_norm")
    # the fused op is the add followed by layer_norm of the stored sum, on the same backend (fp64 input
    # runs on the reference: the fast kernels decline fp64, so an fp32 sum alone would take another path)
    same_backend = "reference" if dtype == torch.float64 else None
    assert torch.equal(y, normlab.layer_norm(s_ref, 40, w.to(s.dtype), b.to(s.dtype), backend=same_backend).to(dtype))


def test_add_layer_norm_grads_match_unfused():
    x, r = rand(4, 24).requires_grad_(), rand(4, 24, seed=1).requires_grad_()
    w, b = rand(24, seed=2).requires_grad_(), rand(24, seed=3).requires_grad_()
    y, s = normlab.add_layer_norm(x, r, 24, w, b)
    (y.square().sum() + 0.5 * s.sum()).backward()
    g1 = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    s2 = x + r
    (F.layer_norm(s2, (24,), w, b).square().sum() + 0.5 * s2.sum()).backward()
    for a, c in zip(g1, (x.grad, r.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("use", ["y", "s"])
def test_add_layer_norm_grads_with_one_output_unused(backend, use):
    """Only y or only s in the loss: the unused output's gradient is None (not a zero tensor) and the
    gradients equal the unfused graph's."""
    x, r = rand(4, 24).requires_grad_(), rand(4, 24, seed=1).requires_grad_()
    w, b = rand(24, seed=2).requires_grad_(), rand(24, seed=3).requires_grad_()
    y, s = normlab.add_layer_norm(x, r, 24, w, b, backend=backend)
    (y.square().sum() if use == "y" else s.sum()).backward()
    got = [t.grad for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    s2 = x + r
    (normlab.layer_norm(s2, 24, w, b, backend=backend).square().sum() if use == "y" else s2.sum()).backward()
    for a, e in zip(got, (x.grad, r.grad, w.grad, b.grad)):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    big = rand(300, 257, dtype=dtype, mean=2.0)
    w, b = rand(257, dtype=dtype, seed=1), rand(257, dtype=dtype, seed=2)
    alone = normlab.layer_norm(big[7:8], 257, w, b)
    for m in (255, 300):
        assert torch.equal(normlab.layer_norm(big[:m], 257, w, b)[7:8], alone)
    y1, s1 = normlab.add_layer_norm(big[7:8], big[8:9], 257, w, b)
    y2, s2 = normlab.add_layer_norm(big[:255], big[1:256], 257, w, b)
    assert torch.equal(y2[7:8], y1) and torch.equal(s2[7:8], s1)


def test_determinism_forward_backward():
    def run():
        x = rand(513, 130, mean=1.0).requires_grad_()
        w, b = rand(130, seed=1).requires_grad_(), rand(130, seed=2).requires_grad_()
        y = normlab.layer_norm(x, 130, w, b)
        y.backward(rand(513, 130, seed=9))
        return y.detach(), x.grad, w.grad, b.grad

    a, c = run(), run()
    for u, v in zip(a, c):
        assert torch.equal(u, v)


def test_nan_row_does_not_leak():
    x = rand(6, 32)
    w, b = rand(32, seed=1).requires_grad_(), rand(32, seed=2).requires_grad_()
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    x.requires_grad_()
    y = normlab.layer_norm(x, 32, w, b)
    assert torch.isnan(y[2]).all() and torch.isnan(y[4]).all()
    good = [0, 1, 3, 5]
    x_ok = x.detach()[good].clone().requires_grad_()
    w_ok, b_ok = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y_ok = normlab.layer_norm(x_ok, 32, w_ok, b_ok)
    assert torch.equal(y[good], y_ok)
    y[good].square().sum().backward()
    y_ok.square().sum().backward()
    assert torch.equal(x.grad[good], x_ok.grad)
    # parameter gradients sum over rows, whose rounding depends on row positions: compare with the same
    # rows where the NaN/inf rows are replaced by clean ones (unused by the loss either way)
    w_clean, b_clean = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    normlab.layer_norm(rand(6, 32), 32, w_clean, b_clean)[good].square().sum().backward()
    assert torch.isfinite(w.grad).all() and torch.equal(w.grad, w_clean.grad), (
        "a NaN/inf row leaked into the weight gradient"
    )
    assert torch.equal(b.grad, b_clean.grad)


def test_zero_size():
    for shape in [(0, 8), (3, 0, 8)]:
        x = torch.randn(*shape, requires_grad=True)
        w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
        y = normlab.layer_norm(x, 8, w, b)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))
        y, s = normlab.add_layer_norm(x, x, 8)
        assert y.shape == s.shape == x.shape


def test_bad_input_messages():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"trailing shape \[4\]"):
        normlab.layer_norm(x, 4)
    with pytest.raises(ValueError, match=r"trailing shape \[3, 8\]"):
        normlab.layer_norm(x, (3, 8))
    with pytest.raises(ValueError, match=r"weight of shape \[8\]"):
        normlab.layer_norm(x, 8, torch.ones(4))
    with pytest.raises(ValueError, match=r"bias of shape \[8\]"):
        normlab.layer_norm(x, 8, torch.ones(8), torch.ones(1, 8))
    with pytest.raises(TypeError, match="bias of dtype torch.float32"):
        normlab.layer_norm(x, 8, None, torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.layer_norm(torch.ones(2, 8, dtype=torch.int64), 8)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        normlab.layer_norm([1.0, 2.0], 2)
    for eps in (0.0, -1e-5, float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            normlab.layer_norm(x, 8, eps=eps)
    with pytest.raises(ValueError, match=r"residual of shape \[2, 8\]"):
        normlab.add_layer_norm(x, torch.randn(1, 8), 8)  # no silent broadcasting
    with pytest.raises(TypeError, match="residual_dtype must be a floating dtype"):
        normlab.add_layer_norm(x, x, 8, residual_dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        normlab.layer_norm(x, 8, backend="gpu")


def test_out_argument():
    x, w, b = rand(8, 32), rand(32, seed=1), rand(32, seed=2)
    out = torch.empty_like(x)
    res = normlab.layer_norm(x, 32, w, b, out=out)
    assert res is out and torch.equal(out, normlab.layer_norm(x, 32, w, b))
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        normlab.layer_norm(x, 32, w, b.requires_grad_(), out=out)
    with pytest.raises(ValueError, match="out must be"):
        normlab.layer_norm(x, 32, w, out=torch.empty(8, 31))


def test_kernel_contract(monkeypatch):
    """The op side of the kernel contract (``normlab/kernels/contract.py``): a backend
    gets 2-D contiguous tensors and the documented arguments — checked with a stand-in backend built from
    the reference."""
    from normlab import dispatch
    from normlab.ops.layer_norm import layer_norm_bwd_ref, layer_norm_fwd_ref

    calls = []

    def rows2d(*ts):
        assert all(t is None or (t.dim() == 2 and t.is_contiguous()) for t in ts), [
            t.shape for t in ts if t is not None
        ]

    def fwd(x, weight, bias, eps, out=None):
        rows2d(x, out)
        calls.append("fwd")
        y, mean, rstd = layer_norm_fwd_ref(x, weight, bias, eps)
        return (y if out is None else out.copy_(y)), mean, rstd

    def bwd(dy, x, weight, bias, mean, rstd, dsum=None):
        rows2d(dy, x, dsum)
        assert mean.shape == rstd.shape == (x.shape[0],) and mean.dtype == rstd.dtype == torch.float32
        calls.append("bwd" if dsum is None else "bwd+dsum")
        return layer_norm_bwd_ref(dy, x, weight, bias, mean, rstd, 1.0, dsum)

    def add_fwd(x, residual, weight, bias, eps, residual_dtype):
        rows2d(x, residual)
        calls.append("add_fwd")
        s = (x.float() + residual.float()).to(residual_dtype)
        y, mean, rstd = layer_norm_fwd_ref(s, weight, bias, eps)
        return y.to(x.dtype), s, mean, rstd

    stand_in = dispatch._Backend("cpu", {"layer_norm_fwd": fwd, "layer_norm_bwd": bwd, "add_layer_norm_fwd": add_fwd})
    monkeypatch.setitem(dispatch._registry, "cpu", stand_in)
    monkeypatch.setattr(dispatch, "_decisions", {})  # decisions cached for the real backend
    x = rand(4, 6, 10).transpose(0, 1).requires_grad_()  # non-contiguous input
    r = rand(6, 4, 10, seed=1)
    w, b = rand(10, seed=2).requires_grad_(), rand(10, seed=3).requires_grad_()
    y = normlab.layer_norm(x, 10, w, b, backend="cpu")
    y.sum().backward()  # the incoming gradient is an expanded (stride-0) tensor
    yr, sr = normlab.add_layer_norm(x, r, 10, w, b, backend="cpu")
    (yr.sum() + sr.sum()).backward()
    normlab.layer_norm(x.detach(), 10, w.detach(), b.detach(), backend="cpu", out=torch.empty(6, 4, 10))
    assert calls == ["fwd", "bwd", "add_fwd", "bwd+dsum", "fwd"]
    assert torch.equal(y, normlab.layer_norm(x, 10, w, b, backend="reference"))
    assert torch.equal(yr, normlab.add_layer_norm(x, r, 10, w, b, backend="reference")[0])


def test_functional_namespace():
    import normlab.functional as NF

    assert NF.layer_norm is normlab.layer_norm and NF.add_layer_norm is normlab.add_layer_norm
    assert torch.ops.normlab.py_layer_norm.default is not None
    assert torch.ops.normlab.py_add_layer_norm.default is not None


def test_opcheck_fake_and_autograd_registration():
    """torch.library's own check: fake impls match the real outputs, autograd is registered properly."""
    _layer_norm_op, _add_layer_norm_op = torch.ops.normlab.py_layer_norm, torch.ops.normlab.py_add_layer_norm

    x, r = rand(3, 16).requires_grad_(), rand(3, 16, seed=1).requires_grad_()
    w, b = rand(16, seed=2).requires_grad_(), rand(16, seed=3).requires_grad_()
    torch.library.opcheck(_layer_norm_op, (x, w, b, 1e-5, "reference"))
    torch.library.opcheck(_layer_norm_op, (x, None, None, 1e-5, "reference"))
    torch.library.opcheck(_add_layer_norm_op, (x, r, w, b, 1e-5, torch.float64, "reference"))


def test_torch_compile_fullgraph():
    x, r = rand(4, 8, 32).requires_grad_(), rand(4, 8, 32, seed=1)
    w, b = rand(32, seed=2).requires_grad_(), rand(32, seed=3).requires_grad_()

    def f(x, r, w, b):
        y, s = normlab.add_layer_norm(x, r, 32, w, b)
        return normlab.layer_norm(y + s, (8, 32)).square().mean() + normlab.layer_norm(s, 32, w, b).mean()

    assert_compiled_matches_eager(f, (x, r, w, b), (x, w, b))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.one_of(st.integers(1, 300), st.sampled_from([767, 1023, 4097, 8193, 30_011, 100_000])),
    seed=st.integers(0, 2**16),
    special=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    mean=st.sampled_from([0.0, 10.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    strided=st.booleans(),
    affine=st.sampled_from(AFFINE),
)
def test_property_shapes_values_strides(rows, n, seed, special, scale, mean, dtype, strided, affine):
    """Row sizes 1 … 10⁵, large means with tiny spreads, strided rows; with ``special`` set, the last row
    holds a NaN or ±inf: that row is NaN where torch's is, and the other rows are untouched."""
    base = rand(rows, 2 * n if strided else n, dtype=torch.float64, scale=scale, mean=mean, seed=seed)
    x = (base[:, ::2] if strided else base).to(dtype)
    if special is not None:
        x[-1, seed % n] = special
    w, b = params(affine, (n,), dtype)
    fast = normlab.layer_norm(x, n, w, b)
    want = F.layer_norm(x, (n,), w, b)
    ref64 = layer_norm_reference(x.double(), n, d64(w), d64(b))
    good = slice(0, rows - 1) if special is not None else slice(None)
    assert_tolerance_rule(fast[good], want[good], ref64[good], "property")
    if special is not None:
        assert torch.equal(fast[-1].isnan(), want[-1].isnan()), "the special row's NaNs differ from torch's"


def test_large_row():
    x = rand(2, 100_000, mean=5.0)
    torch.testing.assert_close(normlab.layer_norm(x, 100_000), F.layer_norm(x, (100_000,)))


def test_zero_size_normalized_dim():
    """An empty normalized dim (as torch: F.layer_norm(randn(2, 0), (0,)) is an empty (2, 0) result)."""
    for shape in [(2, 0), (3, 2, 0)]:
        x, w = torch.randn(*shape, requires_grad=True), torch.ones(0, requires_grad=True)
        y = normlab.layer_norm(x, 0, w, w)
        assert y.shape == x.shape == F.layer_norm(x, (0,)).shape
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == (0,)
        assert normlab.add_layer_norm(x, x, 0)[1].shape == x.shape
        assert normlab.layer_norm(x.detach(), 0, out=torch.empty(shape)).shape == x.shape
