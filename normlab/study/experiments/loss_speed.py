"""Experiment 1: loss and speed of every variant over seeds (Zhang & Sennrich 2019: RMSNorm as good as
LayerNorm, and faster)."""

from __future__ import annotations

from pathlib import Path

import torch

from normlab.analysis import find_norm_layers
from normlab.bench.timing import interleaved_medians
from normlab.study import verdicts
from normlab.study.config import StudyConfig, parse_variant
from normlab.study.experiments.common import Context, band, below_paper, dyt_saturation, pm
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult
from normlab.study.verdicts import COMPARABLE_NATS, FASTER_BY, Verdict

NUMBER, TITLE, TRAINS = 1, "Loss curves and speed per variant", False
PAIR = ("layernorm-pre", "rmsnorm-pre")


def final(runs: list[RunResult], key: str) -> list[float]:
    """``key`` of every seed's final summary."""
    return [r.final[key] for r in runs]


def measure_isolated(grid: dict[str, list[RunResult]], cfg: StudyConfig) -> dict[str, list[float]]:
    """Forward+backward seconds of the first norm layer of the trained layernorm-pre and rmsnorm-pre models
    (first seed) at the model's activation shape: ``cfg.timing_rounds`` interleaved rounds, each a median of 7."""
    shape = (cfg.batch_size * cfg.block_size, cfg.d_model)
    steps = {}
    for name in PAIR:
        layer = find_norm_layers(grid[name][0].load_model())[0][1].train()
        x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)

        def step(layer=layer, x=x, g=g):
            layer(x).backward(g)

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(cfg.timing_rounds):  # interleaved rounds share the machine's noise
        for name, t in interleaved_medians(steps, lambda: None, samples=7, min_time=0.02).items():
            if isinstance(t, Exception):
                raise t
            times[name].append(t)
    return times


def savings(ln: list[float], rms: list[float]) -> list[float]:
    """Percent of LayerNorm's time saved by RMSNorm, pairwise."""
    return [100 * (1 - r / l) for l, r in zip(ln, rms)]


def measure_loss_and_speed(grid: dict[str, list[RunResult]], cfg: StudyConfig) -> dict:
    """RMSNorm against LayerNorm (Pre-LN) over the seeds: the per-seed val losses, the isolated timings,
    the in-training norm times and step times."""
    if not all(n in grid for n in PAIR):
        return {}
    ln, rms = grid[PAIR[0]], grid[PAIR[1]]
    times = measure_isolated(grid, cfg)
    return {
        "ln_val": final(ln, "final_val_loss"), "rms_val": final(rms, "final_val_loss"),
        "isolated_s": times, "shape": (cfg.batch_size * cfg.block_size, cfg.d_model),
        "isolated_saving": savings(times[PAIR[0]], times[PAIR[1]]),
        "in_train_saving": savings(final(ln, "norm_ms"), final(rms, "norm_ms")),
        "step_saving": savings(final(ln, "step_ms"), final(rms, "step_ms")),
    }


def render_loss_and_speed(grid: dict[str, list[RunResult]], cfg: StudyConfig, out_dir: Path, data: dict,
                          verdict: Verdict | None) -> Experiment:
    rows = [[name, pm(final(runs, "init_val_loss"), 4), pm(final(runs, "final_val_loss"), 4),
             pm(final(runs, "final_train_loss"), 4), pm(final(runs, "step_ms")), pm(final(runs, "tokens_per_s")),
             pm(final(runs, "norm_ms")), pm([100 * f for f in final(runs, "norm_frac")], 2)]
            for name, runs in grid.items()]
    fig, (ax_loss, ax_time) = new_figure(2)
    for name, runs in grid.items():
        steps = runs[0].val_curve()[0]
        band(ax_loss, steps, [r.val_curve()[1] for r in runs], f"{name} (val)", marker="o", ms=3)
    ax_loss.set(xlabel="step", ylabel="validation loss (nats/char)",
                title=f"validation loss, mean ± 1 std over {cfg.seeds} seeds")
    ax_loss.set_ylim(top=min(ax_loss.get_ylim()[1], 4.8))
    ax_loss.legend(fontsize=7)
    names = list(grid)
    norm = [verdicts.mean_std(final(grid[n], "norm_ms")) for n in names]
    rest = [verdicts.mean_std([f["step_ms"] - f["norm_ms"] for f in (r.final for r in grid[n])]) for n in names]
    ax_time.barh(names, [m for m, _ in norm], xerr=[s for _, s in norm], label="inside norm layers")
    ax_time.barh(names, [m for m, _ in rest], left=[m for m, _ in norm], xerr=[s for _, s in rest],
                 label="rest of the step", alpha=0.5)
    ax_time.set(xlabel="ms per training step (median per run; bars ± std over seeds)",
                title="time inside norm layers vs the rest")
    ax_time.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp1_loss_speed.png")

    claim = ("RMSNorm reaches quality comparable to LayerNorm while reducing running time by 7%–64% "
             "(Zhang & Sennrich 2019, *Root Mean Square Layer Normalization*).")
    notes = [(f"{cfg.seeds} seeds per variant ({cfg.seed}…{cfg.seed + cfg.seeds - 1}); a seed sets the init and "
              "the data order, and the variants share it. ± is the sample std over the seeds.")]
    word, measured, extra = "not measured", "needs the layernorm-pre and rmsnorm-pre variants", []
    if verdict is not None:
        word = verdict.word
        delta = [r - l for l, r in zip(data["ln_val"], data["rms_val"])]
        measured = (f"Pre-RMSNorm val loss {pm(data['rms_val'], 4)} vs Pre-LN {pm(data['ln_val'], 4)} "
                    f"(Δ {pm(delta)}); RMSNorm saves {pm(data['isolated_saving'])}% of the norm layer's time in "
                    f"isolation, {pm(data['in_train_saving'])}% in training; whole training step "
                    f"{pm(data['step_saving'])}%")
        times, shape = data["isolated_s"], data["shape"]
        extra.append(((f"Isolated forward+backward of one norm layer at the model's activation shape "
                       f"{shape[0]}×{shape[1]} ({cfg.timing_rounds} interleaved rounds, each a median of 7):"),
                      ["layer", "µs per round (mean ± std)", "RMSNorm saving"],
                      [["LayerNorm (layernorm-pre)", pm([1e6 * t for t in times[PAIR[0]]]), ""],
                       ["RMSNorm (rmsnorm-pre)", pm([1e6 * t for t in times[PAIR[1]]]),
                        pm(data["isolated_saving"]) + " %"]]))
        notes.append(f"Quality: RMSNorm counts as worse (or better) only when the mean val-loss difference exceeds "
                     "both "
                     f"{COMPARABLE_NATS:g} nats/char and {verdicts.SPREAD_K:g}× the pooled seed std; otherwise "
                     f"comparable. Faster: the isolated saving's mean − {verdicts.SPREAD_K:g}·std over the rounds is "
                     f"≥ {FASTER_BY:g}%. {verdict.reason}.")
        notes.append("The in-training norm time is reported too, but the variants train one after another, so on a "
                     "shared machine it also measures the load of the moment.")
    for name, runs in grid.items():
        if parse_variant(name)[0] == "dyt":
            notes.append(_dyt_saturation_note(name, runs[0], cfg))
    shares = [100 * r.final["norm_frac"] for runs in grid.values() for r in runs if r.final["norm_ms"] > 0]
    if shares:
        notes.append("Norm time is measured with hooks on the norm modules (forward) and on the autograd "
                     "nodes their forward created (backward): "
                     f"{min(shares):.0f}–{max(shares):.0f}% of a training step here, so even a large saving inside the "
                     "norm layers moves the whole step by a few % — about the timing noise of a shared machine.")
    return Experiment(NUMBER, TITLE, claim, measured, word,
                      ["variant", "val loss @0", "final val loss", "final train loss", "step ms", "tokens/s",
                       "norm ms/step", "norm %"], rows, plot, notes, extra,
                      data={k: v for k, v in data.items() if k != "shape"},
                      below_paper=below_paper({"d_model": (cfg.d_model, 512), "layers": (cfg.n_layer, 6)}))


def exp1_loss_and_speed(grid: dict[str, list[RunResult]], cfg: StudyConfig, out_dir: Path) -> Experiment:
    data = measure_loss_and_speed(grid, cfg)
    verdict = verdicts.loss_and_speed(data["ln_val"], data["rms_val"], data["isolated_saving"]) if data else None
    return render_loss_and_speed(grid, cfg, out_dir, data, verdict)


def run(ctx: Context) -> Experiment:
    return exp1_loss_and_speed(ctx.grid, ctx.cfg, ctx.out_dir)


def _dyt_saturation_note(name: str, r: RunResult, cfg: StudyConfig) -> str:
    """How much of a trained DyT model's tanh is saturated (|αx| > 9: tanh rounds to ±1 in fp32 and its
    derivative to 0), and from which logged step its blocks got exactly zero gradient."""
    from normlab.study.data import load_corpus

    corpus = load_corpus(None if r.config.data.startswith("builtin:") else r.config.data)
    x = corpus.batch("val", 0, cfg.batch_size, r.config.model["block_size"], cfg.seed)[0]
    found = dyt_saturation(r.load_model(), x, threshold=9.0)
    if found is None:
        return f"{name}: no DyT layer ran (placement without norms)."
    last, rms, sat = found
    dead = [g["step"] for g in r.records
            if "layer_grad_norm" in g and g["layer_grad_norm"] and not any(g["layer_grad_norm"].values())]
    text = (f"{name}: the input of its last DyT ({last.replace('transformer.', '')}) has rms "
            f"{rms:.3g}; {100 * sat:.0f}% of its entries saturate tanh (|αx| > 9, "
            "where tanh' rounds to 0 in fp32)")
    if dead:
        text += (f", and from logged step {dead[0]} on every block's gradient is exactly 0 — only the embeddings and "
                 "the head train")
    return text + (". DyT (Zhu et al. 2025) has no statistics to bound the residual stream; "
                   "its paper tunes α₀ per model (α₀ = 0.5 here; experiment 12 sweeps it).")
