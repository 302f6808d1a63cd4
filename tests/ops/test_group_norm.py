"""group_norm against torch, the textbook formula and the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normlab
from normlab.ops.group_norm import group_norm_reference
from tests.helpers import DTYPES, assert_tolerance_rule, rand

# (shape, num_groups)
CASES = [((4, 6), 3), ((3, 6, 7), 2), ((2, 8, 3, 5), 4), ((2, 4, 5), 1), ((1, 4, 9), 4)]


def textbook(x, num_groups, w, b, eps):
    """GroupNorm written out: statistics per sample over each group of C/G channels and all trailing dims."""
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    y = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)).reshape(x.shape)
    shape = [1, c] + [1] * (x.dim() - 2)
    return y * (1 if w is None else w.reshape(shape)) + (0 if b is None else b.reshape(shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_and_textbook(dtype, shape, groups, affine):
    c = shape[1]
    x = rand(*shape, dtype=dtype, scale=2.0, mean=1.0)
    w, b = (rand(c, dtype=dtype, seed=1), rand(c, dtype=dtype, seed=2)) if affine else (None, None)
    y = normlab.group_norm(x, groups, w, b, 1e-5)
    w64, b64 = (None if p is None else p.double() for p in (w, b))
    ref64 = group_norm_reference(x.double(), groups, w64, b64, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert_tolerance_rule(y, F.group_norm(x, groups, w, b, 1e-5), ref64, f"group_norm {shape} G={groups}")
    assert_tolerance_rule(y, textbook(x, groups, w, b, 1e-5), ref64, "textbook")
    if dtype == torch.float64:
        torch.testing.assert_close(y, textbook(x, groups, w, b, 1e-5), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_params_with_half_input(dtype):
    x, w, b = rand(3, 8, 5, dtype=dtype), rand(8, seed=1), rand(8, seed=2)
    y = normlab.group_norm(x, 2, w, b)
    assert y.dtype == dtype
    ref64 = group_norm_reference(x.double(), 2, w.double(), b.double())
    assert_tolerance_rule(y, F.group_norm(x, 2, w, b), ref64, "fp32 params")


def test_large_mean_two_pass():
    """mean 1e4 and 1e5, std 1 in fp32: the corrected two-pass is within 2× torch's error; the one-pass
    E[x²] - E[x]² formula loses every digit of the variance."""
    for mean in (1e4, 1e5):
        x = rand(4, 6, 256, mean=mean)
        ref64 = textbook(x.double(), 3, None, None, 1e-5)
        assert_tolerance_rule(normlab.group_norm(x, 3), F.group_norm(x, 3), ref64, f"mean {mean}")
    x = rand(4, 6, 256, mean=1e4)
    ref64 = textbook(x.double(), 3, None, None, 1e-5)
    g = x.reshape(4, 3, -1)
    mean = g.mean(-1, keepdim=True)
    one_pass = (g - mean) / torch.sqrt(((g * g).mean(-1, keepdim=True) - mean**2).clamp_min(0) + 1e-5)
    assert (one_pass.reshape(x.shape).double() - ref64).abs().max() > 0.1


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("shape, groups", [((3, 6, 4), 3), ((2, 4, 2, 3), 1), ((3, 4), 4)])
def test_gradcheck(affine, shape, groups):
    c = shape[1]
    x = rand(*shape, dtype=torch.float64, scale=2.0).requires_grad_()
    w = rand(c, dtype=torch.float64, seed=1).requires_grad_() if affine in ("both", "weight") else None
    b = rand(c, dtype=torch.float64, seed=2).requires_grad_() if affine in ("both", "bias") else None
    ins = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return normlab.group_norm(xx, groups, ww, bb, 1e-3)

    assert torch.autograd.gradcheck(f, ins)
    if affine == "both":
        assert torch.autograd.gradgradcheck(f, ins)


def test_grads_match_torch():
    x, w, b = rand(4, 6, 5).requires_grad_(), rand(6, seed=1).requires_grad_(), rand(6, seed=2).requires_grad_()
    dy = rand(4, 6, 5, seed=9)
    g1 = torch.autograd.grad(normlab.group_norm(x, 3, w, b), (x, w, b), dy)
    g2 = torch.autograd.grad(F.group_norm(x, 3, w, b), (x, w, b), dy)
    for a, t in zip(g1, g2):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)


def test_nan_in_one_sample_leaves_others_exact():
    x, w, b = rand(5, 4, 6), rand(4, seed=1).requires_grad_(), rand(4, seed=2).requires_grad_()
    x[2, 1, 3] = float("nan")
    x[4, 0, 0] = float("inf")
    x.requires_grad_()
    y = normlab.group_norm(x, 2, w, b)
    good = [0, 1, 3]
    x_ok = x.detach()[good].clone().requires_grad_()
    w_ok, b_ok = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y_ok = normlab.group_norm(x_ok, 2, w_ok, b_ok)
    assert torch.isnan(y[2]).any() and torch.equal(y[good], y_ok)
    y[good].sum().backward()
    y_ok.sum().backward()
    assert torch.equal(x.grad[good], x_ok.grad)
    assert torch.equal(w.grad, w_ok.grad) and torch.equal(b.grad, b_ok.grad), (
        "a NaN sample leaked into the parameter gradients"
    )


def test_single_value_groups_like_torch():
    """torch raises "Expected more than 1 value per channel" when N·C/G·prod(*) == 1 (one sample, one
    value per group); normlab raises the same. With more samples a one-value group has deviation 0: y = bias."""
    b = rand(4, seed=2)
    too_few = r"Expected more than 1 value per channel when training, got input size \[1, "
    for shape, groups in [((1, 4, 1), 4), ((1, 4), 4), ((1, 2, 1, 1), 2)]:
        with pytest.raises(ValueError, match=too_few):
            F.group_norm(rand(*shape), groups)
        with pytest.raises(ValueError, match=too_few):
            normlab.group_norm(rand(*shape), groups)
    assert torch.equal(normlab.group_norm(rand(3, 2), 2), torch.zeros(3, 2))
    x = rand(2, 4, 1, mean=3.0)
    assert torch.equal(normlab.group_norm(x, 4, None, b), b.reshape(1, 4, 1).expand(2, 4, 1))
    torch.testing.assert_close(F.group_norm(x, 4, None, b), b.reshape(1, 4, 1).expand(2, 4, 1), rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_size(dtype):
    """Empty inputs give empty outputs that still depend on the parameters: torch's zero gradients for
    weight and bias (an empty micro-batch must not break ``loss.backward()``)."""
    for shape in [(0, 4), (0, 4, 3), (2, 4, 0)]:
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
        y = normlab.group_norm(x, 2, w, b)
        assert y.shape == x.shape == F.group_norm(x, 2).shape and y.dtype == dtype
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(b.grad, torch.zeros(4))


def test_bad_input_messages():
    x = torch.randn(2, 6, 3)
    with pytest.raises(
        ValueError, match=r"number of channels \(input.shape\[1\] = 6\) to be divisible by num_groups, got num_groups=4"
    ):
        normlab.group_norm(x, 4)
    for g in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_groups must be a positive int"):
            normlab.group_norm(x, g)
    with pytest.raises(ValueError, match=r"expected weight of shape \[6\]"):
        normlab.group_norm(x, 3, torch.ones(3))
    with pytest.raises(TypeError, match="expected bias of dtype torch.float32"):
        normlab.group_norm(x, 3, None, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.group_norm(torch.ones(2, 6, dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.group_norm(torch.ones(2, 6, dtype=torch.complex64), 3)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            normlab.group_norm(x, 3, eps=eps)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, \*\)"):
        normlab.group_norm(torch.randn(6), 3)
    import numpy as np

    assert torch.equal(normlab.group_norm(x, np.int64(3)), normlab.group_norm(x, 3))  # numpy ints, as torch accepts


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 4),
    length=st.integers(1, 30),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    mean=st.sampled_from([0.0, 10.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    strided=st.booleans(),
)
def test_property_shapes_values_strides(n, groups, per_group, length, scale, mean, dtype, strided):
    assume(n * per_group * length > 1)  # torch raises there: test_single_value_groups_like_torch
    c = groups * per_group
    base = rand(n, c, 2 * length if strided else length, scale=scale, mean=mean, dtype=torch.float64)
    x = (base[:, :, ::2] if strided else base).to(dtype)
    if not torch.isfinite(x).all():
        return
    w, b = rand(c, dtype=dtype, seed=1), rand(c, dtype=dtype, seed=2)
    ref64 = group_norm_reference(x.double(), groups, w.double(), b.double())
    assert_tolerance_rule(normlab.group_norm(x, groups, w, b), F.group_norm(x, groups, w, b), ref64, "property")


def test_opcheck():
    """torch.library's own check of the custom op: schema, fake impl vs real outputs, autograd registration."""
    x = rand(2, 6, 5).requires_grad_()
    w, b = rand(6, seed=1).requires_grad_(), rand(6, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.normlab.group_norm, (x, 3, w, b, 1e-5))
    xh = rand(2, 6, 5, dtype=torch.float16).requires_grad_()  # fp16 input, fp32 master weights
    torch.library.opcheck(torch.ops.normlab.group_norm, (xh, 2, w, None, 1e-5))


def test_functional_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = rand(2, 6, 5, mean=1.0).requires_grad_()
    w, b = rand(6, seed=1).requires_grad_(), rand(6, seed=2).requires_grad_()

    def f(x, w, b):
        return normlab.group_norm(normlab.group_norm(x, 3, w, b), 1).square().mean()

    le, lc = f(x, w, b), torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
    torch.testing.assert_close(lc, le)
    for a, e in zip(torch.autograd.grad(lc, (x, w, b)), torch.autograd.grad(le, (x, w, b))):
        torch.testing.assert_close(a, e)
