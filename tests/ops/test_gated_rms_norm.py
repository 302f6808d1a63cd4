"""gated_rms_norm against the Hugging Face gated norms, the float64 reference, and the row-wise rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab
import normlab.nn
from normlab.ops.gated_rms_norm import gated_rms_norm_reference
from tests.helpers import assert_close_same_dtype, assert_compiled_matches_eager, assert_tolerance_rule, rand, threads

LOW = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps


def ref64(x, z, n, w, eps=None, **options):
    """The reference in float64, with the eps the low-precision call resolves to."""
    return gated_rms_norm_reference(
        x.double(), None if z is None else z.double(), n, None if w is None else w.double(),
        EPS32 if eps is None else eps, **options,
    )


def hf_gated_norms():
    """(name, module factory, the normlab options it corresponds to) for the Hugging Face gated norms."""
    bamba = pytest.importorskip("transformers.models.bamba.modeling_bamba")
    falcon = pytest.importorskip("transformers.models.falcon_h1.modeling_falcon_h1")
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    return [
        ("bamba", lambda n: bamba.BambaRMSNormGated(n, group_size=n // 4), dict(group_size=None, casting="llama")),
        ("falcon_after", lambda n: falcon.FalconH1RMSNormGated(n, n_groups=2, norm_before_gate=True),
         dict(norm_before_gate=True, casting="gemma")),
        ("falcon_before", lambda n: falcon.FalconH1RMSNormGated(n, n_groups=2, norm_before_gate=False),
         dict(norm_before_gate=False, casting="gemma")),
        ("qwen3_next", lambda n: qwen3_next.Qwen3NextRMSNormGated(n), dict(norm_before_gate=True, casting="llama")),
    ]


def _hf_group_size(m, n):
    return getattr(m, "group_size", None) or n // getattr(m, "n_groups", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(4))
def test_matches_hugging_face_gated_norms(dtype, case):
    """The HF classes' own formula in the same dtype is torch's side of the tolerance rule; the reference
    reproduces it bitwise (the casting modes are their roundings)."""
    name, make, options = hf_gated_norms()[case]
    n = 64
    m = make(n).to(dtype)
    with torch.no_grad():
        m.weight.copy_(rand(n, seed=1, mean=0.5))
    x, z = rand(3, 5, n, dtype=dtype, scale=2.0), rand(3, 5, n, dtype=dtype, seed=2, scale=2.0)
    options = dict(options, group_size=_hf_group_size(m, n))
    with torch.no_grad():
        want = m(x, z)
        fast = normlab.gated_rms_norm(x, z, n, m.weight, m.variance_epsilon, **options)
        same = normlab.gated_rms_norm(x, z, n, m.weight, m.variance_epsilon, backend="reference", **options)
    assert torch.equal(same, want.to(dtype)), f"{name}: the reference is not the HF formula"
    assert_tolerance_rule(fast, want.to(dtype), ref64(x, z, n, m.weight, m.variance_epsilon, **options), name)


@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("group_size", [None, 8, 1])
@pytest.mark.parametrize("gated", [True, False])
def test_options_vs_reference(dtype, norm_before_gate, casting, group_size, gated):
    x, w = rand(5, 48, dtype=dtype, scale=2.0), rand(48, dtype=dtype, seed=3)
    z = rand(5, 48, dtype=dtype, seed=2, scale=2.0) if gated else None
    options = dict(group_size=group_size, norm_before_gate=norm_before_gate, casting=casting)
    fast = normlab.gated_rms_norm(x, z, 48, w, **options)
    same = gated_rms_norm_reference(x, z, 48, w, **options)
    assert fast.dtype == dtype
    assert_close_same_dtype(fast, same, ref64(x, z, 48, w, **options), f"{options}")


def test_textbook_formulas():
    """Independent formulas of both orders, written out (fp64: no roundings to model)."""
    f64 = torch.float64
    x, z, w = rand(4, 12, dtype=f64), rand(4, 12, dtype=f64, seed=1), rand(12, dtype=f64, seed=2)
    eps = 1e-5

    def grouped_rms(h):
        hg = h.reshape(4, 3, 4)
        return (hg / (hg.pow(2).mean(-1, keepdim=True) + eps).sqrt()).reshape(4, 12)

    silu = z * torch.sigmoid(z)
    before = normlab.gated_rms_norm(x, z, 12, w, eps, group_size=4)
    after = normlab.gated_rms_norm(x, z, 12, w, eps, group_size=4, norm_before_gate=True)
    torch.testing.assert_close(before, grouped_rms(x * silu) * w, rtol=0, atol=1e-14)
    torch.testing.assert_close(after, grouped_rms(x) * w * silu, rtol=0, atol=1e-14)
    grouped = normlab.gated_rms_norm(x, None, 12, w, eps, group_size=4)
    torch.testing.assert_close(grouped, grouped_rms(x) * w, rtol=0, atol=1e-14)
    one_group = normlab.gated_rms_norm(x, None, 12, w, eps, offset=1.0, casting="gemma")
    plain = normlab.rms_norm(x, 12, w, eps, casting="gemma", offset=1.0)
    torch.testing.assert_close(one_group, plain, rtol=0, atol=1e-14)


OPTION_GRID = [
    dict(norm_before_gate=b, casting=c, group_size=g, offset=o)
    for b in (False, True) for c in ("llama", "gemma") for g in (None, 5) for o in (0.0, 0.5)
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=str)
def test_gradcheck(options):
    x = rand(3, 2, 10, dtype=torch.float64).requires_grad_()
    z = rand(3, 2, 10, dtype=torch.float64, seed=4, scale=2.0).requires_grad_()
    w = rand(10, dtype=torch.float64, seed=1).requires_grad_()
    f = lambda a, b, c: normlab.gated_rms_norm(a, b, 10, c, 1e-5, **options)
    assert torch.autograd.gradcheck(f, (x, z, w))
    assert torch.autograd.gradcheck(lambda a, c: normlab.gated_rms_norm(a, None, 10, c, 1e-5, **options), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: normlab.gated_rms_norm(a, b, 10, None, 1e-5, **options), (x, z))
    if options["offset"] == 0.0 and options["group_size"] == 5:
        assert torch.autograd.gradgradcheck(f, (x, z, w))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gradients_vs_reference_autograd(dtype, norm_before_gate):
    """The default backend's backward (dx, dz, dw) against plain autograd through the reference in fp64."""
    x, z, w = rand(7, 40, dtype=dtype), rand(7, 40, dtype=dtype, seed=1, scale=2.0), rand(40, dtype=dtype, seed=2)
    dy = rand(7, 40, dtype=dtype, seed=3)
    options = dict(group_size=8, norm_before_gate=norm_before_gate)
    ins = [t.clone().requires_grad_() for t in (x, z, w)]
    got = torch.autograd.grad(normlab.gated_rms_norm(*ins[:2], 40, ins[2], **options), ins, dy)
    ins64 = [t.double().requires_grad_() for t in (x, z, w)]
    want = torch.autograd.grad(gated_rms_norm_reference(*ins64[:2], 40, ins64[2], EPS32, **options), ins64, dy.double())
    for name, a, b in zip(("dx", "dz", "dw"), got, want):
        assert a.dtype == dtype
        scale = b.abs().max().item()
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * max(scale, 1.0)
        assert (a.double() - b).abs().max().item() <= tol, f"{name} {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_batch_invariance(dtype, norm_before_gate):
    x, z, w = rand(300, 96, dtype=dtype), rand(300, 96, dtype=dtype, seed=1), rand(96, dtype=dtype, seed=2)
    f = lambda a, b: normlab.gated_rms_norm(a, b, 96, w, group_size=32, norm_before_gate=norm_before_gate)
    alone = f(x[7:8], z[7:8])
    for m in (8, 255, 300):
        assert torch.equal(f(x[:m], z[:m])[7:8], alone), f"row 7 differs in a batch of {m}"


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_and_two_threads_bitwise(norm_before_gate, dtype, monkeypatch):
    def run():
        ins = [rand(*s, dtype=dtype, seed=i).requires_grad_() for i, s in enumerate([(700, 128), (700, 128), (128,)])]
        y = normlab.gated_rms_norm(ins[0], ins[1], 128, ins[2], group_size=64, norm_before_gate=norm_before_gate)
        return [y.detach(), *torch.autograd.grad(y, ins, rand(700, 128, dtype=dtype, seed=9))]

    with threads(1, monkeypatch):
        one = run()
    with threads(2, monkeypatch):
        two = run()
    for name, a, b in zip(("y", "dx", "dz", "dw"), one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


@pytest.mark.parametrize("where", ["input", "gate"])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_nan_row_stays_in_its_row(where, norm_before_gate):
    good = [0, 1, 3, 5]
    x, z = rand(6, 32), rand(6, 32, seed=1)

    def run(x, z):
        ins = [x.clone().requires_grad_(), z.clone().requires_grad_(), rand(32, seed=2).requires_grad_()]
        y = normlab.gated_rms_norm(ins[0], ins[1], 32, ins[2], group_size=8, norm_before_gate=norm_before_gate)
        y[good].square().sum().backward()
        return y.detach(), *(t.grad for t in ins)

    bad = x.clone() if where == "input" else z.clone()
    bad[2, 5], bad[4, 0] = float("nan"), float("inf")
    y, dx, dz, dw = run(bad, z) if where == "input" else run(x, bad)
    y_ok, dx_ok, dz_ok, dw_ok = run(x, z)
    assert not torch.isfinite(y[2]).all()
    assert torch.equal(y[good], y_ok[good]) and torch.equal(dx[good], dx_ok[good])
    assert torch.equal(dz[good], dz_ok[good])
    assert torch.equal(dw, dw_ok), "a NaN/inf row leaked into the weight gradient"


@pytest.mark.parametrize("n, group_size", [(1, None), (7, 1), (33, 11), (33, 3), (767, 59), (4097, 241), (4097, None),
                                           (9000, 4500), (40_000, 8000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes(n, group_size, dtype):
    x, z, w = rand(3, n, dtype=dtype, mean=0.3), rand(3, n, dtype=dtype, seed=1), rand(n, dtype=dtype, seed=2)
    for nbg in (False, True):
        options = dict(group_size=group_size, norm_before_gate=nbg)
        fast = normlab.gated_rms_norm(x, z, n, w, **options)
        same = gated_rms_norm_reference(x, z, n, w, **options)
        assert_close_same_dtype(fast, same, ref64(x, z, n, w, **options), f"n={n} g={group_size} nbg={nbg}")


def test_strided_inputs_and_multi_dim_normalized_shape():
    base, zb = rand(4, 64), rand(4, 64, seed=1)
    x, z = base[:, ::2], zb[:, ::2]
    dense = normlab.gated_rms_norm(x.contiguous(), z.contiguous(), 32, group_size=8)
    torch.testing.assert_close(normlab.gated_rms_norm(x, z, 32, group_size=8), dense)
    x3, z3, w = rand(2, 3, 4, 6), rand(2, 3, 4, 6, seed=1), rand(4, 6, seed=2)
    got = normlab.gated_rms_norm(x3, z3, (4, 6), w, group_size=12)
    want = normlab.gated_rms_norm(x3.reshape(2, 3, 24), z3.reshape(2, 3, 24), 24, w.reshape(24), group_size=12)
    assert torch.equal(got, want.reshape(got.shape))


def test_torch_compile_fullgraph():
    x, z = rand(4, 8, 32).requires_grad_(), rand(4, 8, 32, seed=1).requires_grad_()
    w = rand(32, seed=2).requires_grad_()

    def f(x, z, w):
        a = normlab.gated_rms_norm(x, z, 32, w, group_size=8)
        b = normlab.gated_rms_norm(a, z, 32, w, norm_before_gate=True, casting="gemma")
        return (b + normlab.gated_rms_norm(x, None, 32, w, group_size=16)).square().mean()

    assert_compiled_matches_eager(f, (x, z, w), (x, z, w))
    with normlab.backend("reference"):
        assert_compiled_matches_eager(f, (x, z, w), (x, z, w))


def test_opcheck():
    x, z, w = rand(3, 16).requires_grad_(), rand(3, 16, seed=1).requires_grad_(), rand(16, seed=2).requires_grad_()
    for nbg in (False, True):
        torch.library.opcheck(torch.ops.normlab.py_gated_rms_norm, (x, z, w, 1e-6, 4, nbg, "llama", 0.0, "reference"))
    weightless = (x, None, None, 1e-6, 16, False, "gemma", 1.0, "reference")
    torch.library.opcheck(torch.ops.normlab.py_gated_rms_norm, weightless)


def test_zero_size():
    for shape in [(0, 8), (3, 0, 8)]:
        x, w = torch.randn(*shape, requires_grad=True), torch.ones(8, requires_grad=True)
        y = normlab.gated_rms_norm(x, torch.randn(*shape), 8, w, group_size=4)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(8))
    x = torch.randn(2, 0)
    assert normlab.gated_rms_norm(x, x, 0).shape == (2, 0)


def test_bad_input_messages():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"gate of shape \[2, 8\]"):
        normlab.gated_rms_norm(x, torch.randn(1, 8), 8)  # no silent broadcasting
    with pytest.raises(TypeError, match="gate of dtype torch.float32"):
        normlab.gated_rms_norm(x, x.double(), 8)
    with pytest.raises(TypeError, match="weight of dtype torch.float32"):
        normlab.gated_rms_norm(x, x, 8, torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="gate must have a floating dtype"):
        normlab.gated_rms_norm(x, torch.ones(2, 8, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="group_size 3 must divide the normalized size 8"):
        normlab.gated_rms_norm(x, x, 8, group_size=3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            normlab.gated_rms_norm(x, x, 8, group_size=bad)
    with pytest.raises(TypeError, match="group_size must be None or a positive int, got 2.0"):
        normlab.gated_rms_norm(x, x, 8, group_size=2.0)
    with pytest.raises(ValueError, match=r"trailing shape \[4\]"):
        normlab.gated_rms_norm(x, x, 4)
    with pytest.raises(ValueError, match=r"weight of shape \[8\]"):
        normlab.gated_rms_norm(x, x, 8, torch.ones(4))
    with pytest.raises(ValueError, match="casting mode 'none'.*'llama'"):
        normlab.gated_rms_norm(x, x, 8, casting="none")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        normlab.gated_rms_norm(x, x, 8, eps=0.0)
    with pytest.raises(ValueError, match="offset must be a finite number"):
        normlab.gated_rms_norm(x, x, 8, offset=float("inf"))


def test_module():
    m = normlab.nn.GatedRMSNorm(32, group_size=8)
    assert torch.equal(m.weight, torch.ones(32)) and m.eps == 1e-6
    assert repr(m) == "GatedRMSNorm(32, eps=1e-06, group_size=8, norm_before_gate=False)"
    assert "casting='gemma', offset=1.0" in repr(normlab.nn.GatedRMSNorm(32, casting="gemma", offset=1.0))
    assert torch.equal(normlab.nn.GatedRMSNorm(32, offset=1.0).weight, torch.zeros(32))
    x, z = rand(2, 3, 32), rand(2, 3, 32, seed=1)
    assert torch.equal(m(x, z), normlab.gated_rms_norm(x, z, 32, m.weight, 1e-6, group_size=8))
    assert torch.equal(m(x), normlab.gated_rms_norm(x, None, 32, m.weight, 1e-6, group_size=8))
    with pytest.raises(ValueError, match="must divide"):
        normlab.nn.GatedRMSNorm(32, group_size=5)
    bf = normlab.nn.GatedRMSNorm(32, dtype=torch.bfloat16)
    assert bf.weight.dtype == torch.bfloat16 and bf(x.bfloat16(), z.bfloat16()).dtype == torch.bfloat16


def test_fp32_master_weight_with_half_input():
    x, z, w = rand(4, 16, dtype=torch.bfloat16), rand(4, 16, dtype=torch.bfloat16, seed=1), rand(16, seed=2)
    for casting in ("llama", "gemma"):
        y = normlab.gated_rms_norm(x, z, 16, w, casting=casting, group_size=4)
        assert y.dtype == torch.bfloat16
        assert_close_same_dtype(y, gated_rms_norm_reference(x, z, 16, w, casting=casting, group_size=4),
                                ref64(x, z, 16, w, casting=casting, group_size=4), casting)


def test_half_gate_and_weight_next_to_a_wide_input_are_upcast_exactly():
    """A Mamba mixer in bf16 hands its norm an fp32 input with a bf16 gate and weight."""
    x, w = rand(4, 16), rand(16, seed=2, dtype=torch.bfloat16)
    z = rand(4, 16, seed=1, dtype=torch.bfloat16).requires_grad_()
    y = normlab.gated_rms_norm(x, z, 16, w, group_size=8)
    assert y.dtype == torch.float32
    assert torch.equal(y, normlab.gated_rms_norm(x, z.detach().float(), 16, w.float(), group_size=8))
    y.sum().backward()
    assert z.grad.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="expected gate of dtype torch.bfloat16"):
        normlab.gated_rms_norm(x.bfloat16(), z.detach().float(), 16)


def test_silu_is_torch_silu():
    """The gate's nonlinearity is F.silu (z·σ(z)), not another sigmoid-weighted unit."""
    x, z = torch.ones(1, 4, dtype=torch.float64), torch.tensor([[-3.0, -0.5, 0.5, 3.0]], dtype=torch.float64)
    y = normlab.gated_rms_norm(x, z, 4, norm_before_gate=True)
    torch.testing.assert_close(y, F.silu(z), rtol=0, atol=1e-15)
