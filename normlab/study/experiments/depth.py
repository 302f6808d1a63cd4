"""Experiment 10: the residual stream and each layer's change of it across depth, per placement of a LayerNorm
model (Peri-LN, Kim et al. 2025; LayerNorm Scaling and the "curse of depth", Sun et al. 2025), over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from normlab.analysis.depth import angular_change, residual_stream, stream_rms
from normlab.study import verdicts
from normlab.study.config import DEPTH_CLAIMED, StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, band, below_paper, pm, run_config
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import build_model
from normlab.study.verdicts import Verdict

NUMBER, TITLE, TRAINS = 10, "Depth and activations per placement", True
#: Validation batches (of the first seed, the same for every run) the stream is measured on.
PROBE_BATCHES = 2
CLAIM = ("In Pre-LN the residual stream's RMS grows with depth, and the deep layers barely change their input "
         "(the curse of depth); normalizing the branch outputs too (Peri-LN = sandwich, Kim et al. 2025) or "
         "scaling each layer's norm output by 1/√ℓ (LayerNorm Scaling, Sun et al. 2025) keeps the stream smaller, "
         "makes the deep layers contribute, and trains to a lower loss.")
NAMES = {"pre": "Pre-LN", "sandwich": "Peri-LN (sandwich)", "lnscaling": "LN-Scaling", "post": "Post-LN",
         "deepnorm": "DeepNorm", "olmo2": "OLMo 2", "mixln": "Mix-LN", "none": "no block norm"}


def probe_tokens(cfg: StudyConfig, corpus: Corpus) -> torch.Tensor:
    """The fixed validation tokens every model's stream is measured on."""
    return torch.cat([corpus.batch("val", i, cfg.depth_batch_size, cfg.block_size, cfg.seed)[0]
                      for i in range(PROBE_BATCHES)])


def stream_profile(model: torch.nn.Module, idx: torch.Tensor) -> tuple[list[float], list[float]]:
    """``(RMS of h_0 … h_L, angular change of blocks 1 … L)`` of ``model`` (eval mode) on ``idx``."""
    states = residual_stream(model.eval(), idx)
    return stream_rms(states), angular_change(states)


def rms_growth(rms: list[float]) -> float:
    """The stream's RMS after the last block over its RMS after the first (``h_L / h_1``; ``h_0``, the
    embedding, is left out: Post-LN and DeepNorm normalize only from block 1 on)."""
    return rms[-1] / rms[1]


def deep_over_early(angular: list[float]) -> float:
    """Mean angular change of the last third of the blocks over that of the first third (≥ 1 block each)."""
    k = max(1, len(angular) // 3)
    return (sum(angular[-k:]) / k) / max(1e-30, sum(angular[:k]) / k)


def measure(ctx: Context) -> dict[str, list[dict]] | None:
    """``placement → per seed {rms_init, rms, angular_init, angular, val_loss, diverged}`` (every rank trains;
    rank 0 alone measures and gets it, the others None)."""
    cfg, corpus = ctx.cfg, ctx.corpus
    runs = {}
    for placement in cfg.depth_placements:
        for seed in ctx.seeds:
            rc = run_config(cfg, corpus, f"layernorm-{placement}", n_layer=cfg.depth_n_layer,
                            d_model=cfg.depth_d_model, n_head=cfg.depth_n_head, steps=cfg.depth_steps,
                            batch_size=cfg.depth_batch_size, warmup=cfg.depth_steps // 10, seed=seed,
                            eval_interval=cfg.depth_steps)
            name = f"{placement}-s{seed}"
            runs[(placement, seed)] = ctx.train(name, f"depth/{name}", rc, record_activations=False)
    if not ctx.info.is_main:
        return None
    idx = probe_tokens(cfg, corpus)
    out: dict[str, list[dict]] = {}
    for (placement, _), r in runs.items():
        rms_init, angular_init = stream_profile(build_model(r.config.model, r.config.seed), idx)
        rms, angular = stream_profile(r.load_model(), idx)
        out.setdefault(placement, []).append(dict(
            rms_init=rms_init, rms=rms, angular_init=angular_init, angular=angular,
            val_loss=r.final["final_val_loss"], diverged=bool(r.final["diverged"])))
    return out


def summaries(data: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """Per placement, per seed: growth at init and trained, deep/early angular change (init, trained), loss."""
    return {p: {"growth_init": [rms_growth(s["rms_init"]) for s in seeds],
                "growth": [rms_growth(s["rms"]) for s in seeds],
                "deep_early_init": [deep_over_early(s["angular_init"]) for s in seeds],
                "deep_early": [deep_over_early(s["angular"]) for s in seeds],
                "val_loss": [s["val_loss"] for s in seeds]}
            for p, seeds in data.items()}


def judge(stats: dict[str, dict[str, list[float]]]) -> Verdict:
    claimed = {p: stats[p] for p in DEPTH_CLAIMED}
    return verdicts.depth(*({p: s[k] for p, s in claimed.items()} for k in ("growth", "deep_early", "val_loss")))


def _ranking(stats: dict[str, dict[str, list[float]]]) -> str:
    means = sorted((verdicts.mean_std(s["val_loss"])[0], p) for p, s in stats.items())
    return " < ".join(f"{NAMES[p]} {m:.3f}" for m, p in means)


def render(cfg: StudyConfig, out_dir: Path, data: dict[str, list[dict]], verdict: Verdict) -> Experiment:
    stats = summaries(data)
    fig, (ax_rms, ax_ang, ax_loss) = new_figure(3, 5.5, 4.5)
    for i, (placement, seeds) in enumerate(data.items()):
        color = f"C{i}"
        layers = range(len(seeds[0]["rms"]))
        band(ax_rms, layers, [s["rms"] for s in seeds], NAMES[placement], color=color, lw=1.3)
        band(ax_rms, layers, [s["rms_init"] for s in seeds], "_", color=color, lw=1, ls="--")
        band(ax_ang, range(1, len(layers)), [s["angular"] for s in seeds], NAMES[placement], color=color,
             marker="o", ms=2.5)
    ax_rms.set(xlabel="state h_ℓ (0: embedding, ℓ: after block ℓ)", ylabel="RMS of the residual stream",
               yscale="log", title="stream RMS (dashed: init, solid: trained)")
    ax_ang.set(xlabel="block ℓ", ylabel="angular change arccos(cos(h_ℓ₋₁, h_ℓ))/π", yscale="log",
               title="how much each block turns its input (trained)")
    for ax in (ax_rms, ax_ang):
        ax.legend(fontsize=7)
    finite = {p: [v for v in s["val_loss"] if math.isfinite(v)] for p, s in stats.items()}
    shown = [p for p in data if finite[p]]
    loss_stats = [verdicts.mean_std(finite[p]) for p in shown]
    ax_loss.bar(range(len(shown)), [m for m, _ in loss_stats], yerr=[s for _, s in loss_stats], capsize=4,
                color=[f"C{list(data).index(p)}" for p in shown])
    ax_loss.set_xticks(range(len(shown)), [NAMES[p] for p in shown], rotation=30, ha="right", fontsize=8)
    low = min((m - s for m, s in loss_stats), default=0.0)
    ax_loss.set_ylim(bottom=max(0.0, low - 0.2))
    ax_loss.set(ylabel="final val loss (nats/char)", title=f"mean ± 1 std over {cfg.seeds} seed(s)")
    plot = save_figure(fig, out_dir / "exp10_depth.png")

    rows = []
    for p, s in stats.items():
        diverged = sum(x["diverged"] for x in data[p])
        rows.append([NAMES[p], pm(s["val_loss"]), f"{diverged}/{len(data[p])}", pm(s["growth_init"]),
                     pm(s["growth"]), pm(s["deep_early_init"]), pm(s["deep_early"])])
    headers = ["placement", "final val loss", "diverged", "RMS h_L/h_1 init", "RMS h_L/h_1 trained",
               "deep/early angular init", "deep/early angular trained"]
    k = max(1, cfg.depth_n_layer // 3)
    measured = (f"{cfg.depth_n_layer} layers, {cfg.seeds} seed(s): trained stream growth h_L/h_1 "
                + ", ".join(f"{NAMES[p]} {pm(stats[p]['growth'])}" for p in DEPTH_CLAIMED)
                + "; deep/early angular change "
                + ", ".join(f"{NAMES[p]} {pm(stats[p]['deep_early'])}" for p in DEPTH_CLAIMED)
                + f"; loss {_ranking({p: stats[p] for p in DEPTH_CLAIMED})}")
    tokens = cfg.depth_steps * cfg.depth_batch_size * cfg.block_size
    notes = [
        (f"LayerNorm GPTs of {cfg.depth_n_layer} layers, d={cfg.depth_d_model}, {cfg.depth_n_head} heads, context "
         f"{cfg.block_size}, trained {cfg.depth_steps} steps of {cfg.depth_batch_size} sequences ({tokens:,} "
         f"characters) at lr {cfg.lr:g} with {cfg.depth_steps // 10} warmup steps, seeds "
         f"{cfg.seed}…{cfg.seed + cfg.seeds - 1} (init and data order). The stream is measured on the same "
         f"{PROBE_BATCHES} validation batches for every run, at init (dashed) and after training (solid). The "
         "width and the steps are what lets every placement × seed train in the study's time budget on a CPU; "
         "the papers' smallest models have 12 layers."),
        ("Stream growth is the RMS after the last block over the RMS after the first (the embedding h_0 is left "
         "out: Post-LN and DeepNorm normalize the stream only from block 1 on, so they stay near 1 by "
         f"construction). Deep/early is the mean angular change of the last {k} blocks over the first {k}'s; "
         "block 1 turns the small embedding a lot in every placement. 'no block norm' (placement none) keeps only "
         "the final LayerNorm before the head."),
        (f"Final-loss ranking (all placements): {_ranking(stats)}. A difference counts only beyond "
         f"{verdicts.SPREAD_K:g}× the pooled seed std (and {verdicts.COMPARABLE_NATS:g} nats for the loss)."),
        (f"Holds when all seven checks hold, partly when some do, not here when none does: (1) Pre-LN's trained "
         f"growth has mean − {verdicts.SPREAD_K:g}·std > {verdicts.GROWS_ABOVE:g}; Peri-LN's and LN-Scaling's each "
         f"lie below it by more than {verdicts.SPREAD_K:g}× the pooled std; (2) Pre-LN's deep/early ratio has mean + "
         f"{verdicts.SPREAD_K:g}·std < {verdicts.DEEP_BELOW:g}; LN-Scaling's lies above it by more than "
         f"{verdicts.SPREAD_K:g}× the pooled std; (3) Peri-LN's and LN-Scaling's final val loss each lie below "
         f"Pre-LN's by more than {verdicts.COMPARABLE_NATS:g} nats and {verdicts.SPREAD_K:g}× the pooled std. "
         f"{verdict.reason}."),
        ("The papers' effects build up over long training of large models (Pre-LN's stream growing to hundreds "
         "or thousands in the deep layers); a run this short and small shows their early onset at most, and a "
         "placement that wins here may lose at scale."),
    ]
    diverged = [NAMES[p] for p in data if any(x["diverged"] for x in data[p])]
    if diverged:
        notes.append(f"Diverged in some seed (loss non-finite or > 1 nat above init): {', '.join(diverged)}.")
    return Experiment(NUMBER, TITLE, CLAIM, measured, verdict.word, headers, rows, plot, notes,
                      data={"runs": data, "summary": stats},
                      below_paper=below_paper({"layers": (cfg.depth_n_layer, 12), "d": (cfg.depth_d_model, 768),
                                               "training tokens (M)": (tokens / 1e6, 1000.0)}))


def run(ctx: Context) -> Experiment | None:
    data = measure(ctx)
    if data is None:  # the other ranks trained with rank 0, which alone measures and renders
        return None
    return render(ctx.cfg, ctx.out_dir, data, judge(summaries(data)))
