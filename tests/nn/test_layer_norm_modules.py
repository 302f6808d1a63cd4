"""LayerNorm / RMSNorm / AddLayerNorm / AddRMSNorm / AdaLayerNorm modules: interchangeable with torch.nn."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normlab
from normlab.nn import AdaLayerNorm, AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from tests.helpers import rand

LN_CONFIGS = [
    dict(normalized_shape=16),
    dict(normalized_shape=(3, 16), eps=1e-6),
    dict(normalized_shape=[16], bias=False),
    dict(normalized_shape=16, elementwise_affine=False),
]
RMS_CONFIGS = [
    dict(normalized_shape=16),
    dict(normalized_shape=(3, 16), eps=1e-6),
    dict(normalized_shape=16, elementwise_affine=False),
]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


@pytest.mark.parametrize("cfg", LN_CONFIGS)
def test_layer_norm_interchange_with_torch(cfg):
    x = rand(4, 3, 16, mean=2.0)
    for src_cls, dst_cls in [(nn.LayerNorm, LayerNorm), (LayerNorm, nn.LayerNorm), (AddLayerNorm, nn.LayerNorm)]:
        src, dst = randomize(src_cls(**cfg)), dst_cls(**cfg)
        assert list(src.state_dict()) == list(dst.state_dict())
        dst.load_state_dict(src.state_dict())  # strict: same keys and shapes
        mine = dst if isinstance(dst, LayerNorm) else src
        theirs = src if mine is dst else dst
        y = mine(x) if not isinstance(mine, AddLayerNorm) else mine(x, torch.zeros_like(x))[0]
        torch.testing.assert_close(y, theirs(x))
        assert mine.extra_repr() == theirs.extra_repr()
        assert mine.normalized_shape == theirs.normalized_shape and mine.eps == theirs.eps


@pytest.mark.parametrize("cfg", RMS_CONFIGS)
def test_rms_norm_interchange_with_torch(cfg):
    x = rand(4, 3, 16)
    for src_cls, dst_cls in [(nn.RMSNorm, RMSNorm), (RMSNorm, nn.RMSNorm), (AddRMSNorm, nn.RMSNorm)]:
        src, dst = randomize(src_cls(**cfg)), dst_cls(**cfg)
        assert list(src.state_dict()) == list(dst.state_dict())
        dst.load_state_dict(src.state_dict())
        mine = dst if isinstance(dst, RMSNorm) else src
        theirs = src if mine is dst else dst
        y = mine(x) if not isinstance(mine, AddRMSNorm) else mine(x, torch.zeros_like(x))[0]
        torch.testing.assert_close(y, theirs(x))
        assert mine.extra_repr() == theirs.extra_repr()


def test_defaults_and_reset_parameters_like_torch():
    for mine, theirs in [(LayerNorm(8), nn.LayerNorm(8)), (RMSNorm(8), nn.RMSNorm(8))]:
        randomize(mine).reset_parameters()
        for (k1, a), (k2, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert k1 == k2 and torch.equal(a, b)
    assert LayerNorm(8).eps == nn.LayerNorm(8).eps and RMSNorm(8).eps is nn.RMSNorm(8).eps is None
    gemma = RMSNorm(8, offset=1.0, casting="gemma")
    assert torch.equal(gemma.weight, torch.zeros(8)), "offset=1: weight starts at 0 so the scale (1 + w) starts at 1"
    x = rand(3, 8)
    torch.testing.assert_close(gemma(x), nn.RMSNorm(8)(x))


def test_rms_norm_extra_repr_shows_non_default_options():
    assert repr(RMSNorm(8)) == "RMSNorm((8,), eps=None, elementwise_affine=True)"
    r = RMSNorm(8, 1e-6, casting="gemma", offset=1.0, partial=0.25)
    assert r.extra_repr() == "(8,), eps=1e-06, elementwise_affine=True, casting='gemma', offset=1.0, partial=0.25"
    assert "residual_dtype=torch.float32" in repr(AddRMSNorm(8, residual_dtype=torch.float32))
    assert repr(LayerNorm(8, bias=False)) == "LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=False)"
    assert repr(AdaLayerNorm(8, 4)) == (
        "AdaLayerNorm(\n  (8,), cond_dim=4, eps=1e-05\n"
        "  (scale_shift): Linear(in_features=4, out_features=16, bias=True)\n)"
    )


def test_rms_norm_module_options_forwarded():
    x = rand(5, 24, dtype=torch.bfloat16)
    m = randomize(RMSNorm(24, 1e-6, casting="gemma", offset=1.0, partial=0.5, dtype=torch.bfloat16))
    assert torch.equal(m(x), normlab.rms_norm(x, 24, m.weight, 1e-6, casting="gemma", offset=1.0, partial=0.5))
    with pytest.raises(ValueError, match="casting mode 'fp8'"):
        RMSNorm(8, casting="fp8")
    with pytest.raises(ValueError, match=r"partial must be in \(0, 1\]"):
        RMSNorm(8, partial=1.5)


def test_weightless_rms_norm_takes_any_last_dim():
    """normalized_shape=None: the input's last dim, whatever its size (Hugging Face's unweighted RMSNorms)."""
    m = RMSNorm(None, eps=1e-6, elementwise_affine=False)
    for n in (8, 33):
        x = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(m(x), torch.nn.functional.rms_norm(x, (n,), eps=1e-6))
    with pytest.raises(ValueError, match="normalized_shape=None .* needs elementwise_affine=False"):
        RMSNorm(None)


def test_add_modules():
    x, r = rand(4, 16, dtype=torch.bfloat16), rand(4, 16, dtype=torch.bfloat16, seed=1)
    ln = randomize(AddLayerNorm(16, dtype=torch.bfloat16))
    y, s = ln(x, r)
    y2, s2 = normlab.add_layer_norm(x, r, 16, ln.weight, ln.bias)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    rms = randomize(AddRMSNorm(16, residual_dtype=torch.float32), seed=2)
    y, s = rms(x, r)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    y2, s2 = normlab.add_rms_norm(x, r, 16, rms.weight, residual_dtype=torch.float32)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    ln32 = AddLayerNorm(16, residual_dtype=torch.float32)
    assert ln32(x, r)[1].dtype == torch.float32


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm, AddLayerNorm, AddRMSNorm, AdaLayerNorm])
def test_factory_kwargs(cls):
    args = (8, 4) if cls is AdaLayerNorm else (8,)
    m = cls(*args, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    assert len(list(m.parameters())) == (1 if cls in (RMSNorm, AddRMSNorm) else 2)
    m = cls(*args, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())


def test_module_gradients_match_torch():
    x = rand(6, 16, mean=1.0)
    mine, theirs = randomize(LayerNorm(16)), nn.LayerNorm(16)
    theirs.load_state_dict(mine.state_dict())
    dy = rand(6, 16, seed=5)
    mine(x).backward(dy)
    theirs(x).backward(dy)
    for a, b in zip(mine.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def ada_formula(x, c, lin, eps):
    """The direct formula: LN without affine, then (1 + scale) and shift from one Linear of c."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    scale, shift = (c @ lin.weight.T + lin.bias).chunk(2, dim=-1)
    if x.dim() == 3:
        scale, shift = scale[:, None, :], shift[:, None, :]
    return (x - mu) / torch.sqrt(var + eps) * (1 + scale) + shift


def test_ada_layer_norm_starts_as_plain_layer_norm():
    m = AdaLayerNorm(16, cond_dim=5)
    x, c = rand(2, 7, 16, mean=1.0), rand(2, 5, seed=1)
    assert torch.equal(m.scale_shift.weight, torch.zeros(32, 5)) and torch.equal(m.scale_shift.bias, torch.zeros(32))
    torch.testing.assert_close(m(x, c), nn.functional.layer_norm(x, (16,)))


@pytest.mark.parametrize("shape", [(2, 6), (2, 3, 6)])
def test_ada_layer_norm_vs_formula_and_gradcheck(shape):
    m = randomize(AdaLayerNorm(6, cond_dim=3, eps=1e-6, dtype=torch.float64))
    x = rand(*shape, dtype=torch.float64, mean=0.5).requires_grad_()
    c = rand(2, 3, dtype=torch.float64, seed=1).requires_grad_()
    torch.testing.assert_close(m(x, c), ada_formula(x, c, m.scale_shift, 1e-6), rtol=0, atol=1e-13)
    w, b = m.scale_shift.weight, m.scale_shift.bias
    f = lambda x, c, w, b: torch.func.functional_call(m, {"scale_shift.weight": w, "scale_shift.bias": b}, (x, c))
    assert torch.autograd.gradcheck(f, (x, c, w, b))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_rms_norm_module_on_fp32_input_as_torch(half):
    """``torch.nn.RMSNorm(d).half()`` takes float32 input and returns float32 (the weight upcast, exactly);
    so does normlab's, with the weight's gradient in its own dtype."""
    ours, theirs = RMSNorm(16).to(half), nn.RMSNorm(16).to(half)
    with torch.no_grad():
        ours.weight.copy_(rand(16, seed=1))
        theirs.weight.copy_(ours.weight)
    x = rand(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the mixed dtypes
        want = theirs(x)
    y = ours(x)
    assert y.dtype == want.dtype == torch.float32
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert ours.weight.grad.dtype == half


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16])
def test_ada_layer_norm_half_input_with_fp32_module(c_dtype):
    """Like every other layer, the output is in the input's dtype; a bf16 condition meets fp32
    parameters in their dtype. The modulation runs in fp32 and is rounded once."""
    m = randomize(AdaLayerNorm(16, cond_dim=5))
    x, c = rand(2, 7, 16, dtype=torch.bfloat16, mean=1.0), rand(2, 5, seed=1, dtype=c_dtype)
    y = m(x, c)
    assert y.dtype == torch.bfloat16
    want = ada_formula(x.float(), c.float(), m.scale_shift, 1e-5)
    assert (y.float() - want).abs().max().item() <= 2 ** -7 * want.abs().max().item() + 1e-2


def test_ada_layer_norm_bad_condition_shape():
    m = AdaLayerNorm(16, cond_dim=5)
    x = torch.randn(2, 7, 16)
    with pytest.raises(ValueError, match=r"condition c of shape \(B, 5\).*got \[2, 4\]"):
        m(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"condition c of shape \(B, 5\).*got \[2, 1, 5\]"):
        m(x, torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match=r"B = 3 \(the batch of c\), got \[2, 7, 16\]"):
        m(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"trailing shape \[16\]"):
        m(torch.randn(2, 7, 15), torch.randn(2, 5))
