"""dyt (Dynamic Tanh) against the textbook formula and the float64 reference."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab.ops.dyt import dyt_reference
from tests.helpers import DTYPES, assert_close_same_dtype, rand


def textbook(x, alpha, w, b):
    """The paper's forward: ``x = tanh(alpha * x); return x * weight + bias`` (in the input's dtype)."""
    y = torch.tanh(alpha * x)
    return y * (1 if w is None else w) + (0 if b is None else b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 33), (7, 1)])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_matches_textbook(dtype, shape, affine):
    n = shape[-1]
    x = rand(*shape, dtype=dtype, scale=3.0)
    alpha = torch.tensor([0.7], dtype=dtype)
    w = rand(n, dtype=dtype, seed=1) if affine in ("both", "weight") else None
    b = rand(n, dtype=dtype, seed=2) if affine in ("both", "bias") else None
    y = normlab.dyt(x, alpha, w, b)
    w64, b64 = (None if p is None else p.double() for p in (w, b))
    ref64 = dyt_reference(x.double(), alpha.double(), w64, b64)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_same_dtype(y, textbook(x, alpha, w, b), ref64, f"dyt {affine}")
    torch.testing.assert_close(ref64, textbook(x.double(), alpha.double(), w64, b64))
    if dtype in (torch.bfloat16, torch.float16):  # computed in fp32, rounded once
        expected = textbook(x.float(), alpha.float(), *(None if p is None else p.float() for p in (w, b))).to(dtype)
        assert torch.equal(y, expected)


def test_multi_dim_params_and_fp32_alpha():
    x, w, b = rand(3, 4, 5, dtype=torch.bfloat16), rand(4, 5, seed=1), rand(4, 5, seed=2)
    alpha = torch.tensor(0.3)  # 0-dim and fp32 with a bf16 input: both accepted
    y = normlab.dyt(x, alpha, w, b)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, textbook(x.float(), alpha, w, b).to(torch.bfloat16))


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_gradcheck(affine):
    x = rand(3, 4, 6, dtype=torch.float64, scale=2.0).requires_grad_()
    alpha = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    w = rand(6, dtype=torch.float64, seed=1).requires_grad_() if affine in ("both", "weight") else None
    b = rand(6, dtype=torch.float64, seed=2).requires_grad_() if affine in ("both", "bias") else None
    ins = tuple(t for t in (x, alpha, w, b) if t is not None)

    def f(*args):
        it = iter(args)
        xx, a = next(it), next(it)
        return normlab.dyt(xx, a, next(it) if w is not None else None, next(it) if b is not None else None)

    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)


def test_grads_match_autograd_of_textbook():
    x, alpha = rand(5, 8).requires_grad_(), torch.tensor([0.5], requires_grad=True)
    w, b = rand(8, seed=1).requires_grad_(), rand(8, seed=2).requires_grad_()
    dy = rand(5, 8, seed=3)
    g1 = torch.autograd.grad(normlab.dyt(x, alpha, w, b), (x, alpha, w, b), dy)
    g2 = torch.autograd.grad(textbook(x, alpha, w, b), (x, alpha, w, b), dy)
    for a, t in zip(g1, g2):
        assert a.shape == t.shape
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)


def test_nan_in_one_sample_leaves_others_exact():
    x = rand(4, 6)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    x.requires_grad_()
    alpha = torch.tensor([0.5], requires_grad=True)
    w, b = rand(6, seed=1).requires_grad_(), rand(6, seed=2).requires_grad_()
    y = normlab.dyt(x, alpha, w, b)
    good = [0, 2]
    x_ok = x.detach()[good].clone().requires_grad_()
    a_ok, w_ok, b_ok = (t.detach().clone().requires_grad_() for t in (alpha, w, b))
    y_ok = normlab.dyt(x_ok, a_ok, w_ok, b_ok)
    assert torch.equal(y[good], y_ok)
    y[good].sum().backward()
    y_ok.sum().backward()
    assert torch.equal(x.grad[good], x_ok.grad)
    for p, q in ((w, w_ok), (b, b_ok)):
        assert torch.equal(p.grad, q.grad), "a NaN/inf sample leaked into a parameter gradient"
    # alpha's gradient sums over every element: same terms (zeros for the unused rows), another order
    assert torch.isfinite(alpha.grad).all(), "a NaN/inf sample leaked into alpha's gradient"
    torch.testing.assert_close(alpha.grad, a_ok.grad, rtol=1e-6, atol=0)


def test_zero_size():
    x = torch.randn(0, 6, requires_grad=True)
    y = normlab.dyt(x, torch.tensor([0.5]), torch.ones(6), torch.zeros(6))
    assert y.shape == (0, 6)
    y.sum().backward()
    assert normlab.dyt(torch.randn(2, 0), torch.tensor(0.5)).shape == (2, 0)
    assert normlab.dyt(torch.randn(2, 0), torch.tensor(0.5), torch.ones(0), torch.zeros(0)).shape == (2, 0)


def test_bad_input_messages():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"expected alpha to be a one-element tensor.*got shape \[2\]"):
        normlab.dyt(x, torch.ones(2))
    with pytest.raises(ValueError, match="expected alpha to be a one-element tensor.*got float"):
        normlab.dyt(x, 0.5)
    with pytest.raises(TypeError, match="expected alpha of dtype torch.float32"):
        normlab.dyt(x, torch.tensor([1], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected input with trailing shape \[4\]"):
        normlab.dyt(x, torch.tensor([0.5]), torch.ones(4))
    with pytest.raises(ValueError, match=r"expected bias of shape \[6\]"):
        normlab.dyt(x, torch.tensor([0.5]), torch.ones(6), torch.zeros(3))
    with pytest.raises(TypeError, match="expected weight of dtype torch.float32"):
        normlab.dyt(x, torch.tensor([0.5]), torch.ones(6, dtype=torch.float16))
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.dyt(torch.ones(2, 6, dtype=torch.int64), torch.tensor([0.5]))
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.dyt(torch.ones(2, 6, dtype=torch.complex64), torch.tensor([0.5]))


def test_opcheck():
    """torch.library's own check of the custom op: schema, fake impl vs real outputs, autograd registration."""
    x, alpha = rand(3, 8).requires_grad_(), torch.tensor([0.5], requires_grad=True)
    w, b = rand(8, seed=1).requires_grad_(), rand(8, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.normlab.py_dyt, (x, alpha, w, b))
    xh = rand(3, 8, dtype=torch.bfloat16).requires_grad_()  # bf16 input, fp32 alpha and master weights
    torch.library.opcheck(torch.ops.normlab.py_dyt, (xh, alpha, None, b))


def test_functional_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, alpha = rand(2, 3, 8).requires_grad_(), torch.tensor([0.5], requires_grad=True)
    w, b = rand(8, seed=1).requires_grad_(), rand(8, seed=2).requires_grad_()

    def f(x, alpha, w, b):
        return normlab.dyt(normlab.dyt(x, alpha, w, b), alpha).square().mean()

    le, lc = f(x, alpha, w, b), torch.compile(f, fullgraph=True, backend="aot_eager")(x, alpha, w, b)
    torch.testing.assert_close(lc, le)
    for a, e in zip(torch.autograd.grad(lc, (x, alpha, w, b)), torch.autograd.grad(le, (x, alpha, w, b))):
        torch.testing.assert_close(a, e)
