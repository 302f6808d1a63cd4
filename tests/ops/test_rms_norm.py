"""rms_norm / add_rms_norm against torch, the textbook formulas and the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
import normlab.nn
from normlab.ops.rms_norm import add_rms_norm_reference, partial_size, rms_norm_reference
from tests.helpers import DTYPES, assert_close_same_dtype, assert_compiled_matches_eager, assert_tolerance_rule, rand

SHAPES = [(4, 16), (3, 5, 33), (7, 1), (2, 767), (1, 4097)]


def llama_rmsnorm_textbook(x, w, eps):
    """The seed's formula (Hugging Face LlamaRMSNorm.forward), written out here as the spec of 'llama'."""
    h = x.to(torch.float32) if x.dtype != torch.float64 else x
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(x.dtype)


def gemma_rmsnorm_textbook(x, w, eps):
    """Gemma: everything in fp32, (1 + w), cast at the end."""
    h = x.float() if x.dtype != torch.float64 else x
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.to(out.dtype))).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_rms_norm(dtype, shape, affine):
    n = shape[-1]
    x = rand(*shape, dtype=dtype)
    w = rand(n, dtype=dtype, seed=1) if affine else None
    # torch's F.rms_norm computes in fp32 and multiplies the weight before the cast: casting="gemma"
    fast = normlab.rms_norm(x, (n,), w, casting="gemma")
    ref64 = rms_norm_reference(x.double(), (n,), None if w is None else w.double(), eps=torch.finfo(torch.float32).eps)
    assert_tolerance_rule(fast, F.rms_norm(x, (n,), w), ref64, f"rms_norm {dtype} {shape}")
    if dtype in (torch.float32, torch.float64):  # fp32 math: casting modes coincide
        assert_tolerance_rule(normlab.rms_norm(x, (n,), w), F.rms_norm(x, (n,), w), ref64, "llama")


@pytest.mark.parametrize("dtype", DTYPES)
def test_textbook_llama_and_gemma(dtype):
    x, w = rand(6, 64, dtype=dtype), rand(64, dtype=dtype, seed=2)
    eps = 1e-6
    ref64 = rms_norm_reference(x.double(), 64, w.double(), eps)
    y_llama = normlab.rms_norm(x, 64, w, eps, casting="llama")
    assert_tolerance_rule(y_llama, llama_rmsnorm_textbook(x, w, eps), ref64, "llama")
    ref64g = rms_norm_reference(x.double(), 64, w.double(), eps, offset=1.0)
    assert_tolerance_rule(
        normlab.rms_norm(x, 64, w, eps, casting="gemma", offset=1.0), gemma_rmsnorm_textbook(x, w, eps), ref64g, "gemma"
    )
    if dtype != torch.float64:  # the llama rule rounds before the weight multiply: bitwise the textbook
        y_reference = normlab.rms_norm(x, 64, w, eps, casting="llama", backend="reference")
        assert torch.equal(y_reference, llama_rmsnorm_textbook(x, w, eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("partial", [None, 0.25, 0.5])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_options_vs_reference(dtype, casting, partial, offset):
    x, w = rand(5, 48, dtype=dtype), rand(48, dtype=dtype, seed=3)
    fast = normlab.rms_norm(x, 48, w, casting=casting, partial=partial, offset=offset)
    same = rms_norm_reference(x, 48, w, casting=casting, partial=partial, offset=offset)
    ref64 = rms_norm_reference(
        x.double(), 48, w.double(), eps=torch.finfo(torch.float32).eps, partial=partial, offset=offset
    )
    assert_close_same_dtype(fast, same, ref64, f"{casting} p={partial} o={offset}")


@pytest.mark.parametrize("n, p, k", [(10, 0.3, 3), (100, 0.07, 7), (100, 0.071, 8), (4096, 1 / 16, 256), (3, 0.5, 2),
                                     (7, 1e-9, 1), (1000, 0.1234567, 124), (5, 1.0, 5), (0, 0.5, 0)])
def test_partial_size_is_the_ceil_of_the_decimal(n, p, k):
    """``partial`` is the decimal as written: 100 · 0.07 is 7.000000000000001 in binary floats."""
    assert partial_size(n, p) == k


def test_partial_textbook():
    """pRMSNorm: the RMS of the first ceil(n·p) elements normalizes the whole row."""
    x, w = rand(3, 10, dtype=torch.float64), rand(10, dtype=torch.float64, seed=1)
    k = 3  # ceil(10 · 0.3); in binary floats 10 * 0.3 is 3.0000000000000004, whose ceil is 4
    rms = x[:, :k].pow(2).mean(-1, keepdim=True).add(1e-8).sqrt()
    torch.testing.assert_close(normlab.rms_norm(x, 10, w, 1e-8, partial=0.3), x / rms * w, rtol=0, atol=1e-14)


def test_eps_none_follows_torch():
    x = torch.zeros(2, 8)
    x[0, 0] = 1e-5
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dtype)
        torch.testing.assert_close(normlab.rms_norm(xd, 8, casting="gemma"), F.rms_norm(xd, (8,)))
        mine, theirs = normlab.nn.RMSNorm(8, dtype=dtype), torch.nn.RMSNorm(8, dtype=dtype)
        assert mine.eps is None and theirs.eps is None
        torch.testing.assert_close(mine(xd), theirs(xd))
    # float32's eps (1.19e-7) for fp32 and half inputs, float64's (2.2e-16) for fp64: values far apart here
    assert abs(normlab.rms_norm(x, 8)[0, 0].item() - 1e-5 / (1.25e-11 + torch.finfo(torch.float32).eps) ** 0.5) < 1e-6
    assert abs(normlab.rms_norm(x.double(), 8)[0, 0].item() - 8**0.5) < 1e-3


@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("partial", [None, 0.4])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gradcheck(casting, partial, offset):
    x = rand(4, 3, 10, dtype=torch.float64).requires_grad_()
    w = rand(10, dtype=torch.float64, seed=1).requires_grad_()
    f = lambda a, b: normlab.rms_norm(a, 10, b, 1e-5, casting=casting, partial=partial, offset=offset)
    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))
    assert torch.autograd.gradcheck(lambda a: normlab.rms_norm(a, (3, 10), partial=partial), (x,))


@pytest.mark.parametrize("partial", [None, 0.4])
@pytest.mark.parametrize("residual_dtype", [None, torch.float64])
def test_add_rms_norm_gradcheck(partial, residual_dtype):
    x, r = rand(5, 12, dtype=torch.float64).requires_grad_(), rand(5, 12, dtype=torch.float64, seed=4).requires_grad_()
    w = rand(12, dtype=torch.float64, seed=1).requires_grad_()
    f = lambda a, b, c: normlab.add_rms_norm(
        a, b, 12, c, 1e-5, partial=partial, offset=0.5, residual_dtype=residual_dtype
    )
    assert torch.autograd.gradcheck(f, (x, r, w))
    assert torch.autograd.gradgradcheck(f, (x, r, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_add_rms_norm_values(dtype, residual_dtype):
    x, r, w = rand(6, 40, dtype=dtype), rand(6, 40, dtype=dtype, seed=5), rand(40, dtype=dtype, seed=6)
    y, s = normlab.add_rms_norm(x, r, 40, w, residual_dtype=residual_dtype)
    y_ref, s_ref = add_rms_norm_reference(x, r, 40, w, residual_dtype=residual_dtype)
    assert s.dtype == (residual_dtype or dtype) and y.dtype == dtype
    assert torch.equal(s, s_ref)
    y64, _ = add_rms_norm_reference(x.double(), r.double(), 40, w.double(), eps=torch.finfo(torch.float32).eps)
    assert_close_same_dtype(y, y_ref, y64, "add_rms_norm")
    # the sum path equals normlab's own add followed by rms_norm
    if residual_dtype is None:
        torch.testing.assert_close(y, normlab.rms_norm(s_ref, 40, w).to(dtype), rtol=0, atol=0)


def test_add_rms_norm_grads_match_unfused():
    x, r = rand(4, 24).requires_grad_(), rand(4, 24, seed=1).requires_grad_()
    w = rand(24, seed=2).requires_grad_()
    y, s = normlab.add_rms_norm(x, r, 24, w)
    (y.square().sum() + 0.5 * s.sum()).backward()
    g1 = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    s2 = x + r
    (normlab.rms_norm(s2, 24, w).square().sum() + 0.5 * s2.sum()).backward()
    for a, b in zip(g1, (x.grad, r.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("use", ["y", "s"])
def test_add_rms_norm_grads_with_one_output_unused(backend, use):
    """Only y or only s in the loss: the unused output's gradient is None (not a zero tensor) and the
    gradients equal the unfused graph's."""
    x, r = rand(4, 24).requires_grad_(), rand(4, 24, seed=1).requires_grad_()
    w = rand(24, seed=2).requires_grad_()
    y, s = normlab.add_rms_norm(x, r, 24, w, backend=backend)
    (y.square().sum() if use == "y" else s.sum()).backward()
    got = [t.grad for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    s2 = x + r
    (normlab.rms_norm(s2, 24, w, backend=backend).square().sum() if use == "y" else s2.sum()).backward()
    for a, b in zip(got, (x.grad, r.grad, w.grad)):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    big = rand(300, 257, dtype=dtype)
    w = rand(257, dtype=dtype, seed=1)
    alone = normlab.rms_norm(big[7:8], 257, w)
    for m in (255, 300):
        assert torch.equal(normlab.rms_norm(big[:m], 257, w)[7:8], alone)
    y1, s1 = normlab.add_rms_norm(big[7:8], big[8:9], 257, w)
    y2, s2 = normlab.add_rms_norm(big[:255].roll(0), big[1:256], 257, w)
    assert torch.equal(y2[7:8], y1) and torch.equal(s2[7:8], s1)


def test_determinism_forward_backward():
    def run():
        x = rand(513, 130).requires_grad_()
        w = rand(130, seed=1).requires_grad_()
        y = normlab.rms_norm(x, 130, w, partial=0.7)
        y.backward(rand(513, 130, seed=9))
        return y.detach(), x.grad, w.grad

    a, b = run(), run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_nan_row_does_not_leak():
    x, w = rand(6, 32), rand(32, seed=1).requires_grad_()
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    x.requires_grad_()
    y = normlab.rms_norm(x, 32, w)
    good = [0, 1, 3, 5]
    x_ok = x.detach()[good].clone().requires_grad_()
    w_ok = w.detach().clone().requires_grad_()
    y_ok = normlab.rms_norm(x_ok, 32, w_ok)
    assert torch.equal(y[good], y_ok)
    y[good].square().sum().backward()
    y_ok.square().sum().backward()
    assert torch.equal(x.grad[good], x_ok.grad)
    # the weight gradient sums over rows, whose rounding depends on row positions: compare with the same
    # rows where the NaN/inf rows are replaced by clean ones (unused by the loss either way)
    x_clean, w_clean = rand(6, 32), w.detach().clone().requires_grad_()
    normlab.rms_norm(x_clean, 32, w_clean)[good].square().sum().backward()
    assert torch.isfinite(w.grad).all() and torch.equal(w.grad, w_clean.grad), (
        "a NaN/inf row leaked into the weight gradient"
    )


def test_zero_size():
    for shape in [(0, 8), (3, 0, 8)]:
        x = torch.randn(*shape)
        assert normlab.rms_norm(x, 8, torch.ones(8)).shape == x.shape
        y, s = normlab.add_rms_norm(x, x, 8)
        assert y.shape == s.shape == x.shape


def test_bad_input_messages():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"trailing shape \[4\]"):
        normlab.rms_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight of shape \[8\]"):
        normlab.rms_norm(x, 8, torch.ones(4))
    with pytest.raises(TypeError, match="weight of dtype torch.float32"):
        normlab.rms_norm(x, 8, torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.rms_norm(torch.ones(2, 8, dtype=torch.int64), 8)
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.rms_norm(torch.ones(2, 8, dtype=torch.complex64), 8)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            normlab.rms_norm(x, 8, eps=eps)
    for p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"partial must be in \(0, 1\]"):
            normlab.rms_norm(x, 8, partial=p)
    with pytest.raises(ValueError, match="casting mode 'fp8'.*'llama'"):
        normlab.rms_norm(x, 8, casting="fp8")
    with pytest.raises(ValueError, match=r"residual of shape \[2, 8\]"):
        normlab.add_rms_norm(x, torch.randn(1, 8), 8)  # no silent broadcasting
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        normlab.rms_norm(x, 8, backend="gpu")


def test_fp32_master_weight_with_half_input():
    x, w = rand(4, 16, dtype=torch.bfloat16), rand(16, seed=1)
    y = normlab.rms_norm(x, 16, w, casting="gemma")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.rms_norm(x, (16,), w))


def test_out_argument():
    x, w = rand(8, 32), rand(32, seed=1)
    out = torch.empty_like(x)
    res = normlab.rms_norm(x, 32, w, out=out)
    assert res is out and torch.equal(out, normlab.rms_norm(x, 32, w))
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        normlab.rms_norm(x.requires_grad_(), 32, w, out=out)
    with pytest.raises(ValueError, match="out must be"):
        normlab.rms_norm(x.detach(), 32, w, out=torch.empty(8, 31))


def test_backend_selection_and_context():
    x = rand(4, 16)
    with normlab.backend("reference"):
        a = normlab.rms_norm(x, 16)
    assert torch.equal(a, normlab.rms_norm(x, 16, backend="reference"))
    with pytest.raises(ValueError, match="unknown backend"), normlab.backend("nope"):
        pass
    assert normlab.dispatch.available()["reference"] == "ok"


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    assert normlab.dispatch.select("rms_norm", rand(2, 4)) == "reference"
    monkeypatch.setenv("NORMLAB_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        normlab.dispatch.select("rms_norm", rand(2, 4))


def test_torch_compile_fullgraph():
    x, r = rand(4, 8, 32).requires_grad_(), rand(4, 8, 32, seed=1)
    w = rand(32, seed=2).requires_grad_()

    def f(x, r, w):
        y, s = normlab.add_rms_norm(x, r, 32, w, offset=1.0)
        return normlab.rms_norm(y + s, 32, w, partial=0.5).square().mean()

    assert_compiled_matches_eager(f, (x, r, w), (x, w))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.one_of(st.integers(1, 300), st.sampled_from([767, 1023, 4097, 8193, 30_011, 100_000])),
    seed=st.integers(0, 2**16),
    special=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    mean=st.sampled_from([0.0, 10.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    strided=st.booleans(),
)
def test_property_shapes_values_strides(rows, n, seed, special, scale, mean, dtype, strided):
    """Row sizes 1 … 10⁵, large means, tiny and huge spreads, strided rows; with ``special`` set, the
    last row holds a NaN or ±inf: that row is NaN where torch's is, and the other rows are untouched."""
    base = rand(rows, 2 * n if strided else n, dtype=torch.float64, scale=scale, mean=mean, seed=seed)
    x = (base[:, ::2] if strided else base).to(dtype)
    if special is not None:
        x[-1, seed % n] = special
    w = rand(n, dtype=dtype, seed=seed + 1)
    fast = normlab.rms_norm(x, n, w, casting="gemma")
    want = F.rms_norm(x, (n,), w)
    ref64 = rms_norm_reference(x.double(), n, w.double(), eps=torch.finfo(torch.float32).eps)
    good = slice(0, rows - 1) if special is not None else slice(None)
    assert_tolerance_rule(fast[good], want[good], ref64[good], "property")
    if special is not None:
        assert torch.equal(fast[-1].isnan(), want[-1].isnan()), "the special row's NaNs differ from torch's"


def test_large_row():
    x = rand(2, 100_000)
    torch.testing.assert_close(normlab.rms_norm(x, 100_000, casting="gemma"), F.rms_norm(x, (100_000,)))


@pytest.mark.parametrize("residual_dtype", [None, torch.float64])
def test_opcheck(residual_dtype):
    """The custom ops' schema, fake implementations and autograd registration agree with the real op."""
    x, r = rand(3, 16).requires_grad_(), rand(3, 16, seed=1).requires_grad_()
    w = rand(16, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.normlab.py_rms_norm, (x, w, 1e-6, "llama", 0.0, 16, "reference"))
    torch.library.opcheck(
        torch.ops.normlab.py_add_rms_norm,
        (x, r, w, 1e-6, "llama", 0.0, 8, residual_dtype or torch.float32, "reference"),
    )


def test_zero_size_normalized_dim():
    """An empty normalized dim (as torch: F.rms_norm(randn(2, 0), (0,)) is an empty (2, 0) result)."""
    for shape in [(2, 0), (3, 2, 0)]:
        x, w = torch.randn(*shape, requires_grad=True), torch.ones(0, requires_grad=True)
        y = normlab.rms_norm(x, 0, w, partial=0.5)
        assert y.shape == x.shape == F.rms_norm(x, (0,)).shape
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == (0,)
        assert normlab.add_rms_norm(x, x, 0)[1].shape == x.shape


def test_non_numeric_options_name_the_expected_value():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="eps must be a finite number > 0, got 'a'"):
        normlab.rms_norm(x, 8, eps="a")
    with pytest.raises(TypeError, match=r"partial must be None or a number in \(0, 1\], got 'half'"):
        normlab.rms_norm(x, 8, partial="half")
    with pytest.raises(TypeError, match="offset must be a finite number, got 'one'"):
        normlab.rms_norm(x, 8, offset="one")
    with pytest.raises(ValueError, match="offset must be a finite number, got nan"):
        normlab.add_rms_norm(x, x, 8, offset=float("nan"))
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints, got 8.0"):
        normlab.rms_norm(x, 8.0)
    import numpy as np

    assert torch.equal(normlab.rms_norm(x, np.int64(8)), normlab.rms_norm(x, 8))  # numpy ints, as the modules


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_casting_none_and_offsets_textbook(dtype):
    """Independent formulas for the modes torch has no op for: "none" (input dtype throughout, the mean of
    squares in fp32), "llama" with an offset and with partial — bitwise for the reference (the spec; fast paths
    are held to it by test_options_vs_reference)."""
    x, w, eps = rand(5, 40, dtype=dtype, scale=3.0), rand(40, dtype=dtype, seed=2), 1e-5
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    none = x * rstd.to(dtype) * (w + 0.5).to(dtype)
    assert torch.equal(normlab.rms_norm(x, 40, w, eps, casting="none", offset=0.5, backend="reference"), none)
    llama = (x.float() * rstd).to(dtype) * (w + 0.5)
    assert torch.equal(normlab.rms_norm(x, 40, w, eps, casting="llama", offset=0.5, backend="reference"), llama)
    rstd_p = torch.rsqrt(x.float()[:, :10].pow(2).mean(-1, keepdim=True) + eps)  # ceil(40 · 0.25) = 10
    y_partial = normlab.rms_norm(x, 40, w, eps, partial=0.25, backend="reference")
    assert torch.equal(y_partial, (x.float() * rstd_p).to(dtype) * w)
    assert torch.equal(normlab.rms_norm(x, 40, None, eps, casting="none", backend="reference"), x * rstd.to(dtype))


# ---- bias: y = RMSNorm(x) + b, fused where the backend has a native op ----------------------------------------
def _biased(dtype, n=33, rows=(5, 7), seed=0, b_dtype=None):
    x = rand(*rows, n, dtype=dtype, seed=seed, mean=0.3)
    w, b = rand(n, dtype=dtype, seed=seed + 1), rand(n, dtype=b_dtype or dtype, seed=seed + 2)
    return x, w, b


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype,b_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("casting,offset,partial", [("llama", 0.0, None), ("gemma", 1.0, None), ("none", 0.5, 0.3)])
def test_bias_is_the_shift_of_the_rounded_output(backend, dtype, b_dtype, casting, offset, partial):
    """``rms_norm(..., bias=b)`` is ``rms_norm(...)`` in the input's dtype, then ``+ b`` rounded to it once more:
    the same bits, forward and input/weight gradients; the bias gradient is Σ dy."""
    x, w, b = (t.requires_grad_() for t in _biased(dtype, b_dtype=b_dtype))
    dy = rand(*x.shape, dtype=dtype, seed=9)
    options = dict(casting=casting, offset=offset, partial=partial, backend=backend)
    fused = normlab.rms_norm(x, 33, w, bias=b, **options)
    c = torch.float32
    plain = normlab.rms_norm(x, 33, w, **options)
    composite = (plain.to(c) + b.to(c)).to(dtype)
    assert fused.dtype == dtype and torch.equal(fused, composite)
    got = torch.autograd.grad(fused, (x, w, b), dy)
    want = torch.autograd.grad(composite, (x, w, b), dy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], dy.float().sum((0, 1)).to(b.dtype))
    reference = rms_norm_reference(x, 33, w, casting=casting, offset=offset, partial=partial, bias=b)
    torch.testing.assert_close(fused, reference)


def test_bias_gradcheck_and_module():
    x, w, b = (t.requires_grad_() for t in _biased(torch.float64, n=9, rows=(3,)))
    assert torch.autograd.gradcheck(lambda x, w, b: normlab.rms_norm(x, 9, w, bias=b, offset=0.5), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: normlab.rms_norm(x, 9, w, bias=b), (x, w, b))
    from normlab.models import RMSNormWithBias

    m = RMSNormWithBias(33, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(rand(33, seed=1))
        m.bias.copy_(rand(33, seed=2))
    x = rand(4, 6, 33)
    assert torch.equal(m(x), normlab.rms_norm(x, 33, m.weight, 1e-5) + m.bias)
    assert m(x).grad_fn.name() == "normlab::RmsNormBackward"  # one fused op, no separate add


def test_bias_gradient_is_deterministic_and_batch_invariant():
    from tests.helpers import threads

    def run(count):
        x, w, b = (t.requires_grad_() for t in _biased(torch.float32, n=130, rows=(513,)))
        with threads(count):
            y = normlab.rms_norm(x, 130, w, bias=b)
            grads = torch.autograd.grad(y, (x, w, b), rand(513, 130, seed=9))
        return (y.detach(), *grads)

    for one, two in zip(run(1), run(2)):
        assert torch.equal(one, two)
    x, w, b = _biased(torch.bfloat16, n=257, rows=(300,))
    alone = normlab.rms_norm(x[7:8], 257, w, bias=b)
    assert torch.equal(normlab.rms_norm(x, 257, w, bias=b)[7:8], alone)


def test_bias_out_compile_opcheck_and_errors():
    x, w, b = _biased(torch.bfloat16)
    out = torch.empty_like(x)
    assert torch.equal(normlab.rms_norm(x, 33, w, bias=b, out=out), normlab.rms_norm(x, 33, w, bias=b))
    assert out.abs().sum() > 0
    xg, wg, bg = (t.float().requires_grad_() for t in (x, w, b))
    assert_compiled_matches_eager(lambda x, w, b: normlab.rms_norm(x, 33, w, bias=b).square().mean(), (xg, wg, bg),
                                  (xg, wg, bg))
    ops = torch.ops.normlab
    torch.library.opcheck(ops.rms_norm, (xg.detach().reshape(-1, 33), wg.detach(), 1e-6, "llama", 0.0, 33,
                                         bg.detach()))
    with pytest.raises(ValueError, match=r"expected bias of shape \[33\], got \[32\]"):
        normlab.rms_norm(x, 33, w, bias=b[:32])
    with pytest.raises(TypeError, match="expected bias of dtype torch.bfloat16 or torch.float32"):
        normlab.rms_norm(x, 33, w, bias=b.double())
