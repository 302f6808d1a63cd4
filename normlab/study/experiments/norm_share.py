"""Experiment 7: the norm layers' share of a training step across widths, the bound on RMSNorm's
end-to-end saving."""

from __future__ import annotations

from pathlib import Path

from normlab.bench.timing import interleaved_medians
from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, below_paper, pm, run_config
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import build_model, clip_and_step, make_optimizer
from normlab.study.verdicts import Verdict

NUMBER, TITLE, TRAINS = 7, "Norm layers' share of a training step across widths", False


SHARE_VARIANTS = {"LayerNorm": "layernorm-pre", "RMSNorm": "rmsnorm-pre", "identity": "none-pre"}


def _training_step(rc: RunConfig, corpus: Corpus):
    """The study's training step (forward, backward, gradient clipping, AdamW update, as in
    :mod:`normlab.study.train`) of a fresh model on its first batch."""
    model = build_model(rc.model, rc.seed).train()
    opt = make_optimizer(model, rc)
    x, y = corpus.batch("train", 0, rc.batch_size, rc.model["block_size"], rc.seed)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        clip_and_step(model, opt, rc.grad_clip)

    return step


def measure_norm_share(cfg: StudyConfig, corpus: Corpus) -> dict[int, dict[str, list[float]]]:
    """``width → {"LayerNorm" | "RMSNorm" | "identity": seconds per step, one per repeat}``: the study's model
    at each width (a head per 32 channels) with LayerNorm, RMSNorm and identity norms, timed round-robin
    (medians of 7 interleaved samples) ``cfg.share_repeats`` times."""
    out: dict[int, dict[str, list[float]]] = {}
    for d in cfg.share_widths:
        steps = {name: _training_step(run_config(cfg, corpus, variant, d_model=d, n_head=max(1, d // 32)), corpus)
                 for name, variant in SHARE_VARIANTS.items()}
        out[d] = {name: [] for name in steps}
        for _ in range(cfg.share_repeats):
            medians = interleaved_medians(steps, lambda: None, samples=7, min_time=0.02)
            for name, t in medians.items():
                if isinstance(t, Exception):
                    raise t
                out[d][name].append(t)
    return out


def share_percents(times: dict[int, dict[str, list[float]]]) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Per width and repeat: the percent of LayerNorm's step spent in its norms (against identity norms) and
    the percent RMSNorm saves."""
    shares = {d: [100 * (1 - i / ln) for ln, i in zip(t["LayerNorm"], t["identity"])] for d, t in times.items()}
    savings = {d: [100 * (1 - r / ln) for ln, r in zip(t["LayerNorm"], t["RMSNorm"])] for d, t in times.items()}
    return shares, savings


def render_norm_share(cfg: StudyConfig, out_dir: Path, times: dict[int, dict[str, list[float]]],
                      verdict: Verdict) -> Experiment:
    shares, savings = share_percents(times)
    rows = [[d, 1e3 * verdicts.mean_std(t["LayerNorm"])[0], 1e3 * verdicts.mean_std(t["identity"])[0],
             pm(shares[d]) + " %", pm(savings[d]) + " %"] for d, t in times.items()]
    fig, (ax,) = new_figure(1, 6.5, 4)
    widths = list(times)
    for label, values in (("norm layers' share (LayerNorm vs identity)", shares), ("RMSNorm's saving", savings)):
        stats = [verdicts.mean_std(values[d]) for d in widths]
        ax.errorbar(widths, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
    ax.axhline(verdicts.TINY_SHARE, color="k", ls=":", lw=1, label=f"{verdicts.TINY_SHARE:g}%")
    ax.set(xscale="log", xlabel="d_model", ylabel="% of a training step", title="norm layers in a training step")
    ax.set_xticks(widths, [str(d) for d in widths])
    ax.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp7_norm_share.png")
    widest = max(widths)
    measured = (f"norm layers' share of a training step {pm(shares[widest])}% at d={widest} "
                f"({', '.join(f'{pm(shares[d])}% at d={d}' for d in widths if d != widest)}); "
                f"RMSNorm saves {pm(savings[widest])}% of the step at d={widest}")
    claim = ("LayerNorm is a tiny fraction of a Transformer's compute, which bounds what a cheaper norm can save "
             "end to end — against RMSNorm's reported 7%–64% (Zhang & Sennrich 2019).")
    notes = [(f"The study's model ({cfg.n_layer} layers, context {cfg.block_size}, batch {cfg.batch_size}, "
              "a head per 32 channels) at each width, the grid's training step (forward, backward, gradient "
              "clipping, fused AdamW) on a fixed batch, with LayerNorm, RMSNorm and identity norms (norm='none'); "
              "the three are timed round-robin, medians of 7 samples of ≥ 20 ms, "
              f"repeated {cfg.share_repeats} times (± is the std over the repeats)."),
             (f"Holds when, at the widest width, the share's mean + {verdicts.SPREAD_K:g}·std is below "
              f"{verdicts.TINY_SHARE:g}% and RMSNorm's saving stays within the share (beyond the spread) at every "
              "width; partly when one of the two.")]
    return Experiment(NUMBER, TITLE, claim, measured, verdict.word,
                      ["d_model", "LayerNorm step ms", "identity-norm step ms", "norm share", "RMSNorm saving"], rows,
                      plot, notes, data={str(d): t for d, t in times.items()},
                      below_paper=below_paper({"widest d_model": (widest, 1024)}))


def exp7_norm_share(cfg: StudyConfig, corpus: Corpus, out_dir: Path) -> Experiment:
    times = measure_norm_share(cfg, corpus)
    return render_norm_share(cfg, out_dir, times, verdicts.norm_share(*share_percents(times)))


def run(ctx: Context) -> Experiment:
    return exp7_norm_share(ctx.cfg, ctx.corpus, ctx.out_dir)
