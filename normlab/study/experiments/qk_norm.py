"""Experiment 11: QK-norm and learning-rate sensitivity (Wortsman et al. 2023, *Small-scale proxies for
large-scale Transformer training instabilities*): a learning-rate sweep of Pre-LN with and without QK-norm,
over seeds; final val loss, the paper's LR sensitivity, and the largest attention logit per block."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from normlab.analysis import max_attention_logit
from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, band, below_paper, capped_loss, pm, run_config
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult, build_model
from normlab.study.verdicts import COMPARABLE_NATS, LOGIT_FACTOR, SPREAD_K, Verdict

NUMBER, TITLE, TRAINS = 11, "QK-norm and learning-rate sensitivity", True
VARIANT = "layernorm-pre"
#: The two arms: name → GPTConfig.qk_norm.
ARMS = {"without QK-norm": False, "QK-norm": True}
#: A learning rate is stable when its loss lies within this many nats of the sweep's best (per seed).
STABLE_MARGIN = 0.1
CLAIM = ("Without QK-norm the attention logits grow at high learning rates and training fails there; QK-norm "
         "keeps them bounded and widens the range of learning rates that train well (lower LR sensitivity) "
         "(Wortsman et al. 2023, *Small-scale proxies for large-scale Transformer training instabilities*).")


def qk_run_config(cfg: StudyConfig, corpus: Corpus, qk_norm: bool, lr: float, seed: int) -> RunConfig:
    """One run of the sweep: Pre-LN at the experiment's depth and width, ``lr`` peak, 10 % warmup, cosine decay."""
    return run_config(cfg, corpus, VARIANT, model={"qk_norm": qk_norm}, n_layer=cfg.qk_n_layer or cfg.n_layer,
                      d_model=cfg.qk_d_model or cfg.d_model, steps=cfg.qk_steps, lr=lr, min_lr=lr * cfg.min_lr_ratio,
                      warmup=cfg.qk_steps // 10, seed=seed, eval_interval=max(1, cfg.qk_steps // 4))


def max_logit(logits: list[float]) -> float:
    """The largest of the per-block logits; a non-finite one (a model whose weights overflowed) counts as inf."""
    return math.inf if not all(math.isfinite(v) for v in logits) else max(logits)


def lr_sensitivity(losses: list[float]) -> float:
    """Wortsman et al.'s LR sensitivity of one seed's sweep of capped losses: the mean over the sweep of
    (loss − the sweep's best loss)."""
    best = min(losses)
    return sum(v - best for v in losses) / len(losses)


def largest_stable_lr(lrs: list[float], losses: list[float], margin: float = STABLE_MARGIN) -> float:
    """The largest learning rate whose loss lies within ``margin`` of the sweep's best."""
    best = min(losses)
    return max(lr for lr, v in zip(lrs, losses) if v <= best + margin)


def measure_run(run: RunResult, corpus: Corpus, cfg: StudyConfig) -> dict:
    """A trained run's capped final val loss, whether it diverged, and the max attention logit per block on the
    first validation batch, before training (the same seed's init) and after."""
    rc = run.config
    x = corpus.batch("val", 0, rc.batch_size, rc.model["block_size"], cfg.seed)[0]
    return {"loss": capped_loss(run.final), "init_loss": run.final["init_val_loss"], "diverged": run.final["diverged"],
            "init_logits": max_attention_logit(build_model(rc.model, rc.seed).eval(), x),
            "logits": max_attention_logit(run.load_model(), x)}


def measure_qk_norm(ctx: Context) -> dict[str, list[list[dict]]]:
    """``arm → per learning rate (ascending), per seed`` the measurements of :func:`measure_run` (every rank
    trains; only rank 0 measures, the others get an empty dict)."""
    cfg = ctx.cfg
    runs = {arm: [[ctx.train(f"qk {arm} lr {lr:g} s{seed}", f"qk_norm/{'qk' if qk else 'plain'}-lr{lr:g}/seed-{seed}",
                             qk_run_config(cfg, ctx.corpus, qk, lr, seed), record_activations=False)
                   for seed in ctx.seeds] for lr in cfg.qk_lrs] for arm, qk in ARMS.items()}
    if not ctx.info.is_main:
        return {}
    with torch.no_grad():
        return {arm: [[measure_run(r, ctx.corpus, cfg) for r in per_lr] for per_lr in per_arm]
                for arm, per_arm in runs.items()}


def per_seed(per_lr: list[list[dict]], key: str) -> list[list]:
    """``per_lr[i][s][key]`` regrouped as ``[seed][lr]``."""
    return [[per_lr[i][s][key] for i in range(len(per_lr))] for s in range(len(per_lr[0]))]


def summarize(data: dict[str, list[list[dict]]], lrs: list[float]) -> dict[str, dict[str, list[float]]]:
    """Per arm, per seed: the LR sensitivity, the largest stable learning rate, and the max logit (over blocks)
    at the highest learning rate."""
    out = {}
    for arm, per_lr in data.items():
        losses = per_seed(per_lr, "loss")
        out[arm] = {"sensitivity": [lr_sensitivity(s) for s in losses],
                    "stable_lr": [largest_stable_lr(lrs, s) for s in losses],
                    "top_logit": [max_logit(m["logits"]) for m in per_lr[-1]]}
    return out


def qk_verdict(summary: dict[str, dict[str, list[float]]]) -> Verdict:
    plain, qk = summary["without QK-norm"], summary["QK-norm"]
    return verdicts.qk_norm(plain["sensitivity"], qk["sensitivity"], plain["top_logit"], qk["top_logit"])


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def render(cfg: StudyConfig, out_dir: Path, data: dict[str, list[list[dict]]], summary: dict, verdict: Verdict
           ) -> Experiment:
    lrs = cfg.qk_lrs
    fig, (ax_loss, ax_logit) = new_figure(2, 6, 4)
    for arm, per_lr in data.items():
        band(ax_loss, lrs, per_seed(per_lr, "loss"), arm, marker="o", ms=3)
        line = band(ax_logit, lrs, [_finite([max_logit(x) for x in s]) for s in per_seed(per_lr, "logits")],
                    f"{arm}, after training", marker="o", ms=3)
        band(ax_logit, lrs, [[max(x) for x in s] for s in per_seed(per_lr, "init_logits")], f"{arm}, at init",
             ls=":", color=line.get_color())
    init_losses = [r["init_loss"] for per_arm in data.values() for per_lr in per_arm for r in per_lr]
    ax_loss.axhline(sum(init_losses) / len(init_losses), color="k", ls=":", lw=1, label="untrained model (the cap)")
    ax_loss.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss (capped at the untrained model's)",
                title=f"final val loss, mean ± 1 std over {cfg.seeds} seeds")
    ax_loss.legend(fontsize=7)
    ax_logit.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="max q·k/√d_head over blocks",
                 title="largest attention logit")
    ax_logit.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp11_qk_norm.png")

    rows = []
    for arm, per_lr in data.items():
        for lr, runs in zip(lrs, per_lr):
            rows.append([arm, lr, pm([r["loss"] for r in runs], 4), f"{sum(r['diverged'] for r in runs)}/{len(runs)}",
                         pm([max(r["init_logits"]) for r in runs]), pm([max_logit(r["logits"]) for r in runs])])
    sweep = [[arm, pm(s["sensitivity"]), pm(s["stable_lr"]), pm(s["top_logit"])] for arm, s in summary.items()]
    plain, qk = summary["without QK-norm"], summary["QK-norm"]
    measured = (f"LR sensitivity over lr {lrs[0]:g}…{lrs[-1]:g}: {pm(plain['sensitivity'])} nats without QK-norm, "
                f"{pm(qk['sensitivity'])} with; largest attention logit at lr {lrs[-1]:g}: {pm(plain['top_logit'])} "
                f"vs {pm(qk['top_logit'])}")
    n_layer, d_model = cfg.qk_n_layer or cfg.n_layer, cfg.qk_d_model or cfg.d_model
    notes = [(f"{VARIANT}, {n_layer} layers, d={d_model}, {cfg.n_head} heads, context {cfg.block_size}, batch "
              f"{cfg.batch_size}; {cfg.qk_steps} steps per run (10 % linear warmup, cosine decay to "
              f"{cfg.min_lr_ratio:g}× the peak), AdamW as the grid's, gradient clipping {cfg.grad_clip:g}; seeds "
              f"{', '.join(map(str, cfg.seed_list))}, the same for both arms. QK-norm: RMSNorm "
              "over the head dimension on queries and keys."),
             ("A run's loss is its final val loss capped at its untrained model's (a diverged run counts there), as in "
              "the paper. LR sensitivity (the paper's measure) per seed: the mean over the sweep of (loss − the "
              f"sweep's best loss). Largest stable lr: the largest whose loss is within {STABLE_MARGIN:g} nats of the "
              "best. Max logit: max q·k/√d_head over heads, blocks and causal positions on the first val batch."),
             (f"Holds when QK-norm's LR sensitivity is lower than without it by more than {COMPARABLE_NATS:g} nats and "
              f"{SPREAD_K:g}× the pooled seed std, and at the highest learning rate the largest logit without QK-norm "
              f"exceeds QK-norm's more than {LOGIT_FACTOR:g}-fold, compared as logarithms (the logits span orders of "
              f"magnitude), by more than {SPREAD_K:g}× the pooled std of their logs (a non-finite logit counts as "
              f"infinite); partly when one of the two. {verdict.reason}."),
             ("The paper's small-scale proxies are still far larger models, trained for 1e5 steps (5e3 warmup) on C4 "
              "with independent weight decay and a z-loss; a few hundred steps of a tiny model on a character corpus "
              "test only the early part of the claim: whether the logits grow and the high rates lose quality already "
              "there. The rates at which training fails depend on the model, the steps and the warmup.")]
    return Experiment(NUMBER, TITLE, CLAIM, measured, verdict.word,
                      ["arm", "peak lr", "final val loss (capped)", "diverged", "max logit at init",
                       "max logit after"], rows, plot, notes,
                      [("Over the sweep (per seed, then mean ± std):",
                        ["arm", "LR sensitivity (nats)", "largest stable lr", f"max logit at lr {lrs[-1]:g}"], sweep)],
                      data={"lrs": lrs, "runs": data, "summary": summary},
                      below_paper=below_paper({"steps": (cfg.qk_steps, 1e5)}))


def run(ctx: Context) -> Experiment | None:
    data = measure_qk_norm(ctx)
    if not ctx.info.is_main:
        return None
    summary = summarize(data, ctx.cfg.qk_lrs)
    return render(ctx.cfg, ctx.out_dir, data, summary, qk_verdict(summary))
