"""Experiment 5: invariances of LayerNorm vs RMSNorm (Zhang & Sennrich 2019, Table 1)."""

from __future__ import annotations

from pathlib import Path

import torch

from normlab.analysis import PAPER_TABLE1, measure_invariances
from normlab.study import verdicts
from normlab.study.config import StudyConfig
from normlab.study.experiments.common import Context
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.verdicts import Verdict

NUMBER, TITLE, TRAINS = 5, "Invariances of LayerNorm vs RMSNorm", False


#: Experiment 5's transformations, as named in the report.
INVARIANCE_LABELS = {"input_scaling": "input scaling x → 3x", "weight_scaling": "weight scaling W → 4W",
                     "recentering": "re-centering x → x + 2.5·1"}


def measure_invariances_of_norms(cfg: StudyConfig) -> tuple[dict[str, dict], list[bool]]:
    """``measure_invariances`` of LayerNorm and RMSNorm (fp64, random affine parameters), and whether each
    cell (the three transformations, then the gradient ratio, per norm) matches the paper's Table 1."""
    from normlab.nn import LayerNorm, RMSNorm

    d = cfg.d_model
    g = torch.Generator().manual_seed(cfg.seed)
    norms = {"LayerNorm": LayerNorm(d, eps=1e-12, dtype=torch.float64),
             "RMSNorm": RMSNorm(d, eps=1e-12, dtype=torch.float64)}
    with torch.no_grad():  # a trained-looking affine map, not the identity
        for m in norms.values():
            m.weight.copy_(1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=torch.float64))
    measured = {k: measure_invariances(m, d=d, seed=cfg.seed) for k, m in norms.items()}
    matches = [measured[k][t + "_invariant"] == PAPER_TABLE1[k][t] for t in INVARIANCE_LABELS for k in norms]
    matches += [abs(measured[k]["grad_ratio"] - 1) < 1e-6 for k in norms]
    return measured, matches


def render_invariances(cfg: StudyConfig, out_dir: Path, measured: dict[str, dict], matches: list[bool],
                       verdict: Verdict) -> Experiment:
    d, norms, labels = cfg.d_model, list(measured), INVARIANCE_LABELS
    rows = []
    for t, label in labels.items():
        row = [label]
        for k in norms:
            inv = measured[k][t + "_invariant"]
            row += [measured[k][t], "yes" if PAPER_TABLE1[k][t] else "no", "yes" if inv else "no"]
        rows.append(row)
    grad_cells = [cell for k in norms
                  for cell in (measured[k]["grad_ratio"], "1",
                               "yes" if abs(measured[k]["grad_ratio"] - 1) < 1e-6 else "no")]
    rows.append(["δ·‖∂L/∂(δW)‖ / ‖∂L/∂W‖ (δ = 4)", *grad_cells])
    fig, (ax,) = new_figure(1, 6.5, 3.8)
    xs = range(len(labels))
    for j, k in enumerate(norms):
        vals = [max(measured[k][t], 1e-18) for t in labels]
        ax.bar([x + 0.38 * j for x in xs], vals, width=0.38, label=k)
    ax.axhline(1e-6, color="k", ls=":", label="invariance threshold 1e-6")
    short_labels = [labels[t].split(" ")[0] + " " + labels[t].split(" ")[1] for t in labels]
    ax.set_xticks([x + 0.19 for x in xs], short_labels, fontsize=8)
    ax.set(yscale="log", ylabel="max relative change of the output (fp64)", title="invariances, measured")
    ax.legend(fontsize=8)
    plot = save_figure(fig, out_dir / "exp5_invariances.png")
    measured_txt = (f"{sum(matches)}/{len(matches)} cells match Table 1; RMSNorm changes by "
                    f"{measured['RMSNorm']['recentering']:.2g} under re-centering, every invariant cell ≤ "
                    f"{max(measured[k][t] for k in norms for t in labels if PAPER_TABLE1[k][t]):.1e}; "
                    f"gradient ratio {measured['LayerNorm']['grad_ratio']:.6f} (LN), "
                    f"{measured['RMSNorm']['grad_ratio']:.6f} (RMS)")
    claim = ("LayerNorm is invariant to input scaling, weight-matrix scaling and re-centering; RMSNorm to scaling "
             "but not to re-centering; scale invariance makes ‖∂L/∂W‖ scale as 1/δ when W → δW "
             "(Zhang & Sennrich 2019, Table 1 and §4).")
    notes = [(f"normlab.nn modules in float64 with eps = 1e-12, d = {d}, random affine parameters; x = W h for random "
              "h, W; L = Σ N(x) ⊙ g for a fixed random g. A relative change < 1e-6 counts as invariant.")]
    return Experiment(NUMBER, TITLE, claim, measured_txt, verdict.word,
                      ["transformation", "LN rel. change", "LN paper", "LN measured",
                       "RMS rel. change", "RMS paper", "RMS measured"],
                      rows, plot, notes, data=measured)


def exp5_invariances(cfg: StudyConfig, out_dir: Path) -> Experiment:
    measured, matches = measure_invariances_of_norms(cfg)
    return render_invariances(cfg, out_dir, measured, matches, verdicts.invariances(matches))


def run(ctx: Context) -> Experiment:
    return exp5_invariances(ctx.cfg, ctx.out_dir)
