"""Experiment 2: gradient norm per layer at initialization, Post-LN vs Pre-LN at two depths, in the paper's
setting and the library's default, over seeds (Xiong et al. 2020, Fig. 3)."""

from __future__ import annotations

from pathlib import Path

from normlab.analysis import grad_norm_at_init
from normlab.study import verdicts
from normlab.study.config import StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, below_paper, mean_curve, model_config, pm
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult, build_model
from normlab.study.verdicts import GROWS_ABOVE, Verdict

NUMBER, TITLE, TRAINS = 2, "Gradient norm per layer at initialization", False


#: Experiment 2's two settings: the paper's (Xiong et al.: the original Transformer's Xavier init and ReLU
#: FFN, no extra residual scaling, a final norm only for Pre-LN) and the library's default model.
PAPER_SETTING, DEFAULT_SETTING = "paper's setting", "library default"
SETTINGS = {
    PAPER_SETTING: lambda placement: dict(init="xavier", mlp="relu", final_norm=placement == "pre"),
    DEFAULT_SETTING: lambda placement: {},
}


def grad_model_config(cfg: StudyConfig, vocab_size: int, setting: str, depth: int, placement: str) -> dict:
    """The LayerNorm model of experiment 2 at ``depth`` in ``setting``, at the experiment's width."""
    return model_config(cfg, vocab_size, f"layernorm-{placement}", n_layer=depth, d_model=cfg.grad_d_model,
                        n_head=cfg.grad_n_head, **SETTINGS[setting](placement))


def measure_grad_at_init(cfg: StudyConfig, corpus: Corpus) -> dict[tuple[str, int, str], list[list[float]]]:
    """``(setting, depth, placement) → per seed, ‖∂L/∂W^{2,l}‖ per layer l`` (the MLP's output matrix, as in
    Xiong et al.) of the freshly initialised model, averaged over ``cfg.grad_batches`` training batches.
    Seed ``cfg.seed + s`` sets both the init and the batches."""
    ffn_out = lambda name: "mlp.c_proj.weight" in name
    curves: dict[tuple[str, int, str], list[list[float]]] = {}
    for setting in SETTINGS:
        for depth in cfg.grad_depths:
            for placement in ("post", "pre"):
                per_seed = []
                for s in range(cfg.grad_seeds):
                    seed = cfg.seed + s
                    mc = grad_model_config(cfg, corpus.vocab_size, setting, depth, placement)
                    model = build_model(mc, seed).train()
                    acc: dict[int, float] = {}
                    for i in range(cfg.grad_batches):
                        x, y = corpus.batch("train", i, cfg.grad_batch_size, cfg.block_size, seed)
                        for k, v in grad_norm_at_init(model, x, y, include=ffn_out).items():
                            acc[k] = acc.get(k, 0.0) + v / cfg.grad_batches
                    per_seed.append([acc[k] for k in sorted(acc)])
                curves[(setting, depth, placement)] = per_seed
    return curves


def grad_ratios(curves: dict[tuple[str, int, str], list[list[float]]], setting: str = PAPER_SETTING
                ) -> dict[tuple[int, str], list[float]]:
    """Per-seed last/first-layer ratios per ``(depth, placement)`` in ``setting``."""
    return {(d, p): [g[-1] / g[0] for g in per_seed] for (s, d, p), per_seed in curves.items() if s == setting}


def render_grad_at_init(cfg: StudyConfig, out_dir: Path, curves: dict[tuple[str, int, str], list[list[float]]],
                        verdict: Verdict, results: dict[str, RunResult] | None = None) -> Experiment:
    def rows_of(setting: str) -> list[list]:
        rows = []
        for (s, depth, placement), per_seed in curves.items():
            if s == setting:
                mean, _ = mean_curve(per_seed)
                rows.append([depth, f"{placement}-LN", mean[0], mean[len(mean) // 2], mean[-1],
                             pm([g[-1] / g[0] for g in per_seed])])
        return rows

    headers = ["layers", "placement", "‖∇‖ layer 1", "‖∇‖ middle", "‖∇‖ last", "last / first (mean ± std)"]
    trained = {n: r for n, r in (results or {}).items() if any("layer_grad_norm" in x for x in r.records)}
    fig, axes = new_figure(len(SETTINGS) + bool(trained), 5.5, 4)
    if trained:  # per-layer gradient norms recorded while the grid trained (all weight matrices of a layer)
        ax = axes[-1]
        for name, r in trained.items():
            recs = [x for x in r.records if "layer_grad_norm" in x]
            last = recs[-1]["layer_grad_norm"]
            ax.plot([int(k) + 1 for k in last], list(last.values()), marker="o",
                    label=f"{name}, step {recs[-1]['step']}")
        ax.set(xlabel="layer l", ylabel="‖∂L/∂W‖ (all matrices of the layer)", yscale="log",
               title="end of training (experiment 1 grid)")
        ax.legend(fontsize=6)
    for ax, setting in zip(axes, SETTINGS):
        for depth in cfg.grad_depths:
            for placement in ("post", "pre"):
                mean, std = mean_curve(curves[(setting, depth, placement)])
                layers = range(1, len(mean) + 1)
                line = ax.plot(layers, mean, marker="o", ms=3, ls="-" if placement == "post" else "--",
                               label=f"{placement}-LN, {depth} layers")[0]
                ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2)
        ax.set(xlabel="layer l", ylabel="‖∂L/∂W^{2,l}‖ (MLP output matrix)", yscale="log",
               title=f"at initialization — {setting} (band: ± 1 std over seeds)")
        ax.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp2_grad_init.png")
    ratio = grad_ratios(curves)
    per_depth = "; ".join(f"{d} layers Post-LN {pm(ratio[(d, 'post')])}, Pre-LN {pm(ratio[(d, 'pre')])}"
                          for d in cfg.grad_depths)
    measured = (f"last/first-layer gradient ratio, paper's setting, d={cfg.grad_d_model}, {cfg.grad_seeds} seeds: "
                + per_depth)
    claim = ("At initialization the gradient norm of Post-LN's weights grows with the layer index (large near the "
             "output), while Pre-LN's does not grow — the reason Post-LN needs warmup "
             "(Xiong et al. 2020, *On Layer Normalization in the Transformer Architecture*, Fig. 3).")
    notes = [(f"One forward/backward of the freshly initialised LayerNorm model (d={cfg.grad_d_model}, "
              f"{cfg.grad_n_head} heads, context {cfg.block_size}) on {cfg.grad_batches} training batch(es) of "
              f"{cfg.grad_batch_size} sequences; per layer the gradient norm of the MLP's output matrix W^{{2,l}}. "
              f"Seeds {cfg.seed}…{cfg.seed + cfg.grad_seeds - 1} set both the init and the batches."),
             ("The paper's setting: Xavier-uniform Linears (q, k, v each its own matrix), zero biases, embeddings "
              "N(0, 1/d), ReLU FFN, no extra scaling of the residual branches, a final LayerNorm for Pre-LN only. "
              "The library default (second table) is nanoGPT's: N(0, 0.02), residual output projections scaled by "
              "1/√(2·layers), GELU — that scaling shrinks every branch and hides the effect."),
             ("Per seed (one init, its batches), Post-LN's last/first ratio ranges "
              + "; ".join(f"{min(ratio[(d, 'post')]):.2f}–{max(ratio[(d, 'post')]):.2f} at {d} layers"
                          for d in cfg.grad_depths)
              + ": one init's ratio varies this much, so a figure from a single init is one draw; the verdict asks "
                "the growth of every init, not only of their mean, to clear 1."),
             (f"Holds when Post-LN's last/first ratio at the deepest depth has mean − {verdicts.SPREAD_K:g}·std > "
              f"{GROWS_ABOVE:g} (the last layer's gradient larger than the first's beyond the seeds' spread) and "
              "Pre-LN's does not at any depth; partly when only one of the two.")]
    return Experiment(NUMBER, TITLE, claim, measured, verdict.word,
                      headers, rows_of(PAPER_SETTING), plot, notes,
                      [("Library default init (nanoGPT's):", headers, rows_of(DEFAULT_SETTING))],
                      data={f"{s}|{d}|{p}": g for (s, d, p), g in curves.items()},
                      below_paper=below_paper({"layers": (max(cfg.grad_depths), 12), "d": (cfg.grad_d_model, 512)}))


def exp2_grad_at_init(cfg: StudyConfig, corpus: Corpus, out_dir: Path,
                      results: dict[str, RunResult] | None = None) -> Experiment:
    """‖∂L/∂W^{2,l}‖ at initialization, Post-LN vs Pre-LN at two depths, in the paper's setting and the
    library's default, over seeds."""
    curves = measure_grad_at_init(cfg, corpus)
    verdict = verdicts.grad_at_init(grad_ratios(curves))
    return render_grad_at_init(cfg, out_dir, curves, verdict, results)


def run(ctx: Context) -> Experiment:
    return exp2_grad_at_init(ctx.cfg, ctx.corpus, ctx.out_dir, {v: runs[0] for v, runs in ctx.grid.items()})
