"""Experiment 6: exact Pre-LN → Pre-RMSNorm conversion, its logit difference and speed (Jiang et al. 2023)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from normlab.bench.timing import median_time
from normlab.study import verdicts
from normlab.study.config import StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, backend_name
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult
from normlab.study.verdicts import FASTER_BY, Verdict

NUMBER, TITLE, TRAINS = 6, "Pre-LN → Pre-RMSNorm conversion", False


CONVERSION_CLAIM = ("A Pre-LN Transformer converts exactly into a Pre-RMSNorm one (re-centre embeddings and the output "
                    "projections of the residual branches, then swap LN for RMSNorm): same outputs, with 1%–10% less "
                    "training/inference time (Jiang et al. 2023, *Pre-RMSNorm and Pre-CRMSNorm Transformers*).")


def measure_conversion(ln: torch.nn.Module, cfg: StudyConfig, corpus: Corpus) -> dict:
    """The trained Pre-LN model ``ln`` against its Pre-RMSNorm conversion: max |logit difference| in fp32 and
    fp64 on 2 validation batches, and forward / forward+backward times (three interleaved medians each)."""
    from normlab.models.convert import pre_ln_to_pre_rmsnorm

    rms = pre_ln_to_pre_rmsnorm(ln).eval()
    x = torch.cat([corpus.batch("val", i, cfg.batch_size, cfg.block_size, cfg.seed)[0] for i in range(2)])
    with torch.no_grad():
        a, b = ln(x)[0], rms(x)[0]
        d32 = (a - b).abs().max().item()
        ln64 = copy.deepcopy(ln).double()
        rms64 = pre_ln_to_pre_rmsnorm(ln64).eval()
        d64 = (ln64(x)[0] - rms64(x)[0]).abs().max().item()
        scale = a.abs().max().item()
    xb = x[: cfg.batch_size]

    def fwd(m):
        with torch.no_grad():
            m(xb)

    def fwd_bwd(m):
        m(xb, xb)[1].backward()

    t = {}
    for label, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        for _ in range(3):  # interleave to share the machine's noise
            for mname, m in (("Pre-LN", ln), ("Pre-RMSNorm (converted)", rms)):
                t.setdefault((label, mname), []).append(median_time(lambda m=m, fn=fn: fn(m), samples=7, min_time=0.02))
    speed = {}
    for label in ("forward", "forward+backward"):
        speed[label] = 100 * (1 - min(t[(label, "Pre-RMSNorm (converted)")]) / min(t[(label, "Pre-LN")]))
    return {"d32": d32, "d64": d64, "scale": scale, "times": t, "speed": speed}


def render_conversion(cfg: StudyConfig, out_dir: Path, data: dict, verdict: Verdict) -> Experiment:
    d32, d64, scale, t, speed = (data[k] for k in ("d32", "d64", "scale", "times", "speed"))
    rows = [["max |logit diff| fp32", d32], ["max |logit diff| fp64", d64], ["max |logit| (scale)", scale]]
    for label in ("forward", "forward+backward"):
        tl, tr = min(t[(label, "Pre-LN")]), min(t[(label, "Pre-RMSNorm (converted)")])
        rows += [[f"{label} ms, Pre-LN", 1e3 * tl], [f"{label} ms, Pre-RMSNorm", 1e3 * tr],
                 [f"{label} time saved", f"{speed[label]:+.1f}%"]]
    fig, (ax_d, ax_t) = new_figure(2, 4.5, 3.6)
    ax_d.bar(["fp32", "fp64"], [max(d32, 1e-18), max(d64, 1e-18)])
    ax_d.set(yscale="log", ylabel="max |logit diff|", title="converted vs original")
    labels = ["forward", "forward+backward"]
    ax_t.bar([0, 2], [1e3 * min(t[(l, "Pre-LN")]) for l in labels], width=0.8, label="Pre-LN")
    ax_t.bar([1, 3], [1e3 * min(t[(l, "Pre-RMSNorm (converted)")]) for l in labels], width=0.8, label="Pre-RMSNorm")
    ax_t.set_xticks([0.5, 2.5], labels)
    ax_t.set(ylabel=f"ms per batch of {cfg.batch_size}×{cfg.block_size}", title="speed")
    ax_t.legend(fontsize=8)
    plot = save_figure(fig, out_dir / "exp6_conversion.png")
    measured = (f"max |logit diff| {d64:.1e} (fp64), {d32:.1e} (fp32, logits up to {scale:.1f}); time saved "
                f"{speed['forward']:+.1f}% forward, {speed['forward+backward']:+.1f}% forward+backward")
    notes = [("Equivalence counts as exact when the fp64 difference is < 1e-9 (fp32: < 1e-3 of the logit scale); "
              f"times are the best of three interleaved medians of 7 on a shared machine — a few % is noise, so faster "
              f"means ≥ {FASTER_BY:g}% less time in both measurements."),
             ("The converted model is what normlab.models.convert.pre_ln_to_pre_rmsnorm builds: RMSNorm plus the "
              "LayerNorm's bias (RMSNorm(x)·w + b), an untied output head "
              "(the embedding is re-centred, the head is not), "
              f"norms on the {backend_name()} backend; the time saved is the norm layers' saving minus those extras.")]
    return Experiment(NUMBER, TITLE, CONVERSION_CLAIM, measured, verdict.word,
                      ["quantity", "value"], rows, plot, notes, data={"d32": d32, "d64": d64, "speed": speed})


def exp6_conversion(results: dict[str, RunResult], cfg: StudyConfig, corpus: Corpus, out_dir: Path) -> Experiment:
    if "layernorm-pre" not in results:
        return Experiment(NUMBER, TITLE, CONVERSION_CLAIM, "needs the layernorm-pre variant",
                          "not measured", ["quantity", "value"], [], None)
    data = measure_conversion(results["layernorm-pre"].load_model(), cfg, corpus)
    verdict = verdicts.conversion(data["d32"], data["d64"], data["scale"], data["speed"]["forward"],
                                  data["speed"]["forward+backward"])
    return render_conversion(cfg, out_dir, data, verdict)


def run(ctx: Context) -> Experiment:
    return exp6_conversion({v: runs[0] for v, runs in ctx.grid.items()}, ctx.cfg, ctx.corpus, ctx.out_dir)
