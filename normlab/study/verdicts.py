"""The verdict rules of the study's experiments: pure functions from measured numbers to a verdict word
("holds", "partly holds", "does not hold here") and the reason, each threshold named once here and stated
in the report's notes."""

from __future__ import annotations

import math
from typing import NamedTuple

HOLDS, PARTLY, NOT_HERE = "holds", "partly holds", "does not hold here"

#: Final validation losses within this many nats/char count as comparable quality (experiment 1).
COMPARABLE_NATS = 0.05
#: A speed-up counts ("faster") from this many percent of time saved: below it, a shared machine's noise.
FASTER_BY = 3.0
#: A difference counts when it exceeds this many seed standard deviations (sample std over the seeds).
SPREAD_K = 2.0
#: Experiment 2: a last/first-layer gradient ratio grows when its mean − SPREAD_K·std is above this.
GROWS_ABOVE = 1.0
#: |cos(h, 1)| counts as "at the random baseline" up to this multiple of sqrt(2/π)/sqrt(d) (experiment 4).
GEOMETRY_TOLERANCE = 3.0
#: Irreversibility (experiment 4): the fp64 formula's largest change, and the trained modules' relative one.
IRREVERSIBLE_FORMULA, IRREVERSIBLE_MODULE = 1e-12, 1e-9
#: Experiment 3: dropping warmup must cost Post-LN more than this many nats of validation loss (and SPREAD_K × the
#: seeds' std).
WARMUP_COST = 0.05
#: Experiment 6: exact conversion below this fp64 logit difference, and this fraction of the logit scale in fp32.
EXACT_FP64, EXACT_FP32_REL = 1e-9, 1e-3


#: Experiment 7: the norm layers are "a tiny fraction" of a training step below this percent.
TINY_SHARE = 10.0


class Verdict(NamedTuple):
    word: str
    reason: str


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _both(a: bool, b: bool, what_a: str, what_b: str) -> Verdict:
    """holds when both parts hold, partly when one does."""
    parts = f"{what_a}: {_yes(a)}; {what_b}: {_yes(b)}"
    return Verdict(HOLDS if a and b else PARTLY if a or b else NOT_HERE, parts)


def loss_and_speed(ln_val: list[float], rms_val: list[float], isolated_savings_pct: list[float]) -> Verdict:
    """Experiment 1: per-seed final val losses of LayerNorm and RMSNorm, and per-round percent of norm-layer
    time RMSNorm saves in the isolated (interleaved) measurement. Quality is comparable unless the mean
    difference exceeds both COMPARABLE_NATS and SPREAD_K × the pooled seed std; faster when the saving's
    mean − SPREAD_K·std ≥ FASTER_BY."""
    delta = mean_std(rms_val)[0] - mean_std(ln_val)[0]
    spread = pooled_std(ln_val, rms_val)
    comparable = not beyond(delta, COMPARABLE_NATS, spread)
    saving, saving_std = mean_std(isolated_savings_pct)
    faster = saving - SPREAD_K * saving_std >= FASTER_BY
    return _both(comparable, faster,
                 f"comparable quality (Δ {delta:+.3f} vs margin {COMPARABLE_NATS:g}, {SPREAD_K:g}× pooled std "
                 f"{SPREAD_K * spread:.3f})",
                 f"faster ({saving:.1f} − {SPREAD_K:g}·{saving_std:.1f} ≥ {FASTER_BY:g}% saved)")


def pooled_std(a: list[float], b: list[float]) -> float:
    """The pooled sample std of two groups (0 when neither has two values)."""
    dof = len(a) + len(b) - 2
    if dof <= 0:
        return 0.0
    (_, sa), (_, sb) = mean_std(a), mean_std(b)
    return math.sqrt(((len(a) - 1) * sa ** 2 + (len(b) - 1) * sb ** 2) / dof)


def beyond(delta: float, margin: float, spread: float) -> bool:
    """A difference counts when it exceeds both a practical ``margin`` and SPREAD_K × the seeds' ``spread``."""
    return abs(delta) > margin and abs(delta) > SPREAD_K * spread


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def grad_at_init(ratios: dict[tuple[int, str], list[float]]) -> Verdict:
    """Experiment 2: ``(depth, "post" | "pre") → per-seed last/first-layer gradient ratios`` in the paper's
    setting. Post-LN grows when, at the deepest depth, mean − SPREAD_K·std > GROWS_ABOVE; Pre-LN does not
    grow when that is false at every depth. Holds when both; partly when one."""
    depths = sorted({d for d, _ in ratios})
    stats = {k: mean_std(v) for k, v in ratios.items()}

    def grows(key) -> bool:
        mean, std = stats[key]
        return mean - SPREAD_K * std > GROWS_ABOVE

    post_grows = grows((depths[-1], "post"))
    pre_flat = not any(grows((d, "pre")) for d in depths)
    seeds = min(len(v) for v in ratios.values())
    reason = (f"Post-LN at {depths[-1]} layers grows (mean − {SPREAD_K:g}·std > {GROWS_ABOVE:g}, {seeds} seeds): "
              f"{_yes(post_grows)}; Pre-LN grows at no depth: {_yes(pre_flat)}")
    return Verdict(HOLDS if post_grows and pre_flat else PARTLY if post_grows or pre_flat else NOT_HERE, reason)


#: Experiment 3: the spread of an arm needs this many seeds; with fewer, a cost can only make the claim partly hold.
WARMUP_MIN_SEEDS = 2


def warmup_costs(runs: dict[tuple[str, bool], list[tuple[float, bool]]]
                 ) -> dict[str, tuple[float, float]]:
    """Experiment 3 at one learning rate: ``placement → (cost, spread)`` of dropping warmup, from ``(placement,
    warmup) → per seed (final val loss, diverged)``. The cost is the mean loss without warmup minus the mean with
    it, a diverged run counting as an infinite loss: +inf when a run without warmup diverged, NaN when one with
    warmup did (then nothing can be said). The spread is the two arms' pooled seed std over their finite losses."""
    out = {}
    for placement in sorted({p for p, _ in runs}):
        arms = [[math.inf if d or not math.isfinite(v) else v for v, d in runs[(placement, w)]] for w in (False, True)]
        without, with_ = (mean_std(a)[0] for a in arms)
        cost = math.nan if math.isinf(with_) else without - with_
        out[placement] = (cost, _pooled([[v for v in a if math.isfinite(v)] for a in arms]))
    return out


def _pooled(groups: list[list[float]]) -> float:
    """Pooled sample std of ``groups`` (those with fewer than two values add nothing; 0 when none has two)."""
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(sum((len(g) - 1) * mean_std(g)[1] ** 2 for g in groups if len(g) > 1) / dof) if dof else 0.0


def costs_more(cost: float, spread: float) -> bool:
    """Dropping warmup costs more than WARMUP_COST and more than SPREAD_K × the seeds' spread (+inf: always)."""
    return cost > WARMUP_COST and cost > SPREAD_K * spread


def needs_warmup(costs: dict[str, tuple[float, float]]) -> tuple[bool, bool]:
    """``(Post-LN needs warmup, Pre-LN does not)`` at one lr from :func:`warmup_costs`: Post-LN's cost is more
    (:func:`costs_more`); Pre-LN's is known (its run with warmup did not diverge) and not more."""
    (post, post_sd), (pre, pre_sd) = costs["post"], costs["pre"]
    return costs_more(post, post_sd), not math.isnan(pre) and not costs_more(pre, pre_sd)


def warmup(runs: dict[tuple[str, bool, float], list[tuple[float, bool]]]) -> Verdict:
    """Experiment 3: ``(placement, warmup, lr) → per seed (final val loss, diverged)`` over the sweep. At a
    learning rate, Post-LN needs warmup and Pre-LN does not as :func:`needs_warmup` says. Holds when both at some lr
    whose every arm
    has WARMUP_MIN_SEEDS seeds; partly when Post-LN needs warmup at some lr (Pre-LN too, or too few seeds);
    does not hold otherwise."""
    lrs = sorted({lr for _, _, lr in runs})
    found: dict[str, list[str]] = {HOLDS: [], PARTLY: []}
    for lr in lrs:
        at = {(p, w): v for (p, w, x), v in runs.items() if x == lr}
        costs = warmup_costs(at)
        post_needs, pre_fine = needs_warmup(costs)
        if not post_needs:
            continue
        (post, post_sd), (pre, pre_sd) = costs["post"], costs["pre"]
        seeds = min(len(v) for v in at.values())
        word = HOLDS if pre_fine and seeds >= WARMUP_MIN_SEEDS else PARTLY
        found[word].append(f"lr {lr:g} ({seeds} seed{'s' * (seeds > 1)}: Post-LN {_nats(post, post_sd)}, "
                           f"Pre-LN {_nats(pre, pre_sd)})")
    if found[HOLDS]:
        return Verdict(HOLDS, "only Post-LN needs warmup at " + "; ".join(found[HOLDS]))
    if found[PARTLY]:
        return Verdict(PARTLY, "Post-LN needs warmup, but Pre-LN too or too few seeds, at " + "; ".join(found[PARTLY]))
    return Verdict(NOT_HERE, f"dropping warmup costs Post-LN no more than {WARMUP_COST:g} nats and "
                             f"{SPREAD_K:g}× the seeds' std at any lr of {', '.join(f'{x:g}' for x in lrs)}")


def _nats(cost: float, spread: float) -> str:
    if math.isnan(cost):
        return "unknown (diverged with warmup too)"
    return "diverged without warmup" if math.isinf(cost) else f"{cost:+.3f} ± {spread:.3f}"


def geometry(ln_ratios: list[float], irreversibility: list[tuple[float, float]]) -> Verdict:
    """Experiment 4: each trained LayerNorm model's mean |cos(h, 1)| over the random baseline, and per model
    (the fp64 formula's largest change, the trained modules' largest relative change) under h → αh + c·1."""
    at_baseline = max(ln_ratios) <= GEOMETRY_TOLERANCE
    irreversible = all(f < IRREVERSIBLE_FORMULA and m < IRREVERSIBLE_MODULE for f, m in irreversibility)
    return _both(at_baseline, irreversible, f"at the baseline (≤ {GEOMETRY_TOLERANCE:g}×)", "irreversible")


def invariances(matches: list[bool]) -> Verdict:
    """Experiment 5: whether each measured cell agrees with the paper's Table 1."""
    return Verdict(HOLDS if all(matches) else NOT_HERE, f"{sum(matches)}/{len(matches)} cells match")


def conversion(d32: float, d64: float, logit_scale: float, saving_fwd_pct: float, saving_fwd_bwd_pct: float) -> Verdict:
    """Experiment 6: max |logit difference| of the converted model in fp32 and fp64 (``logit_scale`` the
    largest |logit|), and the percent of time it saves, forward and forward+backward."""
    exact = d64 < EXACT_FP64 and d32 < EXACT_FP32_REL * max(1.0, logit_scale)
    faster = saving_fwd_pct >= FASTER_BY and saving_fwd_bwd_pct >= FASTER_BY
    return _both(exact, faster, "exact", f"faster (≥ {FASTER_BY:g}% in both)")


def norm_share(shares: dict[int, list[float]], savings: dict[int, list[float]]) -> Verdict:
    """Experiment 7: ``width → per-repeat percent`` of a training step spent in the norm layers (LayerNorm's
    step against the same model with identity norms) and saved by RMSNorm. "Tiny" holds at the widest width
    when its share's mean + SPREAD_K·std is below TINY_SHARE; RMSNorm's saving stays within the share (the
    end-to-end bound) when its mean − SPREAD_K·std is not above the share's mean + SPREAD_K·std at any width."""
    widest = max(shares)
    share_mean, share_std = mean_std(shares[widest])
    tiny = share_mean + SPREAD_K * share_std < TINY_SHARE

    def within(d: int) -> bool:
        (sm, ss), (vm, vs) = mean_std(shares[d]), mean_std(savings[d])
        return vm - SPREAD_K * vs <= sm + SPREAD_K * ss

    bounded = all(within(d) for d in shares)
    reason = (f"share at d={widest} {share_mean:.1f} ± {share_std:.1f}% (< {TINY_SHARE:g}% beyond the spread: "
              f"{_yes(tiny)}); RMSNorm's saving within the share at every width: {_yes(bounded)}")
    return Verdict(HOLDS if tiny and bounded else PARTLY if tiny or bounded else NOT_HERE, reason)


#: Experiment 8: RMSNorm's gradient norm counts as higher when the ratio's mean − SPREAD_K·std exceeds this.
HIGHER_ABOVE = 1.0


def grad_trajectories(early: list[float], late: list[float]) -> Verdict:
    """Experiment 8: per-seed ratios of RMSNorm's to LayerNorm's total gradient norm, averaged over the early
    and the late part of training. Higher when the early ratio's mean − SPREAD_K·std > HIGHER_ABOVE; especially
    early when the early ratio's mean exceeds the late one's by more than SPREAD_K × their pooled std. Holds
    when both; partly when higher only."""
    (em, es), (lm, _) = mean_std(early), mean_std(late)
    higher = em - SPREAD_K * es > HIGHER_ABOVE
    early_more = em - lm > SPREAD_K * pooled_std(early, late)
    reason = (f"early ratio {em:.2f} ± {es:.2f} higher than 1 beyond {SPREAD_K:g}·std: {_yes(higher)}; "
              f"early above late ({lm:.2f}) beyond the spread: {_yes(early_more)}")
    return Verdict(HOLDS if higher and early_more else PARTLY if higher else NOT_HERE, reason)


#: Experiment 9: BatchNorm's cost must exceed LayerNorm's by more than this many nats of validation loss (the
#: margin within which experiment 1 calls two losses comparable).
BATCHNORM_WORSE_NATS = COMPARABLE_NATS


def worse(bn: list[float], ln: list[float]) -> tuple[bool, str]:
    """Whether BatchNorm's per-seed costs ``bn`` exceed LayerNorm's ``ln`` beyond BATCHNORM_WORSE_NATS and
    SPREAD_K × their pooled std, and a description. A non-finite BatchNorm cost (a diverged run) against finite
    LayerNorm ones counts as worse; a non-finite LayerNorm cost leaves nothing to compare."""
    if not all(map(math.isfinite, ln)):
        return False, "LayerNorm's is not finite"
    if not all(map(math.isfinite, bn)):
        return True, "BatchNorm's is not finite"
    delta, spread = mean_std(bn)[0] - mean_std(ln)[0], pooled_std(bn, ln)
    return delta > 0 and beyond(delta, BATCHNORM_WORSE_NATS, spread), f"Δ {delta:+.3f} vs {SPREAD_K:g}·{spread:.3f}"


def batch_vs_layer(batch_cost: tuple[list[float], list[float]], train_eval_gap: tuple[list[float], list[float]],
                   length_change: tuple[list[float], list[float]]) -> Verdict:
    """Experiment 9: per-seed ``(BatchNorm, LayerNorm)`` values of the claim's three parts, in nats:
    (a) the val loss at the smallest batch size minus at the largest; (b) the loss with batch statistics
    (train mode) minus with running statistics (eval mode); (c) the loss at the shorter context minus at the
    same positions of the trained one (batch statistics). A part shows BatchNorm worse when its cost — (a)
    signed, (b) and (c) as magnitudes — exceeds LayerNorm's as :func:`worse` says. Holds when all three parts
    do; partly when one or two."""
    magnitude = lambda values: [abs(v) for v in values]
    parts = {"(a) batch-size cost": batch_cost,
             "(b) |train − eval mode|": tuple(map(magnitude, train_eval_gap)),
             "(c) |shorter context|": tuple(map(magnitude, length_change))}
    judged = {name: worse(*pair) for name, pair in parts.items()}
    n = sum(w for w, _ in judged.values())
    reason = "; ".join(f"{name} worse: {_yes(w)} ({why})" for name, (w, why) in judged.items())
    return Verdict(HOLDS if n == len(parts) else PARTLY if n else NOT_HERE, reason)
#: Experiment 10: Pre-LN's deep layers are "cursed" when their mean angular change, over the early layers',
#: stays below this ratio beyond the spread (mean + SPREAD_K·std): the deep layers turn their input less than
#: half as much as the early ones.
DEEP_BELOW = 0.5


def _below(a: list[float], b: list[float], margin: float = 0.0) -> tuple[bool, float]:
    """Whether ``a``'s mean lies below ``b``'s by more than ``margin`` and SPREAD_K × their pooled std;
    and the difference of the means ``b − a``."""
    delta = mean_std(b)[0] - mean_std(a)[0]
    return delta > margin and delta > SPREAD_K * pooled_std(a, b), delta


def depth(growth: dict[str, list[float]], deep_early: dict[str, list[float]],
          val_loss: dict[str, list[float]]) -> Verdict:
    """Experiment 10, from per-seed numbers of the trained models per placement (``pre``, ``sandwich`` =
    Peri-LN, ``lnscaling``): the residual stream's last/first-layer RMS growth, the deep/early ratio of the
    layers' angular change, and the final val loss. Seven checks in three parts:

    1. stream: Pre-LN's growth has mean − SPREAD_K·std > GROWS_ABOVE; Peri-LN's and LayerNorm Scaling's
       growth each lie below Pre-LN's by more than SPREAD_K × the pooled std;
    2. curse of depth: Pre-LN's deep/early ratio has mean + SPREAD_K·std < DEEP_BELOW; LayerNorm Scaling's
       lies above Pre-LN's by more than SPREAD_K × the pooled std;
    3. loss: Peri-LN's and LayerNorm Scaling's final val loss each lie below Pre-LN's by more than
       COMPARABLE_NATS and SPREAD_K × the pooled std.

    Holds when all seven checks hold, partly when some do, not here when none does."""
    pre_mean, pre_std = mean_std(growth["pre"])
    pre_grows = pre_mean - SPREAD_K * pre_std > GROWS_ABOVE
    peri_smaller, _ = _below(growth["sandwich"], growth["pre"])
    lns_smaller, _ = _below(growth["lnscaling"], growth["pre"])
    cursed_mean, cursed_std = mean_std(deep_early["pre"])
    cursed = cursed_mean + SPREAD_K * cursed_std < DEEP_BELOW
    lns_raises, _ = _below(deep_early["pre"], deep_early["lnscaling"])
    peri_lower, peri_gain = _below(val_loss["sandwich"], val_loss["pre"], COMPARABLE_NATS)
    lns_lower, lns_gain = _below(val_loss["lnscaling"], val_loss["pre"], COMPARABLE_NATS)
    checks = (pre_grows, peri_smaller, lns_smaller, cursed, lns_raises, peri_lower, lns_lower)
    reason = (f"{sum(checks)}/{len(checks)} checks hold. (1) stream: Pre-LN grows {pre_mean:.2f} ± {pre_std:.2f} "
              f"(> {GROWS_ABOVE:g} beyond the spread: {_yes(pre_grows)}), Peri-LN smaller: {_yes(peri_smaller)}, "
              f"LN-Scaling smaller: {_yes(lns_smaller)}; (2) curse of depth: Pre-LN deep/early {cursed_mean:.2f} ± "
              f"{cursed_std:.2f} (< {DEEP_BELOW:g} beyond the spread: {_yes(cursed)}), LN-Scaling raises it: "
              f"{_yes(lns_raises)}; (3) loss below Pre-LN's beyond the spread and {COMPARABLE_NATS:g} nats: Peri-LN "
              f"({peri_gain:+.3f}) {_yes(peri_lower)}, LN-Scaling ({lns_gain:+.3f}) {_yes(lns_lower)}")
    return Verdict(HOLDS if all(checks) else PARTLY if any(checks) else NOT_HERE, reason)


#: Experiment 11: the largest attention logit without QK-norm counts as larger from this multiple of QK-norm's.
LOGIT_FACTOR = 2.0


def _logit_larger(plain: list[float], qk: list[float]) -> bool:
    """Per-seed largest logits, compared on a log scale (they grow by orders of magnitude, and their spread with
    them): ``plain``'s mean log above ``qk``'s by more than log(LOGIT_FACTOR) and SPREAD_K × the pooled std of the
    logs. A non-finite logit counts as infinite (larger than any finite one, nothing to say beside another); a
    logit ≤ 0 counts as tiny."""
    if not all(math.isfinite(v) for v in qk):
        return False
    if not all(math.isfinite(v) for v in plain):
        return True
    log_plain, log_qk = ([math.log(max(v, 1e-12)) for v in vs] for vs in (plain, qk))
    delta = mean_std(log_plain)[0] - mean_std(log_qk)[0]
    return delta > math.log(LOGIT_FACTOR) and delta > SPREAD_K * pooled_std(log_plain, log_qk)


def qk_norm(sens_plain: list[float], sens_qk: list[float], logit_plain: list[float], logit_qk: list[float]
            ) -> Verdict:
    """Experiment 11: per-seed LR sensitivity (nats) without and with QK-norm, and per-seed largest attention
    logit at the highest learning rate. Less sensitive when QK-norm's mean is lower by more than COMPARABLE_NATS
    and SPREAD_K × the pooled std; larger logits when :func:`_logit_larger`. Holds when both; partly when one."""
    delta = mean_std(sens_plain)[0] - mean_std(sens_qk)[0]
    spread = pooled_std(sens_plain, sens_qk)
    less_sensitive = delta > 0 and beyond(delta, COMPARABLE_NATS, spread)
    return _both(less_sensitive, _logit_larger(logit_plain, logit_qk),
                 f"QK-norm less LR-sensitive (Δ {delta:+.3f} vs margin {COMPARABLE_NATS:g}, {SPREAD_K:g}× pooled std "
                 f"{SPREAD_K * spread:.3f})",
                 f"larger logits without QK-norm at the highest lr (> {LOGIT_FACTOR:g}× and beyond the spread of the "
                 "logs)")


def dyt_alpha(layernorm: list[float], per_alpha: dict[float, list[float]]) -> Verdict:
    """Experiment 12: per-seed final val losses of LayerNorm and of DyT at each α₀. Matches when the best α₀'s
    (lowest mean) loss is not above LayerNorm's by more than COMPARABLE_NATS and SPREAD_K × their pooled std;
    sensitive when the worst α₀'s mean exceeds the best's by more than both. Holds when both; partly when one."""
    by_mean = sorted(per_alpha, key=lambda a: mean_std(per_alpha[a])[0])
    best, worst = per_alpha[by_mean[0]], per_alpha[by_mean[-1]]
    gap = mean_std(best)[0] - mean_std(layernorm)[0]
    gap_spread = pooled_std(best, layernorm)
    matches = not (gap > 0 and beyond(gap, COMPARABLE_NATS, gap_spread))
    sway = mean_std(worst)[0] - mean_std(best)[0]
    sway_spread = pooled_std(worst, best)
    return _both(matches, beyond(sway, COMPARABLE_NATS, sway_spread),
                 f"best α₀ {by_mean[0]:g} matches LayerNorm (Δ {gap:+.3f} vs margin {COMPARABLE_NATS:g}, "
                 f"{SPREAD_K:g}× pooled std {SPREAD_K * gap_spread:.3f})",
                 f"sensitive to α₀ (worst {by_mean[-1]:g} − best {sway:+.3f} vs margin {COMPARABLE_NATS:g}, "
                 f"{SPREAD_K:g}× pooled std {SPREAD_K * sway_spread:.3f})")
