"""Experiment 8: gradient-norm trajectories over training, RMSNorm against LayerNorm with the same seeds
(the seeds' claim that RMSNorm keeps higher gradient norms, especially early in training)."""

from __future__ import annotations

from pathlib import Path

from normlab.study import verdicts
from normlab.study.config import StudyConfig
from normlab.study.experiments.common import Context, band, pm
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult

NUMBER, TITLE, TRAINS = 8, "Gradient-norm trajectories, RMSNorm vs LayerNorm", False
#: (LayerNorm variant, RMSNorm variant) pairs compared, where the grid has both.
PAIRS = (("layernorm-pre", "rmsnorm-pre"), ("layernorm-post", "rmsnorm-post"))
CLAIM = ("RMSNorm keeps higher gradient norms than LayerNorm, especially early in training "
         "(a claim of the seed material on RMSNorm vs LayerNorm).")


def grad_norms(run: RunResult) -> list[float]:
    """The total gradient norm (before clipping) of every training step."""
    return [r["grad_norm"] for r in run.records if r["kind"] == "train"]


def windows(steps: int) -> tuple[slice, slice]:
    """The early (first 10 % of steps, at least 5) and late (last 25 %) parts of a run."""
    return slice(0, max(5, steps // 10)), slice(steps - max(1, steps // 4), steps)


def window_ratios(ln: list[RunResult], rms: list[RunResult]) -> tuple[list[float], list[float]]:
    """Per seed, RMSNorm's mean gradient norm over LayerNorm's, in the early and the late window."""
    early, late = [], []
    for a, b in zip(ln, rms):
        ga, gb = grad_norms(a), grad_norms(b)
        for out, w in zip((early, late), windows(min(len(ga), len(gb)))):
            out.append(sum(gb[w]) / max(1e-30, sum(ga[w])))
    return early, late


def layer_curves(runs: list[RunResult]) -> tuple[list[int], dict[str, list[list[float]]]]:
    """Logged steps and ``layer → per seed, ‖∂L/∂W‖ of its matrices at those steps``."""
    recs = [[r for r in run.records if r.get("layer_grad_norm")] for run in runs]
    steps = [r["step"] for r in recs[0]]
    layers = list(recs[0][0]["layer_grad_norm"]) if recs[0] else []
    return steps, {k: [[r["layer_grad_norm"][k] for r in rs] for rs in recs] for k in layers}


def smooth(values: list[float], k: int) -> list[float]:
    return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def render(grid: dict[str, list[RunResult]], cfg: StudyConfig, out_dir: Path,
           ratios: dict[tuple[str, str], tuple[list[float], list[float]]], verdict) -> Experiment:
    pairs = list(ratios)
    fig, axes = new_figure(2, 6, 4)
    ax_total, ax_layers = axes
    k = max(1, cfg.steps // 50)
    for ln, rms in pairs:
        for name, ls in ((ln, "-"), (rms, "--")):
            per_seed = [smooth(grad_norms(r), k) for r in grid[name]]
            band(ax_total, range(1, len(per_seed[0]) + 1), per_seed, name, ls=ls, lw=1.2)
    early, late = windows(cfg.steps)
    ax_total.axvspan(early.start + 1, early.stop, color="k", alpha=0.06, lw=0, label="early window")
    ax_total.set(xlabel="step", ylabel="total ‖∇‖ before clipping", yscale="log",
                 title=f"gradient norm, mean ± 1 std over {cfg.seeds} seeds (smoothed over {k})")
    ax_total.legend(fontsize=7)
    ln, rms = pairs[0]
    for name, ls in ((ln, "-"), (rms, "--")):
        steps, curves = layer_curves(grid[name])
        for i, (layer, per_seed) in enumerate(curves.items()):
            if i in (0, len(curves) - 1):
                band(ax_layers, steps, per_seed, f"{name}, layer {int(layer) + 1}", ls=ls, marker="o", ms=2)
    ax_layers.set(xlabel="step", ylabel="‖∂L/∂W‖ (all matrices of the layer)", yscale="log",
                  title="first and last layer")
    ax_layers.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp8_grad_trajectories.png")
    rows = []
    for (ln, rms), (e, l) in ratios.items():
        rows.append([f"{rms} / {ln}", pm(e), pm(l)])
    first = pairs[0]
    measured = (f"RMSNorm's / LayerNorm's total gradient norm ({first[1]} / {first[0]}): {pm(ratios[first][0])} "
                f"in the first {early.stop} steps, {pm(ratios[first][1])} in the last {late.stop - late.start}")
    notes = [(f"The grid's runs of experiment 1 ({cfg.seeds} seeds, pairs share a seed: the same init of every other "
              "parameter and the same data order). Total gradient norm of every step before clipping; per-layer norms "
              "logged every few steps."),
             (f"Holds when the early ratio's mean − {verdicts.SPREAD_K:g}·std exceeds {verdicts.HIGHER_ABOVE:g} and "
              "the "
              f"early ratio exceeds the late one by more than {verdicts.SPREAD_K:g}× their pooled std (Pre-LN pair); "
              f"partly when only higher. {verdict.reason}.")]
    return Experiment(NUMBER, TITLE, CLAIM, measured, verdict.word,
                      ["ratio", "early window (mean ± std)", "late window (mean ± std)"], rows, plot, notes,
                      data={f"{a}|{b}": v for (a, b), v in ratios.items()})


def run(ctx: Context) -> Experiment:
    pairs = [p for p in PAIRS if all(n in ctx.grid for n in p)]
    if not pairs:
        return Experiment(NUMBER, TITLE, CLAIM, "needs the layernorm-pre and rmsnorm-pre variants", "not measured",
                          ["ratio"], [], None)
    ratios = {p: window_ratios(ctx.grid[p[0]], ctx.grid[p[1]]) for p in pairs}
    return render(ctx.grid, ctx.cfg, ctx.out_dir, ratios, verdicts.grad_trajectories(*ratios[pairs[0]]))
