"""Experiment 3: warmup sensitivity, Post-LN vs Pre-LN over a learning-rate sweep, in the paper's setting
(Xiong et al. 2020)."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, band, below_paper, pm, run_config, unigram_entropy
from normlab.study.experiments.grad_init import PAPER_SETTING, SETTINGS
from normlab.study.experiments.grad_trajectories import smooth
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult
from normlab.study.verdicts import Verdict

NUMBER, TITLE, TRAINS = 3, "Warmup sensitivity over learning rates, Post-LN vs Pre-LN", True
PLACEMENTS = ("post", "pre")
#: ``(placement, warmup, lr)``: one arm of the experiment, trained at one or more seeds.
Arm = tuple[str, bool, float]
#: A final val loss within this many nats of the unigram entropy counts as "still on the plateau".
PLATEAU_NATS = 0.1
CLAIM = ("Post-LN needs a learning-rate warmup: without it, at a high learning rate (the paper's 5e-4 and 1e-3 with "
         "Adam, β₂ = 0.98), it trains much worse; Pre-LN trains well without warmup (Xiong et al. 2020, *On Layer "
         "Normalization in the Transformer Architecture*).")


def warmup_run_config(cfg: StudyConfig, corpus: Corpus, placement: str, warm: bool, lr: float, seed: int) -> RunConfig:
    """One run of experiment 3: the paper's LayerNorm model (Xavier init, ReLU FFN, no residual scaling) at
    ``cfg.warmup_layers`` × ``cfg.warmup_d_model``; Adam (no weight decay) with β₂ ``cfg.warmup_beta2``; a linear
    warmup of ``cfg.warmup_warmup`` steps or none, then cosine decay."""
    return run_config(cfg, corpus, f"layernorm-{placement}", model=SETTINGS[PAPER_SETTING](placement),
                      n_layer=cfg.warmup_layers, d_model=cfg.warmup_d_model, steps=cfg.warmup_steps, lr=lr,
                      min_lr=lr * cfg.min_lr_ratio, warmup=cfg.warmup_warmup if warm else 0, beta2=cfg.warmup_beta2,
                      weight_decay=0.0, grad_clip=cfg.warmup_grad_clip, seed=seed,
                      eval_interval=max(1, cfg.warmup_steps // 5))


def arm_name(placement: str, warm: bool) -> str:
    return f"{placement}-LN-{'warmup' if warm else 'nowarmup'}"


def train_arms(ctx: Context, lrs: list[float], seeds: list[int]) -> dict[Arm, list[RunResult]]:
    """Every placement, with and without warmup, at every lr of ``lrs`` and seed of ``seeds``."""
    runs: dict[Arm, list[RunResult]] = {}
    for lr in lrs:
        for placement in PLACEMENTS:
            for warm in (True, False):
                name = arm_name(placement, warm)
                runs[(placement, warm, lr)] = [
                    ctx.train(f"{name} lr {lr:g}", f"warmup/lr-{lr:g}/{name}/seed-{s}",
                              warmup_run_config(ctx.cfg, ctx.corpus, placement, warm, lr, s), record_activations=False)
                    for s in seeds]
    return runs


def outcomes(runs: dict[Arm, list[RunResult]]) -> dict[Arm, list[tuple[float, bool]]]:
    """Per arm and seed, (final val loss, diverged): what the verdict reads."""
    return {k: [(r.final["final_val_loss"], r.final["diverged"]) for r in rs] for k, rs in runs.items()}


def edge_score(post: float, pre: float) -> float:
    """How much more dropping warmup costs Post-LN than Pre-LN; -inf where a run with warmup diverged,
    0 where both diverged without it."""
    if math.isnan(post) or math.isnan(pre):
        return -math.inf
    return 0.0 if math.isinf(post) and math.isinf(pre) else post - pre


def edge_lr(results: dict[Arm, list[tuple[float, bool]]]) -> float:
    """The lr of the sweep where its seeds show the claim best: first the lrs where only Post-LN needs warmup
    (:func:`verdicts.needs_warmup`), then by how much more dropping warmup costs Post-LN than Pre-LN; the lowest
    lr on a tie."""
    def key(lr: float) -> tuple[bool, float]:
        costs = verdicts.warmup_costs({(p, w): v for (p, w, x), v in results.items() if x == lr})
        return all(verdicts.needs_warmup(costs)), edge_score(costs["post"][0], costs["pre"][0])

    return max(sorted({lr for _, _, lr in results}), key=key)


def measure_warmup(ctx: Context) -> tuple[dict[Arm, list[RunResult]], float]:
    """The sweep at the first ``warmup_sweep_seeds`` seeds, then the rest of the seeds at its edge lr:
    ``(arm → runs, one per seed, edge lr)`` (every rank trains)."""
    cfg = ctx.cfg
    sweep_seeds, rest = ctx.seeds[:cfg.warmup_sweep_seeds], ctx.seeds[cfg.warmup_sweep_seeds:]
    runs = train_arms(ctx, cfg.warmup_lrs, sweep_seeds)
    edge = edge_lr(outcomes(runs))
    for arm, more in train_arms(ctx, [edge], rest).items():
        runs[arm] = runs[arm] + more
    return runs, edge


def _finite_losses(rs: list[RunResult]) -> list[float]:
    return [r.final["final_val_loss"] for r in rs if not r.final["diverged"]
            and math.isfinite(r.final["final_val_loss"])]


def _loss_cell(rs: list[RunResult]) -> str:
    finite = _finite_losses(rs)
    cell = pm(finite) if finite else "—"
    diverged = len(rs) - len(finite)
    return cell + (f" ({diverged} diverged)" if diverged else "")


def _cost_cell(cost: float, spread: float) -> str:
    if math.isnan(cost):
        return "unknown (diverged with warmup)"
    return "+inf (diverged without)" if math.isinf(cost) else f"{cost:+.3f} (pooled std {spread:.2g})"


def render_warmup(cfg: StudyConfig, corpus: Corpus, out_dir: Path, runs: dict[Arm, list[RunResult]], edge: float,
                  verdict: Verdict) -> Experiment:
    lrs = sorted({lr for _, _, lr in runs})
    results = outcomes(runs)
    costs = {lr: verdicts.warmup_costs({(p, w): v for (p, w, x), v in results.items() if x == lr}) for lr in lrs}
    unigram = unigram_entropy(corpus)
    rows = [[f"{lr:g}" + (" (edge)" if lr == edge and len(lrs) > 1 else ""), f"{p}-LN", len(runs[(p, True, lr)]),
             _loss_cell(runs[(p, True, lr)]), _loss_cell(runs[(p, False, lr)]), _cost_cell(*costs[lr][p])]
            for lr in lrs for p in PLACEMENTS]

    fig, (ax_lr, ax_curve) = new_figure(2, 6, 4)
    k = max(1, cfg.warmup_steps // 30)  # the training curves' moving average
    for i, (p, warm) in enumerate((p, w) for p in PLACEMENTS for w in (True, False)):
        dodge = 1.04 ** (i - 1.5)  # the four curves' error bars side by side on the log axis
        style = dict(ls="-" if warm else "--", marker="o" if p == "post" else "s", ms=4)
        label = f"{p}-LN, {'warmup' if warm else 'no warmup'}"
        means, stds, crashed = [], [], []
        for lr in lrs:
            finite = _finite_losses(runs[(p, warm, lr)])
            mean, std = verdicts.mean_std(finite) if finite else (math.nan, 0.0)
            means.append(mean)
            stds.append(std)
            if len(finite) < len(runs[(p, warm, lr)]):
                crashed.append(lr)
        line = ax_lr.errorbar([lr * dodge for lr in lrs], means, yerr=stds, capsize=3, label=label, **style)[0]
        if crashed:  # a diverged run has no finite loss to draw: an × on the unigram line marks it
            ax_lr.plot([lr * dodge for lr in crashed], [unigram] * len(crashed), "x", ms=9, color=line.get_color())
        per_seed = [smooth(r.train_curve()[1], k) for r in runs[(p, warm, edge)]]
        band(ax_curve, range(1, len(per_seed[0]) + 1), per_seed, label, ls=style["ls"], lw=1.2)
    seeds_at_edge = len(runs[("post", True, edge)])
    for ax in (ax_lr, ax_curve):
        ax.axhline(unigram, color="k", ls=":", lw=1, label=f"unigram entropy {unigram:.2f}")
        ax.legend(fontsize=7)
    ax_lr.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss",
              title="final val loss (bars: ± 1 std over seeds; ×: diverged)")
    ax_curve.set(xlabel="step", ylabel="train loss",
                 title=f"lr {edge:g}: mean ± 1 std over {seeds_at_edge} seeds (smoothed over {k})")
    ax_curve.set_ylim(top=min(ax_curve.get_ylim()[1], unigram + 1.5))
    plot = save_figure(fig, out_dir / "exp3_warmup.png")

    post, post_sd = costs[edge]["post"]
    pre, pre_sd = costs[edge]["pre"]
    measured = (f"at lr {edge:g} ({seeds_at_edge} seeds, {cfg.warmup_steps} steps), dropping warmup changes the final "
                f"val loss of Post-LN by {_cost_cell(post, post_sd)} and of Pre-LN by {_cost_cell(pre, pre_sd)}; "
                f"lrs swept: {', '.join(f'{lr:g}' for lr in lrs)}")
    sweep_seeds = min(cfg.warmup_sweep_seeds, cfg.seeds)
    notes = [
        (f"The paper's setting (as experiment 2's): LayerNorm Post-LN and Pre-LN, {cfg.warmup_layers} layers, "
         f"d={cfg.warmup_d_model}, {cfg.n_head} heads, context {cfg.block_size}, batch {cfg.batch_size}; "
         "Xavier-uniform init, ReLU FFN, no extra scaling of the residual branches, a final LayerNorm for Pre-LN "
         f"only. Adam (β₁ {cfg.beta1:g}, β₂ {cfg.warmup_beta2:g}, no weight decay), gradient clipping "
         f"{cfg.warmup_grad_clip:g}" + (" (none)" if cfg.warmup_grad_clip == 0 else "") +
         f"; {cfg.warmup_steps} steps, a linear warmup of {cfg.warmup_warmup} steps or none, then cosine decay "
         f"to {cfg.min_lr_ratio:g}× the peak (the paper decays by the inverse square root)."),
        (f"Every lr of the sweep at {sweep_seeds} seed(s); the edge lr at all {cfg.seeds} seeds: among the lrs where "
         "those seeds show only Post-LN needing warmup (the verdict's test below), else among all, the one where "
         "dropping warmup costs Post-LN the most beyond what it costs Pre-LN, the lowest on a tie. The seeds after "
         f"the first {sweep_seeds} are an independent check of that choice."),
        (f"Holds when at some lr whose every arm has ≥ {verdicts.WARMUP_MIN_SEEDS} seeds dropping warmup raises "
         f"Post-LN's mean final val loss by more than {verdicts.WARMUP_COST:g} nats and more than "
         f"{verdicts.SPREAD_K:g}× the two arms' pooled seed std, while it does not raise Pre-LN's by that much (and "
         "Pre-LN's run with warmup did not diverge); partly when Post-LN's cost passes that test at some lr but "
         "Pre-LN's does too, or with fewer seeds; does not hold otherwise. A diverged run (a non-finite loss, or a "
         "final val loss more than 1 nat above the untrained model's) counts as an infinite loss. "
         f"{verdict.reason}."),
        (f"Scale: the paper trains 6-layer d=512 translation models for many thousands of steps (its Post-LN baseline "
         f"warms up for 4000); here {cfg.warmup_layers} layers, d={cfg.warmup_d_model}, character-level help text, "
         f"{cfg.warmup_steps} steps. The paper's mechanism — Post-LN's gradients near the output are large at "
         "initialization, so Adam's first full-size steps disturb them — grows with the width, so a narrower model may "
         "need a higher lr to show it (hence a sweep from the paper's lr up). A short run measures how fast a model "
         "leaves the plateau as much as where it ends: a run still on it might leave it later."),
    ]
    stuck = [f"{p}-LN {'with' if w else 'without'} warmup at lr {lr:g}" for (p, w, lr), rs in runs.items()
             if (f := _finite_losses(rs)) and verdicts.mean_std(f)[0] > unigram - PLATEAU_NATS]
    if stuck:
        notes.append(f"Still on the unigram plateau (mean final val loss > {unigram - PLATEAU_NATS:.2f}, i.e. within "
                     f"{PLATEAU_NATS:g} nats of the entropy {unigram:.2f} of predicting character frequencies without "
                     f"context): {', '.join(stuck)}."
                     + (" Every run is: this verdict measures the budget, not the claim (the full profile tests it)."
                        if len(stuck) == len(runs) else ""))
    return Experiment(NUMBER, TITLE, CLAIM, measured, verdict.word,
                      ["lr", "placement", "seeds", "final val loss, warmup", "final val loss, no warmup",
                       "cost of dropping warmup"], rows, plot, notes,
                      data={"edge_lr": edge, "runs": {f"{p}|{w}|{lr:g}": v for (p, w, lr), v in results.items()}},
                      below_paper=below_paper({"layers": (cfg.warmup_layers, 6), "d": (cfg.warmup_d_model, 512),
                                               "steps": (cfg.warmup_steps, 4000)}))


def run(ctx: Context) -> Experiment | None:
    runs, edge = measure_warmup(ctx)
    if not ctx.info.is_main:  # the other ranks train with rank 0, which alone writes the plot and the verdict
        return None
    return render_warmup(ctx.cfg, ctx.corpus, ctx.out_dir, runs, edge, verdicts.warmup(outcomes(runs)))
