"""Experiment 4: ``cos(h, 1)`` of the inputs to every norm layer vs the random baseline, and LayerNorm's
irreversibility (Gupta, Ozdemir & Anumanchipalli 2024)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from normlab.analysis import ActivationStats, cos_uniform, find_norm_layers, irreversibility, random_baseline
from normlab.study import verdicts
from normlab.study.config import StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, below_paper
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult, build_model
from normlab.study.verdicts import GEOMETRY_TOLERANCE, Verdict

NUMBER, TITLE, TRAINS = 4, "Geometry: cos(h, 1) of norm inputs, irreversibility", False


def norm_input_cos(model: torch.nn.Module, batches: list[torch.Tensor]
                   ) -> tuple[dict[str, float], dict[str, list[torch.Tensor]]]:
    """Mean ``|cos(h, 1)|`` of the inputs ``h`` of every norm layer of ``model`` over ``batches``, in
    forward order, and the captured inputs."""
    model.eval()
    with torch.no_grad(), ActivationStats(model, keep_inputs=True) as rec:
        for x in batches:
            model(x)
    out = {}
    for name in rec.order:
        h = torch.cat([t.reshape(-1, t.shape[-1]) for t in rec.inputs[name]])
        out[name] = cos_uniform(h).abs().mean().item()
    return out, rec.inputs


def measure_geometry(results: dict[str, RunResult], cfg: StudyConfig, corpus: Corpus) -> dict:
    """Mean |cos(h, 1)| of every norm layer's inputs at init and trained, against the random baseline; and,
    for each trained LayerNorm model, irreversibility on the captured inputs (the fp64 formula, and the
    trained modules under h → h + c·1)."""
    batches = [corpus.batch("val", i, cfg.batch_size, cfg.block_size, cfg.seed)[0] for i in range(2)]
    base = random_baseline(cfg.d_model)
    rows, per_layer, irrev_rows = [], {}, []
    ln_ratios = []
    for name, r in results.items():
        trained = r.load_model()
        if not find_norm_layers(trained):
            continue
        at_init, _ = norm_input_cos(build_model(r.config.model, r.config.seed), batches)
        after, inputs = norm_input_cos(trained, batches)
        per_layer[name] = after
        mean_after = sum(after.values()) / len(after)
        worst = max(after, key=after.get)
        mean_at_init = sum(at_init.values()) / len(at_init)
        rows.append([name, mean_at_init, mean_after, worst.replace("transformer.", ""), after[worst],
                     base, mean_after / base])
        if name.startswith("layernorm"):
            ln_ratios.append(mean_after / base)
            layers = dict(find_norm_layers(trained))
            worst_formula, worst_module = 0.0, 0.0
            for lname, hs in inputs.items():
                h = torch.cat([t.reshape(-1, t.shape[-1]) for t in hs]).double()
                worst_formula = max(worst_formula, irreversibility(h, alpha=3.0, c=5.0))
                layer64 = copy.deepcopy(layers[lname]).double()  # the trained LN with its eps and affine map
                c = 5.0 * h.pow(2).mean().sqrt()
                with torch.no_grad():
                    y, y2 = layer64(h), layer64(h + c)
                worst_module = max(worst_module, ((y2 - y).abs().max() / y.abs().max()).item())
            irrev_rows.append([name, worst_formula, worst_module])
    return {"rows": rows, "per_layer": per_layer, "irrev_rows": irrev_rows, "ln_ratios": ln_ratios, "baseline": base}


def render_geometry(results: dict[str, RunResult], cfg: StudyConfig, out_dir: Path, data: dict,
                    verdict: Verdict | None) -> Experiment:
    rows, per_layer, irrev_rows = data["rows"], data["per_layer"], data["irrev_rows"]
    ln_ratios, base = data["ln_ratios"], data["baseline"]
    fig, (ax, ax_t) = new_figure(2, 6, 4)
    for name, after in per_layer.items():
        ax.plot(range(len(after)), list(after.values()), marker="o", label=name)
    ax.axhline(base, color="k", ls=":", label=f"random baseline √(2/π)/√d = {base:.3f}")
    ax.set(xlabel="norm layer (forward order)", ylabel="mean |cos(h, 1)| of the norm's input", yscale="log",
           title="alignment of norm inputs with 1, trained models")
    ax.legend(fontsize=7)
    for name in per_layer:  # the activation statistics recorded at every evaluation during training
        evals = [r for r in results[name].records if r["kind"] == "eval" and r.get("act")]
        if evals:
            mean_cos = [sum(v["in_abs_cos"] for v in r["act"].values()) / len(r["act"]) for r in evals]
            ax_t.plot([r["step"] for r in evals], mean_cos, marker="o", ms=3, label=name)
    ax_t.axhline(base, color="k", ls=":")
    ax_t.set(xlabel="step", ylabel="mean over layers of mean |cos(h, 1)|", yscale="log", title="during training")
    ax_t.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp4_geometry.png")
    claim = ("The inputs to LayerNorm in trained models are nearly orthogonal to the uniform vector 1 "
             "(|cos(h, 1)| at the level of random vectors), so LayerNorm's mean removal is redundant and RMSNorm "
             "suffices; LayerNorm irreversibly discards the mean and scale: LN(αx + c·1) = LN(x) "
             "(Gupta, Ozdemir & Anumanchipalli 2024, *Geometric Interpretation of Layer Normalization and a "
             "Comparative Analysis with RMSNorm*).")
    if verdict is not None:
        word = verdict.word
        ratios = ", ".join(f"{x:.2f}×" for x in ln_ratios)
        worst_formula = max(r[1] for r in irrev_rows)
        worst_module = max(r[2] for r in irrev_rows)
        measured = (f"trained LayerNorm models: mean |cos(h, 1)| = {ratios} the random "
                    f"baseline {base:.3f}; irreversibility max |LN(3h + 5·1) − LN(h)| = "
                    f"{worst_formula:.1e} (fp64, eps 0); trained modules under h + c·1: {worst_module:.1e} relative")
    else:
        word, measured = "not measured", "needs a trained layernorm-* variant"
    notes = [(f"Inputs of every norm layer captured with forward hooks on 2 validation batches "
              f"({2 * cfg.batch_size * cfg.block_size} vectors of d={cfg.d_model}). At initialization they are at the "
              "baseline already (random embeddings; Post-LN's are centred by construction), so what the verdict tests "
              "is that training does not move them away from it."),
             (f"'At the baseline' means mean |cos| ≤ {GEOMETRY_TOLERANCE:g}× √(2/π)/√d; irreversibility holds when the "
              "fp64 formula (eps = 0) differs by < 1e-12 and the trained modules (fp64 copy, their own eps and affine "
              "map) change by < 1e-9 relative under h → h + c·1, c = 5·rms(h). Scaling is checked with eps = 0 only: "
              "with eps > 0, LN(αh) ≠ LN(h) exactly when var(h) is not ≫ eps "
              "(the residual stream at init has var ≈ 4e-4).")]
    extra = [("Irreversibility on the captured inputs h of every LayerNorm (α = 3, c = 5):",
              ["variant", "max |LN(αh+c·1) − LN(h)| (fp64, eps 0)",
               "max rel. change of the trained modules under h + c·1"], irrev_rows)]
    return Experiment(NUMBER, TITLE, claim, measured, word,
                      ["variant", "mean |cos| at init", "mean |cos| trained", "largest layer", "its |cos|", "baseline",
                       "trained / baseline"], rows, plot, notes, extra, data={"per_layer": per_layer, "baseline": base},
                      below_paper=below_paper({"d_model": (cfg.d_model, 768)}))


def exp4_geometry(results: dict[str, RunResult], cfg: StudyConfig, corpus: Corpus, out_dir: Path) -> Experiment:
    data = measure_geometry(results, cfg, corpus)
    verdict = None
    if data["ln_ratios"]:
        verdict = verdicts.geometry(data["ln_ratios"], [(r[1], r[2]) for r in data["irrev_rows"]])
    return render_geometry(results, cfg, out_dir, data, verdict)


def run(ctx: Context) -> Experiment:
    return exp4_geometry({v: runs[0] for v, runs in ctx.grid.items()}, ctx.cfg, ctx.corpus, ctx.out_dir)
