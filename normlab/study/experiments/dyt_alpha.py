"""Experiment 12: DyT's α₀ (Zhu et al. 2025, *Transformers without Normalization*): a sweep of DyT's initial
α against LayerNorm (both Pre-norm), over seeds; final val loss, and how much of the last DyT's input lies in
tanh's saturated region after training."""

from __future__ import annotations

from pathlib import Path

import torch

from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import (
    Context,
    below_paper,
    capped_loss,
    dyt_saturations,
    pm,
    run_config,
    unigram_entropy,
)
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult
from normlab.study.verdicts import COMPARABLE_NATS, SPREAD_K, Verdict

NUMBER, TITLE, TRAINS = 12, "DyT's α₀ against LayerNorm", True
DYT, REFERENCE = "dyt-pre", "layernorm-pre"
#: tanh counts as saturated where |α·x| exceeds this (tanh(2) ≈ 0.96, its derivative ≈ 0.07).
SATURATED_AT = 2.0
CLAIM = ("DyT, y = γ·tanh(α·x) + β, matches LayerNorm when its α₀ is tuned, and training is sensitive to α₀ "
         "(Zhu et al. 2025, *Transformers without Normalization*: α₀ = 0.5 by default, tuned for LLMs, smaller "
         "for wider models).")


def dyt_run_config(cfg: StudyConfig, corpus: Corpus, alpha: float | None, seed: int) -> RunConfig:
    """One run: DyT with ``alpha`` as α₀, or LayerNorm for ``None``, at the experiment's depth and width."""
    variant, model = (REFERENCE, {}) if alpha is None else (DYT, {"dyt_alpha": alpha})
    return run_config(cfg, corpus, variant, model=model, n_layer=cfg.dyt_n_layer or cfg.n_layer,
                      d_model=cfg.dyt_d_model or cfg.d_model, steps=cfg.dyt_steps, warmup=cfg.dyt_steps // 10,
                      seed=seed, eval_interval=max(1, cfg.dyt_steps // 4))


def measure_run(run: RunResult, corpus: Corpus, cfg: StudyConfig) -> dict:
    """A trained run's capped final val loss, whether it diverged, and (DyT) on the first validation batch the
    last DyT's input rms and fraction beyond SATURATED_AT, and that fraction averaged over every DyT layer."""
    out = {"loss": capped_loss(run.final), "diverged": run.final["diverged"]}
    if run.config.model["norm"] == "dyt":
        x = corpus.batch("val", 0, run.config.batch_size, run.config.model["block_size"], cfg.seed)[0]
        per_layer = dyt_saturations(run.load_model(), x, SATURATED_AT)
        if per_layer:
            out["layer"] = list(per_layer)[-1]
            out["input_rms"], out["saturated"] = per_layer[out["layer"]]
            out["saturated_mean"] = sum(f for _, f in per_layer.values()) / len(per_layer)
    return out


def measure_dyt_alpha(ctx: Context) -> tuple[list[dict], dict[float, list[dict]]]:
    """LayerNorm's per-seed measurements and ``α₀ → per seed`` DyT's (every rank trains; only rank 0 measures,
    the others get empty ones)."""
    cfg = ctx.cfg

    def train(alpha: float | None) -> list[RunResult]:
        arm = "layernorm" if alpha is None else f"dyt-a{alpha:g}"
        return [ctx.train(f"{arm} s{seed}", f"dyt_alpha/{arm}/seed-{seed}",
                          dyt_run_config(cfg, ctx.corpus, alpha, seed), record_activations=False)
                for seed in ctx.seeds]

    reference, sweep = train(None), {a: train(a) for a in cfg.dyt_alphas}
    if not ctx.info.is_main:
        return [], {}
    with torch.no_grad():
        return ([measure_run(r, ctx.corpus, cfg) for r in reference],
                {a: [measure_run(r, ctx.corpus, cfg) for r in runs] for a, runs in sweep.items()})


def losses(runs: list[dict]) -> list[float]:
    return [r["loss"] for r in runs]


def render(cfg: StudyConfig, out_dir: Path, reference: list[dict], sweep: dict[float, list[dict]], verdict: Verdict,
           unigram: float) -> Experiment:
    alphas = list(sweep)
    fig, (ax_loss, ax_sat) = new_figure(2, 6, 4)
    stats = [verdicts.mean_std(losses(sweep[a])) for a in alphas]
    ax_loss.errorbar(alphas, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                     label=f"{DYT} (mean ± 1 std)")
    ln_mean, ln_std = verdicts.mean_std(losses(reference))
    ax_loss.axhline(ln_mean, color="k", lw=1, label=f"{REFERENCE} (band: ± 1 std)")
    ax_loss.axhspan(ln_mean - ln_std, ln_mean + ln_std, color="k", alpha=0.12, lw=0)
    ax_loss.axhline(unigram, color="k", ls=":", lw=1, label=f"unigram entropy {unigram:.2f}")
    ax_loss.set(xscale="log", xlabel="α₀", ylabel="final val loss (capped at the untrained model's)",
                title=f"final val loss over {cfg.seeds} seeds")
    ax_loss.legend(fontsize=7)
    for key, label in (("saturated", "last DyT (before the head)"), ("saturated_mean", "mean over every DyT")):
        sat = [verdicts.mean_std([100 * r.get(key, 0.0) for r in sweep[a]]) for a in alphas]
        ax_sat.errorbar(alphas, [m for m, _ in sat], yerr=[s for _, s in sat], marker="o", capsize=3, label=label)
    ax_sat.set(xscale="log", ylim=(0, 105), xlabel="α₀", ylabel=f"% of entries with |α·x| > {SATURATED_AT:g}",
               title="DyT inputs in tanh's saturated region, after training")
    ax_sat.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp12_dyt_alpha.png")

    rows = [[REFERENCE, "—", pm(losses(reference), 4), f"{sum(r['diverged'] for r in reference)}/{len(reference)}",
             "—", "—", "—", "—"]]
    for a in alphas:
        runs = sweep[a]
        has = [r for r in runs if "saturated" in r]
        rows.append([DYT, a, pm(losses(runs), 4), f"{sum(r['diverged'] for r in runs)}/{len(runs)}",
                     pm([losses(runs)[i] - losses(reference)[i] for i in range(len(runs))]),
                     pm([r["input_rms"] for r in has]) if has else "—",
                     pm([100 * r["saturated"] for r in has]) if has else "—",
                     pm([100 * r["saturated_mean"] for r in has]) if has else "—"])
    best = min(alphas, key=lambda a: verdicts.mean_std(losses(sweep[a]))[0])
    sat_best = [100 * r.get("saturated", 0.0) for r in sweep[best]]
    measured = (f"best α₀ {best:g}: val loss {pm(losses(sweep[best]), 4)} vs LayerNorm {pm(losses(reference), 4)}; "
                f"over α₀ {alphas[0]:g}…{alphas[-1]:g} the mean loss spans "
                f"{min(m for m, _ in stats):.3f}–{max(m for m, _ in stats):.3f}; "
                f"{pm(sat_best)}% of the last DyT's input saturated at the best α₀")
    n_layer, d_model = cfg.dyt_n_layer or cfg.n_layer, cfg.dyt_d_model or cfg.d_model
    notes = [(f"{DYT} with α₀ in {', '.join(f'{a:g}' for a in alphas)} against {REFERENCE}; {n_layer} layers, "
              f"d={d_model}, {cfg.n_head} heads, context {cfg.block_size}, batch {cfg.batch_size}, {cfg.dyt_steps} "
              f"steps (10 % warmup, cosine decay), lr {cfg.lr:g} as the grid's; seeds "
              f"{', '.join(map(str, cfg.seed_list))}, the same for every arm. α is learnable: "
              "α₀ is only its init. A diverged run's loss counts at its untrained model's."),
             ("Scale at init: the study's models draw every weight, the token and position embeddings included, "
              "from N(0, 0.02), so the first block's input has rms ≈ 0.028; LayerNorm lifts it to rms 1, DyT "
              "multiplies it by α₀ (tanh is linear there), so only α₀ ≈ 35 gives the first DyT LayerNorm's output "
              "scale. The sweep can therefore reach past the paper's values."),
             (f"Saturation: the fraction of the last DyT's input entries (the final norm before the head) with "
              f"|α·x| > {SATURATED_AT:g} on the first validation batch, α the trained value; there tanh' ≤ 0.07, so "
              "those entries pass little gradient. \"Every DyT's %\": that fraction averaged over all DyT layers."),
             (f"Holds when the best α₀'s mean loss is not worse than LayerNorm's by more than both "
              f"{COMPARABLE_NATS:g} nats and {SPREAD_K:g}× their pooled seed std (matches), and the worst α₀'s mean "
              f"loss exceeds the best's by more than both (sensitive); partly when one of the two. {verdict.reason}."),
             ("The paper trains ViTs, ConvNeXts, DiTs and LLaMA models (7B–70B, width ≥ 4096, in its α₀ study of "
              "LLMs) for full schedules; here the learning rate is fixed at the grid's, so the best α₀ found is the "
              "best at that rate, model size and number of steps only.")]
    stuck = [f"{a:g}" for a in alphas if verdicts.mean_std(losses(sweep[a]))[0] > unigram - 0.1]
    if stuck:
        notes.append(f"Still on the unigram plateau (mean final val loss not 0.1 nats below the entropy {unigram:.2f} "
                     f"of predicting character frequencies without context): α₀ = {', '.join(stuck)}.")
    return Experiment(NUMBER, TITLE, CLAIM, measured, verdict.word,
                      ["variant", "α₀", "final val loss (capped)", "diverged", "Δ vs LayerNorm (per seed)",
                       "last DyT input rms", f"last DyT % |α·x| > {SATURATED_AT:g}", "every DyT's %"], rows, plot,
                      notes,
                      data={"layernorm": reference, "dyt": {str(a): runs for a, runs in sweep.items()}},
                      below_paper=below_paper({"width": (d_model, 4096)}))


def run(ctx: Context) -> Experiment | None:
    reference, sweep = measure_dyt_alpha(ctx)
    if not ctx.info.is_main:
        return None
    verdict = verdicts.dyt_alpha(losses(reference), {a: losses(r) for a, r in sweep.items()})
    return render(ctx.cfg, ctx.out_dir, reference, sweep, verdict, unigram_entropy(ctx.corpus))
