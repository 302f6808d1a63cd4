"""The verdict rules (normlab.study.verdicts) on made-up measurements, each threshold from both sides."""

from __future__ import annotations

import math

import pytest

from normlab.study import verdicts as v

HOLDS, PARTLY, NOT_HERE = "holds", "partly holds", "does not hold here"


@pytest.mark.parametrize("ln, rms, savings, word", [
    ([2.00, 2.01, 1.99], [2.01, 2.02, 2.00], [10.0, 11.0, 9.0], HOLDS),
    ([2.00, 2.00], [2.05, 2.05], [5.0, 5.0], HOLDS),          # Δ exactly at the margin, saving 5 − 0 ≥ 3
    ([2.00, 2.00], [2.06, 2.06], [10.0, 10.0], PARTLY),       # no spread: Δ 0.06 beyond the margin, worse quality
    ([2.00, 2.00], [1.94, 1.94], [10.0, 10.0], PARTLY),       # a lower loss counts as different too
    ([2.0, 2.2, 1.8], [2.1, 2.3, 1.9], [10.0, 10.0], HOLDS),  # Δ 0.1 beyond the margin, within 2× the pooled std
    ([2.0, 2.0], [2.0, 2.0], [4.0, 2.0], PARTLY),             # mean 3 ≥ 3, but 3 − 2·1.41 < 3: not faster
    ([2.0, 2.0], [2.3, 2.3], [-5.0, -4.0], NOT_HERE),
])
def test_loss_and_speed(ln, rms, savings, word):
    verdict = v.loss_and_speed(ln, rms, savings)
    assert verdict.word == word
    assert word != HOLDS or "yes" in verdict.reason


def test_pooled_std_and_beyond():
    assert v.pooled_std([1.0], [2.0]) == 0.0
    assert v.pooled_std([1.0, 3.0], [5.0, 7.0]) == pytest.approx(2 ** 0.5)
    assert v.pooled_std([1.0, 3.0], [4.0]) == pytest.approx(2 ** 0.5)  # one value adds no spread, no dof
    assert v.beyond(0.2, 0.1, 0.09) and not v.beyond(0.2, 0.1, 0.1) and not v.beyond(0.1, 0.1, 0.0)
    assert v.beyond(-0.2, 0.1, 0.0)


@pytest.mark.parametrize("early, late, word", [
    ([1.5, 1.6, 1.4], [1.0, 1.05, 0.95], HOLDS),
    ([1.5, 1.5], [1.5, 1.5], PARTLY),          # higher, but not more so early
    ([1.1, 1.3], [0.9, 0.9], NOT_HERE),        # mean 1.2, std 0.14: 1.2 − 0.28 < 1, within the spread
    ([0.8, 0.7], [1.0, 1.0], NOT_HERE),
])
def test_grad_trajectories(early, late, word):
    assert v.grad_trajectories(early, late).word == word


def _ratios(post, pre):
    """Depths 6 and 12 with the same per-seed ratios."""
    return {(d, p): list(r) for d in (6, 12) for p, r in (("post", post), ("pre", pre))}


@pytest.mark.parametrize("post, pre, word", [
    ((1.5, 1.4, 1.6), (0.3, 0.4, 0.35), HOLDS),
    ((1.21, 1.21), (1.0, 1.0), HOLDS),            # no spread: mean 1.21 > 1; Pre-LN at 1 does not grow
    ((1.0, 1.0, 1.0), (0.3, 0.3, 0.3), PARTLY),   # Post-LN at exactly 1 does not grow
    ((1.4, 1.0, 1.6), (0.3, 0.3, 0.3), PARTLY),   # mean 1.33, std 0.31: within the spread of 1
    ((1.5, 1.6), (1.2, 1.3), PARTLY),             # Pre-LN grows too
    ((0.9, 0.95), (1.2, 1.25), NOT_HERE),         # the other way round
])
def test_grad_at_init(post, pre, word):
    assert v.grad_at_init(_ratios(post, pre)).word == word


def test_grad_at_init_judges_post_at_the_deepest_depth_and_pre_at_every_depth():
    ratios = _ratios((1.5, 1.6), (0.3, 0.4))
    ratios[(6, "post")] = [0.9, 1.0]  # the shallower Post-LN model does not grow: the deepest decides
    assert v.grad_at_init(ratios).word == HOLDS
    ratios[(12, "post")] = [1.0, 1.01]
    assert v.grad_at_init(ratios).word == PARTLY
    ratios[(6, "pre")] = [1.3, 1.31]  # a shallower Pre-LN model that grows is enough to fail Pre-LN's part
    assert v.grad_at_init(ratios).word == NOT_HERE
    assert "2 seeds" in v.grad_at_init(ratios).reason


def test_mean_std():
    assert v.mean_std([2.0]) == (2.0, 0.0)
    mean, std = v.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    with pytest.raises(ValueError):
        v.mean_std([])


@pytest.mark.parametrize("ratios, irrev, word", [
    ([1.2, 3.0], [(1e-15, 1e-12)], HOLDS),
    ([1.2, 3.01], [(1e-15, 1e-12)], PARTLY),          # one model off the baseline
    ([1.0], [(1e-12, 1e-12)], PARTLY),                # the formula's change reaches 1e-12
    ([1.0], [(1e-15, 1e-9)], PARTLY),                 # a module's change reaches 1e-9
    ([4.0], [(0.0, 0.0), (1e-11, 0.0)], NOT_HERE),
])
def test_geometry(ratios, irrev, word):
    assert v.geometry(ratios, irrev).word == word


def test_invariances():
    assert v.invariances([True] * 8).word == HOLDS
    verdict = v.invariances([True] * 7 + [False])
    assert verdict.word == NOT_HERE and verdict.reason == "7/8 cells match"


@pytest.mark.parametrize("d32, d64, scale, fwd, fwd_bwd, word", [
    (1e-6, 1e-14, 10.0, 5.0, 4.0, HOLDS),
    (9.9e-3, 1e-14, 10.0, 3.0, 3.0, HOLDS),       # fp32 bound scales with the logits, savings inclusive
    (1e-2, 1e-14, 10.0, 5.0, 5.0, PARTLY),        # fp32 at 1e-3 of the scale: not exact
    (5e-4, 1e-14, 0.1, 5.0, 5.0, HOLDS),          # with logits below 1 the fp32 bound is 1e-3 itself
    (2e-3, 1e-14, 0.1, 5.0, 5.0, PARTLY),
    (1e-6, 1e-9, 10.0, 5.0, 5.0, PARTLY),         # fp64 at 1e-9: not exact
    (1e-6, 1e-14, 10.0, 5.0, 2.9, PARTLY),        # exact, faster in one measurement only
    (1.0, 1e-3, 10.0, -1.0, 0.0, NOT_HERE),
])
def test_conversion(d32, d64, scale, fwd, fwd_bwd, word):
    assert v.conversion(d32, d64, scale, fwd, fwd_bwd).word == word


@pytest.mark.parametrize("share, saving, word", [
    ((4.0, 5.0, 6.0), (1.0, 2.0, 3.0), HOLDS),       # 5 ± 1: 7 < 10; saving inside the share
    ((9.0, 9.0), (1.0, 1.0), HOLDS),                 # no spread: 9 < 10
    ((10.0, 10.0), (1.0, 1.0), PARTLY),              # at 10 %: not tiny
    ((4.0, 6.0, 8.0), (1.0, 1.0, 1.0), PARTLY),      # 6 ± 2: 10 is within the spread
    ((2.0, 2.0), (8.0, 8.0), PARTLY),                # tiny, but RMSNorm "saves" more than the norms cost
    ((20.0, 20.0), (30.0, 30.0), NOT_HERE),
])
def test_norm_share(share, saving, word):
    shares = {128: [50.0, 50.0], 512: list(share)}      # only the widest width's share decides "tiny"
    savings = {128: [1.0, 1.0], 512: list(saving)}
    assert v.norm_share(shares, savings).word == word


def test_norm_share_bound_is_checked_at_every_width():
    shares, savings = {128: [3.0, 3.0], 512: [2.0, 2.0]}, {128: [9.0, 9.0], 512: [1.0, 1.0]}
    assert v.norm_share(shares, savings).word == PARTLY
    assert "within the share at every width: no" in v.norm_share(shares, savings).reason


@pytest.mark.parametrize("bn, ln, is_worse", [
    ([0.30, 0.30], [0.20, 0.20], True),        # Δ 0.10, no spread
    ([0.249, 0.249], [0.20, 0.20], False),     # Δ 0.049 within the margin 0.05
    ([0.251, 0.251], [0.20, 0.20], True),      # Δ 0.051 beyond it
    ([0.2, 0.4], [0.1, 0.3], False),           # Δ 0.10 within 2 × the pooled std 0.141
    ([0.30, 0.32], [0.20, 0.22], True),        # Δ 0.10 beyond 2 × the pooled std 0.0141
    ([0.20, 0.20], [0.30, 0.30], False),       # BatchNorm better: not worse
    ([float("nan"), 0.3], [0.2, 0.2], True),   # a diverged BatchNorm run
    ([0.3, 0.3], [float("inf"), 0.2], False),  # a diverged LayerNorm run: nothing to compare
])
def test_batchnorm_worse(bn, ln, is_worse):
    assert v.worse(bn, ln)[0] is is_worse


def test_batchnorm_worse_spread_threshold_from_both_sides():
    ln = [0.0, 0.1]  # with a BatchNorm of the same spread, the pooled std is 0.0707…, SPREAD_K × it 0.1414…
    spread = v.SPREAD_K * v.pooled_std([0.0, 0.1], ln)
    assert v.worse([spread + 0.001, spread + 0.101], ln)[0]      # Δ just beyond SPREAD_K × the pooled std
    assert not v.worse([spread - 0.001, spread + 0.099], ln)[0]  # Δ just within it


WORSE, SAME, BETTER = ([0.3, 0.3], [0.1, 0.1]), ([0.1, 0.1], [0.1, 0.1]), ([-0.3, -0.3], [0.1, 0.1])
FLIPPED = ([-0.3, -0.3], [0.0, 0.0])  # a large negative gap or change is worse too: (b) and (c) are magnitudes


@pytest.mark.parametrize("a, b, c, word, parts", [
    (WORSE, WORSE, WORSE, HOLDS, 3),
    (WORSE, FLIPPED, FLIPPED, HOLDS, 3),
    (WORSE, SAME, WORSE, PARTLY, 2),
    (SAME, SAME, FLIPPED, PARTLY, 1),
    (BETTER, SAME, SAME, NOT_HERE, 0),  # (a) is signed: a smaller batch-size cost is not worse
])
def test_batch_vs_layer(a, b, c, word, parts):
    verdict = v.batch_vs_layer(a, b, c)
    assert verdict.word == word and verdict.reason.count("worse: yes") == parts
def _depth(pre_growth=(3.0, 3.2, 2.8), peri_growth=(1.5, 1.6, 1.4), lns_growth=(1.5, 1.6, 1.4),
           pre_de=(0.2, 0.22, 0.18), lns_de=(0.6, 0.62, 0.58),
           pre_loss=(2.5, 2.51, 2.49), peri_loss=(2.3, 2.31, 2.29), lns_loss=(2.3, 2.31, 2.29)):
    """Experiment 10's verdict on per-seed numbers; the defaults make every part hold."""
    return v.depth({"pre": list(pre_growth), "sandwich": list(peri_growth), "lnscaling": list(lns_growth)},
                   {"pre": list(pre_de), "sandwich": [0.3, 0.3, 0.3], "lnscaling": list(lns_de)},
                   {"pre": list(pre_loss), "sandwich": list(peri_loss), "lnscaling": list(lns_loss)})


#: Experiment 10's numbers where no check holds: no growth, nothing smaller, no curse, no lower loss.
NONE_HOLDS = {"pre_growth": (1.0,) * 3, "peri_growth": (1.0,) * 3, "lns_growth": (1.0,) * 3, "pre_de": (0.9,) * 3,
              "lns_de": (0.9,) * 3, "peri_loss": (2.5,) * 3, "lns_loss": (float("nan"),) * 3}


@pytest.mark.parametrize("kw, word", [
    ({}, HOLDS),
    # (1) Pre-LN's growth beyond 1: mean − 2·std = 1.01 counts, 0.99 not (std 0.1)
    ({"pre_growth": (1.11, 1.21, 1.31), "peri_growth": (0.5,) * 3, "lns_growth": (0.5,) * 3}, HOLDS),
    ({"pre_growth": (1.09, 1.19, 1.29), "peri_growth": (0.5,) * 3, "lns_growth": (0.5,) * 3}, PARTLY),
    # Peri-LN / LN-Scaling below Pre-LN beyond 2× the pooled std (0.2 here): Δ 0.41 counts, 0.39 not
    ({"peri_growth": (2.39, 2.59, 2.79)}, HOLDS),
    ({"peri_growth": (2.41, 2.61, 2.81)}, PARTLY),
    ({"lns_growth": (2.41, 2.61, 2.81)}, PARTLY),
    # (2) Pre-LN's deep/early below 0.5 beyond the spread: 0.4 + 2·0.04 = 0.48 counts, 0.52 not
    ({"pre_de": (0.36, 0.40, 0.44), "lns_de": (0.9,) * 3}, HOLDS),
    ({"pre_de": (0.40, 0.44, 0.48), "lns_de": (0.9,) * 3}, PARTLY),
    # LN-Scaling raises it beyond 2× the pooled std (0.04): Δ 0.09 counts, 0.07 not; lowering it never
    ({"pre_de": (0.16, 0.2, 0.24), "lns_de": (0.25, 0.29, 0.33)}, HOLDS),
    ({"pre_de": (0.16, 0.2, 0.24), "lns_de": (0.23, 0.27, 0.31)}, PARTLY),
    ({"lns_de": (0.1, 0.1, 0.1)}, PARTLY),
    # (3) a loss lower by more than 0.05 nats and 2× the pooled std (0.01 here): Δ 0.051 counts, 0.049 not
    ({"peri_loss": (2.439, 2.449, 2.459)}, HOLDS),
    ({"peri_loss": (2.441, 2.451, 2.461)}, PARTLY),
    ({"pre_loss": (2.4, 2.5, 2.6), "peri_loss": (2.3, 2.4, 2.5), "lns_loss": (2.3, 2.4, 2.5)}, PARTLY),  # Δ 0.1 < 0.2
    ({"lns_loss": (2.7, 2.71, 2.69)}, PARTLY),  # a higher loss never counts
    # no check holding is not here; any one holding is partly
    (NONE_HOLDS, NOT_HERE),
    ({**NONE_HOLDS, "pre_growth": (1.2,) * 3}, PARTLY),
    ({**NONE_HOLDS, "lns_growth": (0.9,) * 3}, PARTLY),
    ({**NONE_HOLDS, "pre_de": (0.4,) * 3}, PARTLY),
    ({**NONE_HOLDS, "lns_loss": (2.4,) * 3}, PARTLY),
])
def test_depth(kw, word):
    verdict = _depth(**kw)
    assert verdict.word == word, verdict.reason
    assert verdict.reason.count("yes") + verdict.reason.count("no") == 7


@pytest.mark.parametrize("sens_plain, sens_qk, logit_plain, logit_qk, word", [
    ([0.5, 0.6, 0.55], [0.2, 0.25, 0.22], [100.0, 120.0, 90.0], [5.0, 6.0, 5.5], HOLDS),
    ([0.36, 0.36], [0.3, 0.3], [10.1, 10.1], [5.0, 5.0], HOLDS),       # no spread: Δ 0.06 > 0.05; 10.1 > 2 × 5
    ([0.34, 0.34], [0.3, 0.3], [100.0, 100.0], [5.0, 5.0], PARTLY),    # Δ 0.04: within the margin
    ([0.4, 0.5, 0.6], [0.3, 0.4, 0.5], [100.0, 100.0], [5.0, 5.0], PARTLY),  # Δ 0.1, 2× pooled std 0.2: within
    ([0.3, 0.3], [0.5, 0.5], [100.0, 100.0], [5.0, 5.0], PARTLY),      # QK-norm the more sensitive one
    ([0.5, 0.5], [0.2, 0.2], [9.99, 9.99], [5.0, 5.0], PARTLY),        # just under 2×: not larger
    ([0.5, 0.5], [0.2, 0.2], [5.0, 30.0], [5.0, 5.0], PARTLY),         # log Δ 0.90 > log 2, within 2× pooled 0.90
    ([0.5, 0.5], [0.2, 0.2], [2e4, 1e5, 5.6e4], [28.0, 31.0, 34.0], HOLDS),  # heavy-tailed: std ≈ mean, logs apart
    ([0.5, 0.5], [0.2, 0.2], [-1.0, -2.0], [5.0, 5.0], PARTLY),        # logits ≤ 0 count as tiny
    ([0.5, 0.5], [0.2, 0.2], [math.inf, 100.0], [5.0, 5.0], HOLDS),    # an overflowed logit counts as infinite
    ([0.5, 0.5], [0.2, 0.2], [math.inf, 100.0], [math.nan, 5.0], PARTLY),  # ... but not beside another
    ([0.3, 0.3], [0.3, 0.3], [5.0, 5.0], [5.0, 5.0], NOT_HERE),
])
def test_qk_norm(sens_plain, sens_qk, logit_plain, logit_qk, word):
    assert v.qk_norm(sens_plain, sens_qk, logit_plain, logit_qk).word == word


@pytest.mark.parametrize("ln, sweep, word", [
    ([2.0, 2.01, 1.99], {0.1: [2.3, 2.31, 2.29], 0.5: [2.02, 2.03, 2.01], 2.0: [2.5, 2.4, 2.6]}, HOLDS),
    ([2.0, 2.0], {0.5: [2.04, 2.04], 1.0: [2.1, 2.1]}, HOLDS),     # no spread: best 0.04 above, worst 0.06 above it
    ([2.0, 2.0], {0.5: [2.06, 2.06], 1.0: [2.2, 2.2]}, PARTLY),    # best 0.06 above LayerNorm: does not match
    ([2.0, 2.0], {0.5: [1.8, 1.8], 1.0: [2.2, 2.2]}, HOLDS),       # better than LayerNorm counts as matching
    ([1.9, 2.1], {0.5: [2.0, 2.2], 1.0: [2.6, 2.6]}, HOLDS),       # 0.1 above, within 2× the pooled std 0.14
    ([2.0, 2.0], {0.5: [2.0, 2.0], 1.0: [2.04, 2.04]}, PARTLY),    # worst only 0.04 above the best: not sensitive
    ([2.0, 2.0], {0.5: [1.9, 2.1], 1.0: [2.1, 2.1]}, PARTLY),      # 0.1 apart, within 2× the pooled std 0.1
    ([2.0, 2.0], {0.5: [2.3, 2.3], 1.0: [2.32, 2.32]}, NOT_HERE),
])
def test_dyt_alpha(ln, sweep, word):
    assert v.dyt_alpha(ln, sweep).word == word


def test_dyt_alpha_names_the_best_and_the_worst_alpha_by_their_mean():
    reason = v.dyt_alpha([2.0, 2.0], {0.1: [2.5, 2.5], 0.5: [2.0, 2.1], 2.0: [1.9, 2.3]}).reason
    assert "best α₀ 0.5 matches" in reason and "worst 0.1" in reason
NAN, INF = float("nan"), float("inf")


def _sweep(*per_lr):
    """Experiment 3's outcomes: per lr (1e-3, 2e-3, …) the per-seed final val losses of Post-LN without and with
    warmup, then Pre-LN's; a non-finite loss is a diverged run."""
    out = {}
    for i, arms in enumerate(per_lr):
        for (p, w), losses in zip((("post", False), ("post", True), ("pre", False), ("pre", True)), arms):
            out[(p, w, (i + 1) * 1e-3)] = [(x, not math.isfinite(x)) for x in losses]
    return out


FLAT = ([2.0, 2.0], [2.0, 2.0])  # an arm pair whose cost is 0


@pytest.mark.parametrize("sweep, word", [
    (((2.5, 2.5, 2.5), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0)), HOLDS),
    (([2.06, 2.06], [2.0, 2.0], *FLAT), HOLDS),                       # cost 0.06 > 0.05, no spread
    (([2.04, 2.04], [2.0, 2.0], *FLAT), NOT_HERE),                    # cost 0.04 < 0.05
    (([2.3, 2.5, 2.7], [1.8, 2.0, 2.2], *FLAT), HOLDS),               # cost 0.5 > 2 × pooled std 0.2
    (([2.2, 2.5, 2.8], [1.7, 2.0, 2.3], *FLAT), NOT_HERE),            # cost 0.5 < 2 × pooled std 0.3
    (([2.5, 2.5], [2.0, 2.0], [2.5, 2.5], [2.0, 2.0]), PARTLY),       # Pre-LN needs warmup too
    (([2.5, 2.5], [2.0, 2.0], [2.06, 2.06], [2.0, 2.0]), PARTLY),     # Pre-LN's 0.06 > 0.05 (no spread)
    (([2.5, 2.5], [2.0, 2.0], [2.04, 2.04], [2.0, 2.0]), HOLDS),      # Pre-LN's 0.04 < 0.05
    (([2.5, 2.5], [2.0, 2.0], [2.2, 2.0, 2.4], [2.0, 1.8, 2.2]), HOLDS),  # Pre-LN's 0.2 < 2 × its std 0.2
    (([2.5, 2.5], [2.0, 2.0], [1.5, 1.5], [2.0, 2.0]), HOLDS),       # dropping warmup helps Pre-LN
    (([2.5], [2.0], [2.0], [2.0]), PARTLY),                           # one seed: the spread is unknown
    (([NAN, 2.5], [2.0, 2.0], *FLAT), HOLDS),                         # a divergence without warmup: +inf
    (([1e5, 1e5], [2.0, 2.0], *FLAT), HOLDS),
    (([NAN, NAN], [NAN, 2.0], *FLAT), NOT_HERE),                      # diverged with warmup: nothing to say
    (([2.5, 2.5], [2.0, 2.0], [2.0, 2.0], [NAN, 2.0]), PARTLY),       # Pre-LN's cost unknown
    (([NAN, NAN], [2.0, 2.0], [NAN, NAN], [2.0, 2.0]), PARTLY),       # both diverge without warmup
    (([2.0, 2.0], [2.0, 2.0], [2.3, 2.3], [2.0, 2.0]), NOT_HERE),     # only Pre-LN needs it
    (([1.9, 1.9], [2.0, 2.0], *FLAT), NOT_HERE),                      # dropping warmup helps Post-LN
])
def test_warmup_at_one_lr(sweep, word):
    verdict = v.warmup(_sweep(sweep))
    assert verdict.word == word, verdict.reason


def test_warmup_over_the_sweep():
    one_seed_needs = ([2.5], [2.0], [2.0], [2.0])
    seeded_holds = ([2.5, 2.5], [2.0, 2.0], *FLAT)
    assert v.warmup(_sweep((*FLAT, *FLAT), seeded_holds)).word == HOLDS          # at some lr of the sweep
    assert v.warmup(_sweep(one_seed_needs, (*FLAT, *FLAT))).word == PARTLY       # only where one seed ran
    assert v.warmup(_sweep((*FLAT, *FLAT), (*FLAT, *FLAT))).word == NOT_HERE
    assert "lr 0.002 (2 seeds: Post-LN +0.500" in v.warmup(_sweep(one_seed_needs, seeded_holds)).reason


def test_warmup_costs_and_spread():
    costs = v.warmup_costs({("post", False): [(2.5, False), (2.7, False)], ("post", True): [(2.0, False), (2.0, False)],
                            ("pre", False): [(9.0, True), (2.0, False)], ("pre", True): [(2.0, False)]})
    assert costs["post"] == pytest.approx((0.6, (0.02 / 2) ** 0.5))   # pooled: (0.02 + 0) / (1 + 1)
    assert costs["pre"] == (INF, 0.0)                                 # a diverged run counts as +inf, not in the std
