"""BatchNorm, GroupNorm and DyT modules: interchangeable with torch.nn.BatchNorm1d / torch.nn.GroupNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab.nn import BatchNorm, DyT, GroupNorm
from tests.helpers import DTYPES, assert_tolerance_rule, rand


def _train_steps(mods, make_input, steps=5, lr=0.1):
    """The same SGD steps on each module (same inputs, same loss); returns the last outputs."""
    opts = [torch.optim.SGD(m.parameters(), lr=lr) if list(m.parameters()) else None for m in mods]
    outs = None
    for step in range(steps):
        outs = []
        for m, opt in zip(mods, opts):
            y = m(make_input(step))
            if opt is not None:
                opt.zero_grad()
                (y * rand(*y.shape, seed=100 + step)).sum().backward()
                opt.step()
            outs.append(y.detach())
    return outs


def _assert_same_state(a: nn.Module, b: nn.Module, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sa[k], sb[k], **tol)


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
def test_batchnorm_matches_torch_attributes():
    ours, theirs = BatchNorm(6), nn.BatchNorm1d(6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert ours.extra_repr() == theirs.extra_repr()
    _assert_same_state(ours, theirs, rtol=0, atol=0)
    for kw in ({"affine": False}, {"track_running_stats": False}, {"bias": False}, {"momentum": None, "eps": 1e-3}):
        a, b = BatchNorm(3, **kw), nn.BatchNorm1d(3, **kw)
        assert a.extra_repr() == b.extra_repr()
        assert list(a.state_dict()) == list(b.state_dict())
        assert (a.weight is None) == (b.weight is None) and (a.running_mean is None) == (b.running_mean is None)
    assert "layout='NLC'" in repr(BatchNorm(4, layout="NLC"))
    m = BatchNorm(4)
    m(rand(5, 4))
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(4)) and m.num_batches_tracked.item() == 0


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6)])
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False}])
def test_batchnorm_trains_like_torch(momentum, shape, kw):
    """5 SGD steps: outputs, weights and running statistics follow torch.nn.BatchNorm1d; then eval."""
    ours, theirs = BatchNorm(5, momentum=momentum, **kw), nn.BatchNorm1d(5, momentum=momentum, **kw)
    make = lambda step: rand(*shape, seed=step, scale=1 + step, mean=0.5 * step)
    for a, b in zip(*_train_steps([ours, theirs], make)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _assert_same_state(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = rand(*shape, seed=50)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    if ours.track_running_stats:  # eval normalizes with the running statistics
        s = [1, -1] + [1] * (len(shape) - 2)
        w = 1 if ours.weight is None else ours.weight.detach().reshape(s)
        b = 0 if ours.bias is None else ours.bias.detach().reshape(s)
        expected = (x - ours.running_mean.reshape(s)) / torch.sqrt(ours.running_var.reshape(s) + ours.eps) * w + b
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_state_dict_both_ways_after_training():
    make = lambda step: rand(6, 4, 3, seed=step, mean=step)
    ours = BatchNorm(4, momentum=None)
    _train_steps([ours], make)
    theirs = nn.BatchNorm1d(4, momentum=None)
    theirs.load_state_dict(ours.state_dict())
    back = BatchNorm(4, momentum=None)
    back.load_state_dict(theirs.state_dict())
    _assert_same_state(back, ours, rtol=0, atol=0)
    for m in (ours, theirs, back):
        m.eval()
    x = rand(3, 4, 3, seed=9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(back(x), ours(x))
    # a state dict from before num_batches_tracked existed (torch's version 1) still loads
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    old_sd = type(theirs.state_dict())(old)
    old_sd._metadata = {"": {"version": 1}}
    BatchNorm(4).load_state_dict(old_sd)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_nlc_equals_ncl_permuted(momentum):
    xs = [rand(3, 7, 5, seed=s, mean=s) for s in range(5)]
    # 5 training steps on (N, L, C) tokens equal BatchNorm1d on the (N, C, L) permutation
    a, b = BatchNorm(5, momentum=momentum, layout="NLC"), nn.BatchNorm1d(5, momentum=momentum)
    for x in xs:
        torch.testing.assert_close(a(x), b(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)
    _assert_same_state(a, b, rtol=1e-6, atol=1e-6)
    a.eval(), b.eval()
    torch.testing.assert_close(a(xs[0]), b(xs[0].transpose(1, 2)).transpose(1, 2), rtol=1e-6, atol=1e-6)
    assert a(rand(4, 5)).shape == (4, 5)  # (N, C) tokens work in either layout


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_dtypes(dtype):
    ours, theirs = BatchNorm(4, dtype=dtype), nn.BatchNorm1d(4, dtype=dtype)
    x = rand(6, 4, 5, dtype=dtype, mean=1.0)
    ref64 = nn.BatchNorm1d(4, dtype=torch.float64)(x.double())
    assert_tolerance_rule(ours(x), theirs(x), ref64, f"BatchNorm {dtype}")
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_batchnorm_input_checks_like_torch():
    m = BatchNorm(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm1d(4)(torch.randn(1, 4))
    m.eval()
    assert m(torch.randn(1, 4)).shape == (1, 4)
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(N, C\) or \(N, C, L\).*got 4D input"):
        m(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"unknown layout 'NHWC'; expected one of \['NCL', 'NLC'\]"):
        BatchNorm(4, layout="NHWC")
    with pytest.raises(ValueError, match=r"expected input with 4 features \(num_features\) at dim 1 for layout 'NCL'"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(
        ValueError, match=r"expected input with 4 features \(num_features\) at the last dim for layout 'NLC'"
    ):
        BatchNorm(4, layout="NLC")(torch.randn(2, 4, 3))


# ----------------------------------------------------------------------------------------------
# GroupNorm
# ----------------------------------------------------------------------------------------------
def test_groupnorm_matches_torch():
    ours, theirs = GroupNorm(3, 6), nn.GroupNorm(3, 6)
    assert ours.extra_repr() == theirs.extra_repr()
    _assert_same_state(ours, theirs, rtol=0, atol=0)
    for kw in ({"affine": False}, {"bias": False}, {"eps": 1e-3}):
        assert GroupNorm(2, 4, **kw).extra_repr() == nn.GroupNorm(2, 4, **kw).extra_repr()
        assert list(GroupNorm(2, 4, **kw).state_dict()) == list(nn.GroupNorm(2, 4, **kw).state_dict())
    make = lambda step: rand(4, 6, 5, seed=step, mean=step)
    for a, b in zip(*_train_steps([ours, theirs], make)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _assert_same_state(ours, theirs, rtol=1e-5, atol=1e-6)
    back = GroupNorm(3, 6)
    back.load_state_dict(theirs.state_dict())
    theirs2 = nn.GroupNorm(3, 6)
    theirs2.load_state_dict(ours.state_dict())
    x = rand(2, 6, 4, 3, seed=7)
    torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), theirs2(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours.weight.mul_(3)
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(6)) and torch.equal(ours.bias, torch.zeros(6))
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        GroupNorm(4, 6)
    for m in (GroupNorm(2, 6), GroupNorm(2, 6, affine=False)):  # a wrong channel count is caught, weights or not
        with pytest.raises(
            ValueError,
            match=r"expected input of shape \(N, 6, \*\) \(6 = num_channels at dim 1\), got shape \[2, 4, 3\]",
        ):
            m(torch.randn(2, 4, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_groupnorm_dtypes(dtype):
    ours, theirs = GroupNorm(2, 4, dtype=dtype), nn.GroupNorm(2, 4, dtype=dtype)
    x = rand(3, 4, 7, dtype=dtype, mean=1.0)
    assert_tolerance_rule(ours(x), theirs(x), nn.GroupNorm(2, 4, dtype=torch.float64)(x.double()), f"GroupNorm {dtype}")


# ----------------------------------------------------------------------------------------------
# DyT
# ----------------------------------------------------------------------------------------------
def test_dyt_module():
    m = DyT(8)
    assert [n for n, _ in m.named_parameters()] == ["alpha", "weight", "bias"]
    assert m.alpha.shape == (1,) and m.alpha.item() == 0.5
    assert torch.equal(m.weight, torch.ones(8)) and torch.equal(m.bias, torch.zeros(8))
    assert m.extra_repr() == "(8,), alpha_init=0.5, elementwise_affine=True, bias=True"
    x = rand(3, 5, 8)
    torch.testing.assert_close(m(x), torch.tanh(0.5 * x), rtol=0, atol=0)
    _train_steps([m], lambda s: rand(3, 5, 8, seed=s))
    assert m.alpha.item() != 0.5 and m.alpha.grad is not None and m.weight.grad is not None
    expected = m.weight.detach() * torch.tanh(m.alpha.detach() * x) + m.bias.detach()
    torch.testing.assert_close(m(x), expected, rtol=1e-6, atol=1e-6)
    m2 = DyT(8, alpha_init=2.0)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
    m2.reset_parameters()
    assert m2.alpha.item() == 2.0
    assert list(DyT((2, 4), elementwise_affine=False).state_dict()) == ["alpha"]
    assert list(DyT(4, bias=False).state_dict()) == ["alpha", "weight"]
    assert DyT((2, 4))(rand(3, 2, 4)).shape == (3, 2, 4)
    with pytest.raises(ValueError, match=r"expected input with trailing shape \[8\]"):
        m(rand(3, 5))
    for dtype in DTYPES:
        md = DyT(8, dtype=dtype)
        xd = rand(2, 8, dtype=dtype)
        assert md(xd).dtype == dtype and md.alpha.dtype == dtype


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of a small stack, training (running statistics included) and eval
# ----------------------------------------------------------------------------------------------
class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = BatchNorm(8, layout="NLC", momentum=None)
        self.dyt = DyT(8)
        self.gn = GroupNorm(2, 8)
        self.bn_ncl = BatchNorm(8)

    def forward(self, x):  # x: (N, L, C) tokens
        h = self.dyt(self.bn(x))
        return self.bn_ncl(self.gn(h.transpose(1, 2))).square().mean()


def test_torch_compile_fullgraph_stack():
    torch._dynamo.reset()
    eager = _Stack()
    compiled_mod = copy.deepcopy(eager)
    # aot_eager: dynamo + fake impls + AOT autograd + functionalized buffer updates, without inductor's
    # code generation (≈ 35 s more on 2 cores; the ops are plain torch inside, nothing to gain there)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = rand(4, 6, 8, seed=step, mean=step)
        le, lc = eager(x), compiled(x)
        torch.testing.assert_close(lc, le)
        ge = torch.autograd.grad(le, list(eager.parameters()))
        gc = torch.autograd.grad(lc, list(compiled_mod.parameters()))
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_same_state(compiled_mod, eager, rtol=1e-6, atol=1e-6)
    assert eager.bn.num_batches_tracked.item() == 2
    eager.eval(), compiled_mod.eval()
    x = rand(4, 6, 8, seed=9)
    torch.testing.assert_close(compiled(x), eager(x))
