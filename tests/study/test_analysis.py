"""Analysis functions against their formulas (docs/architecture.md §10)."""

import math

import pytest
import torch
from torch import nn

import normlab.nn
from normlab.analysis import (
    ActivationStats,
    NormTimer,
    cos_uniform,
    find_norm_layers,
    grad_norm_per_layer,
    irreversibility,
    layer_index,
    layer_norm_geometry,
    measure_invariances,
    random_baseline,
    summarize_cos,
)


def test_cos_uniform_is_the_cosine_with_the_ones_vector():
    x = torch.randn(7, 33, dtype=torch.float64)
    ones = torch.ones(33, dtype=torch.float64)
    direct = (x @ ones) / (x.norm(dim=-1) * ones.norm())
    torch.testing.assert_close(cos_uniform(x), direct, rtol=1e-12, atol=1e-14)
    assert cos_uniform(torch.full((4,), 3.0)).item() == pytest.approx(1.0)
    assert cos_uniform(torch.zeros(4)).item() == 0.0


def test_cos_uniform_rejects_scalars():
    with pytest.raises(ValueError, match="non-empty last dim"):
        cos_uniform(torch.tensor(1.0))


def test_random_baseline_matches_sampling():
    d = 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, d, generator=g, dtype=torch.float64)
    measured = cos_uniform(x).abs().mean().item()
    assert random_baseline(d) == pytest.approx(math.sqrt(2 / math.pi) / 16)
    # standard error of the mean of |cos| over 20000 samples is ~0.6 % of the value; allow 3 %
    # (the margin: docs/benchmarks.md, "Test margins").
    assert measured == pytest.approx(random_baseline(d), rel=0.03)
    assert summarize_cos(x)["ratio"] == pytest.approx(1.0, rel=0.03)
    with pytest.raises(ValueError):
        random_baseline(0)


def test_layer_norm_output_has_zero_cos_and_norm_sqrt_d():
    x = torch.randn(16, 100, dtype=torch.float64) * 3 + 7
    geo = layer_norm_geometry(x)  # over 500 draws: input cos ≥ 0.91, output |cos| ≤ 7.9e-16, norms 4.4e-16 off
    assert geo["input_mean_abs_cos"] > 0.8  # mean 7, std 3: strongly aligned with 1
    assert geo["output_max_abs_cos"] < 1e-14
    assert geo["output_norm_over_sqrt_d_min"] == pytest.approx(1.0, abs=1e-12)
    assert geo["output_norm_over_sqrt_d_max"] == pytest.approx(1.0, abs=1e-12)
    # torch's LayerNorm agrees (eps=0 is not allowed there for exactness, so compare with tiny eps)
    y = torch.nn.functional.layer_norm(x, (100,), eps=1e-12)
    assert cos_uniform(y).abs().max().item() < 1e-12


def test_irreversibility():
    x = torch.randn(8, 64, dtype=torch.float64)
    assert irreversibility(x, alpha=3.0, c=5.0) < 1e-13  # margin: docs/benchmarks.md
    with pytest.raises(ValueError, match="alpha > 0"):
        irreversibility(x, alpha=-1.0)


def test_invariances_match_zhang_sennrich_table1():
    ln = normlab.nn.LayerNorm(64, eps=1e-12, dtype=torch.float64)
    rms = normlab.nn.RMSNorm(64, eps=1e-12, dtype=torch.float64)
    r_ln, r_rms = measure_invariances(ln), measure_invariances(rms)
    assert r_ln["input_scaling_invariant"] and r_ln["weight_scaling_invariant"] and r_ln["recentering_invariant"]
    assert r_rms["input_scaling_invariant"] and r_rms["weight_scaling_invariant"]
    assert not r_rms["recentering_invariant"] and r_rms["recentering"] > 1e-2
    for r in (r_ln, r_rms):  # ‖∂L/∂W‖ ∝ 1/δ
        assert r["grad_ratio"] == pytest.approx(1.0, rel=1e-9)
    # a linear map is not scale invariant: the check can fail
    r_id = measure_invariances(lambda x: x)
    assert not r_id["input_scaling_invariant"] and r_id["grad_ratio"] == pytest.approx(4.0)


def test_layer_index_and_grad_norm_per_layer():
    assert layer_index("blocks.3.mlp.fc.weight") == 3
    assert layer_index("h.12.attn.c_attn.weight") == 12
    assert layer_index("lm_head.weight") is None
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model(torch.randn(3, 4)).pow(2).sum().backward()
    got = grad_norm_per_layer(model)
    assert set(got) == {0, 2}
    assert got[0] == pytest.approx(model[0].weight.grad.norm().item(), rel=1e-6)
    assert got[2] == pytest.approx(model[2].weight.grad.norm().item(), rel=1e-6)


def test_activation_stats_and_timer_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), normlab.nn.LayerNorm(16), nn.Linear(16, 16), normlab.nn.RMSNorm(16))
    layers = find_norm_layers(model)
    assert [n for n, _ in layers] == ["1", "3"]
    x = torch.randn(5, 8)
    with ActivationStats(model, keep_inputs=True) as rec:
        model(x)
    s = rec.summary()
    assert rec.order == ["1", "3"]
    h = model[0](x)
    assert s["1"]["in"]["cos"] == pytest.approx(cos_uniform(h).mean().item(), rel=1e-6)
    assert abs(s["1"]["out"]["cos"]) < 1e-5  # LayerNorm output (w=1, b=0); margin: docs/benchmarks.md
    torch.testing.assert_close(rec.inputs["1"][0], h)
    with NormTimer(model) as timer:
        model(x.requires_grad_()).sum().backward()
    assert timer.forward_s > 0 and timer.backward_s > 0
    assert not model[1]._forward_hooks and not model[1]._backward_hooks  # hooks removed


class _Sleep(torch.autograd.Function):
    """Identity forward; its backward sleeps ``seconds``."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import time

        time.sleep(ctx.seconds)
        return g, None


class _SlowNorm(nn.Module):
    """RMSNorm in four autograd nodes, one of which sleeps in backward: a norm module of several ops."""

    def __init__(self, d, seconds):
        super().__init__()
        self.weight, self.seconds = nn.Parameter(torch.ones(d)), seconds

    def forward(self, x):
        x = _Sleep.apply(x, self.seconds)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_module_nodes_are_the_nodes_a_call_created():
    from normlab.analysis.hooks import module_nodes

    lin = nn.Linear(8, 8)
    h = lin(torch.randn(3, 8))
    one_op = normlab.nn.LayerNorm(8)
    y = one_op(h)
    roots, nodes = module_nodes((h,), y)
    assert roots == nodes == [y.grad_fn]  # the native op: one node
    slow = _SlowNorm(8, 0.0)
    y = slow(h)
    roots, nodes = module_nodes(((h,), {}), y)
    assert roots == [y.grad_fn]
    assert sorted(n.name() for n in nodes) == ["AddBackward0", "MeanBackward1", "MulBackward0", "MulBackward0",
                                                 "PowBackward0", "RsqrtBackward0", "_SleepBackward"]
    assert h.grad_fn not in nodes and not any(hasattr(n, "variable") for n in nodes)
    assert module_nodes((h,), h) == ([], [])  # an identity module created nothing


def test_norm_timer_times_the_norms_backward_and_nothing_else():
    """A norm of several ops whose backward sleeps 50 ms, between two ops whose backward sleeps 200 ms:
    the timer counts the first, not the second."""
    norm = _SlowNorm(8, 0.05)
    before, after = nn.Linear(8, 8), nn.Linear(8, 8)
    with NormTimer(nn.Sequential(), [("norm", norm)]) as timer:
        x = _Sleep.apply(before(torch.randn(4, 8)), 0.2)
        out = _Sleep.apply(after(norm(x)), 0.2)
        out.sum().backward()
    assert 0.05 <= timer.backward_s < 0.2
    assert norm.weight.grad is not None and before.weight.grad is not None
    timer.reset()
    with torch.no_grad(), timer:
        norm(torch.randn(4, 8))
    assert timer.backward_s == 0 and timer.forward_s > 0
