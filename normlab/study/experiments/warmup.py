"""Experiment 3: warmup sensitivity at a high learning rate, Post-LN vs Pre-LN (Xiong et al. 2020)."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.study import verdicts
from normlab.study.config import StudyConfig
from normlab.study.data import Corpus
from normlab.study.distributed import DistInfo
from normlab.study.experiments.common import Context, run_config, unigram_entropy
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult, train_run

NUMBER, TITLE, TRAINS = 3, "Warmup sensitivity at a high learning rate", True


def _cost(c: float) -> str:
    if math.isnan(c):
        return "an unknown amount (its run with warmup diverged too)"
    return "a divergence" if math.isinf(c) else f"{c:+.3f} nats of val loss"


def measure_warmup(cfg: StudyConfig, corpus: Corpus, out_dir: Path, info: DistInfo, progress: bool,
                   callbacks: tuple = ()) -> dict[tuple[str, bool], RunResult]:
    """Experiment 3's four runs at the high learning rate: ``(placement, warmup) → run`` (every rank trains)."""
    runs: dict[tuple[str, bool], RunResult] = {}
    for placement in ("post", "pre"):
        for warm in (True, False):
            rc = run_config(cfg, corpus, f"layernorm-{placement}", steps=cfg.warmup_steps, lr=cfg.warmup_lr,
                            min_lr=cfg.warmup_lr * cfg.min_lr_ratio, warmup=cfg.warmup_warmup if warm else 0,
                            eval_interval=max(1, cfg.warmup_steps // 3))
            name = f"{placement}-LN-{'warmup' if warm else 'nowarmup'}"
            runs[(placement, warm)] = train_run(name, out_dir / "warmup" / name, rc, corpus, info, progress=progress,
                                                record_activations=False, callbacks=callbacks)
    return runs


def exp3_warmup(cfg: StudyConfig, corpus: Corpus, out_dir: Path, info: DistInfo, progress: bool,
                callbacks: tuple = ()) -> Experiment | None:
    runs = measure_warmup(cfg, corpus, out_dir, info, progress, callbacks)
    if not info.is_main:  # the other ranks train with rank 0, which alone writes the plot and the verdict
        return None
    verdict = verdicts.warmup({k: (r.final["final_val_loss"], r.final["diverged"]) for k, r in runs.items()})
    return render_warmup(cfg, corpus, out_dir, runs, verdict)


def render_warmup(cfg: StudyConfig, corpus: Corpus, out_dir: Path, runs: dict[tuple[str, bool], RunResult],
                  verdict: tuple[str, float, float]) -> Experiment:
    rows = []
    fig, (ax,) = new_figure(1, 6.5, 4)
    for (placement, warm), r in runs.items():
        f = r.final
        rows.append([f"{placement}-LN", f"{cfg.warmup_warmup} steps" if warm else "none", f["final_val_loss"],
                     f["final_train_loss"], f["diverged"]])
        s, l = r.train_curve()
        ax.plot(s, l, ls="-" if warm else "--", lw=1.2, label=f"{placement}-LN, {'warmup' if warm else 'no warmup'}")
    unigram = unigram_entropy(corpus)
    ax.axhline(unigram, color="k", ls=":", lw=1, label=f"unigram entropy {unigram:.2f}")
    ax.set(xlabel="step", ylabel="train loss", title=f"lr {cfg.warmup_lr:g}: with and without warmup")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6))
    ax.legend(fontsize=8)
    plot = save_figure(fig, out_dir / "exp3_warmup.png")
    v = {k: r.final["final_val_loss"] for k, r in runs.items()}
    word, post_cost, pre_cost = verdict
    measured = (f"at lr {cfg.warmup_lr:g}, dropping warmup costs Post-LN {_cost(post_cost)} "
                f"and Pre-LN {_cost(pre_cost)} after {cfg.warmup_steps} steps")
    claim = ("Post-LN needs a learning-rate warmup: without it, at a high learning rate, it trains much worse; "
             "Pre-LN trains well without warmup (Xiong et al. 2020).")
    notes = [(f"{cfg.warmup_steps} steps per run, linear warmup of {cfg.warmup_warmup} steps or none, then cosine "
              "decay; same data, seed and model as experiment 1 otherwise. The paper's models are deeper and wider "
              "(6+ layers, d=512) and train far longer; "
              "a short run at this size tests the early-training part of the claim only."),
             ("Holds when removing warmup raises Post-LN's final val loss by > 0.05 and by > 0.05 more than Pre-LN's "
              "(a run that diverged — a non-finite loss, or a final val loss more than 1 nat above the untrained "
              "model's — counts as an infinite loss); partly when it raises Post-LN's by > 0.05 but Pre-LN's as much, "
              "or Post-LN's by less but still more than Pre-LN's; a diverged run with warmup says nothing.")]
    stuck = [f"{p}-LN {'with' if w else 'without'} warmup" for (p, w), val in v.items() if val > unigram - 0.1]
    if stuck:
        notes.append(f"Still on the unigram plateau (final val loss > {unigram - 0.1:.2f}, i.e. within 0.1 nats of the "
                     f"entropy {unigram:.2f} of predicting character frequencies without context): "
                     f"{', '.join(stuck)}.")
    return Experiment(NUMBER, TITLE, claim, measured, word,
                      ["placement", "warmup", "final val loss", "final train loss", "diverged"], rows, plot, notes,
                      data={"post_cost": post_cost, "pre_cost": pre_cost})


def run(ctx: Context) -> Experiment | None:
    return exp3_warmup(ctx.cfg, ctx.corpus, ctx.out_dir, ctx.info, ctx.progress, ctx.callbacks)
