"""The six experiments of the study: each measures one published claim and returns an
:class:`~normlab.study.report.Experiment` (table, plot, claim, measured result, verdict).

1. loss and speed of every variant (Zhang & Sennrich 2019: RMSNorm as good as LayerNorm, faster);
2. gradient norm per layer at initialization, Post-LN vs Pre-LN at two depths (Xiong et al. 2020);
3. warmup sensitivity at a high learning rate, Post-LN vs Pre-LN (Xiong et al. 2020);
4. ``cos(h, 1)`` of the inputs to every norm layer vs the random baseline; irreversibility
   (Gupta et al. 2024);
5. invariances of LayerNorm vs RMSNorm (Zhang & Sennrich 2019, Table 1);
6. exact Pre-LN → Pre-RMSNorm conversion: max logit difference and speed (Jiang et al. 2023);
7. the norm layers' share of a training step across widths, the bound on RMSNorm's end-to-end saving.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import torch

from normlab.analysis import (
    PAPER_TABLE1,
    ActivationStats,
    cos_uniform,
    find_norm_layers,
    grad_norm_at_init,
    irreversibility,
    measure_invariances,
    random_baseline,
)
from normlab.bench.timing import interleaved_medians, median_time
from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig, parse_variant
from normlab.study.data import Corpus
from normlab.study.distributed import DistInfo
from normlab.study.report import Experiment, fmt, new_figure, save_figure
from normlab.study.train import RunResult, build_model, train_run
from normlab.study.verdicts import COMPARABLE_NATS, FASTER_BY, GEOMETRY_TOLERANCE, GROWS_ABOVE, Verdict


def model_config(cfg: StudyConfig, vocab_size: int, variant: str, **overrides) -> dict:
    """The ``GPTConfig`` dict of ``variant`` (``<norm>-<placement>``) at the study's model size."""
    from normlab.models import GPTConfig

    norm, placement = parse_variant(variant)
    kw = dict(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
              d_model=cfg.d_model, norm=norm, placement=placement)
    kw.update(overrides)
    c = GPTConfig.preset(cfg.preset, **kw) if cfg.preset else GPTConfig(**kw)
    return c.to_dict()


def run_config(cfg: StudyConfig, corpus: Corpus, variant: str, **overrides) -> RunConfig:
    model_over = {k: overrides.pop(k) for k in list(overrides) if k in ("n_layer",)}
    rc = RunConfig(
        model=model_config(cfg, corpus.vocab_size, variant, **model_over),
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio,
        warmup=cfg.warmup_iters, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed,
        beta1=cfg.beta1, beta2=cfg.beta2,
        eval_interval=min(cfg.eval_interval, cfg.steps), eval_iters=cfg.eval_iters, data=corpus.source,
        data_digest=corpus.digest,
    )
    return replace(rc, **overrides)


def _backend_name() -> str:
    """The backend that serves a CPU fp32 norm here (the dispatch's choice)."""
    from normlab import dispatch

    try:
        return dispatch.select("layer_norm", torch.zeros(2, 8), None)
    except Exception:  # noqa: BLE001 — only for a note in the report
        return "default"


# ---------------------------------------------------------------------------------------------------
# 1. Loss and speed
# ---------------------------------------------------------------------------------------------------
def measure_loss_and_speed(results: dict[str, RunResult], cfg: StudyConfig) -> dict:
    """Experiment 1's measurements beyond the runs' own: forward+backward time of one norm layer of the
    trained layernorm-pre and rmsnorm-pre models at the model's activation shape, best of three
    interleaved medians; and RMSNorm's quality and time saving against LayerNorm where both ran."""
    micro: dict[str, float] = {}
    shape = (cfg.batch_size * cfg.block_size, cfg.d_model)
    steps = {}
    for name in ("layernorm-pre", "rmsnorm-pre"):
        if name in results:
            layer = find_norm_layers(results[name].load_model())[0][1].train()
            x = torch.randn(shape, requires_grad=True)
            g = torch.randn(shape)

            def step(layer=layer, x=x, g=g):
                layer(x).backward(g)

            steps[name] = step
    for _ in range(3):  # interleaved rounds share the machine's noise; keep each layer's best median
        for name, step in steps.items():
            micro[name] = min(micro.get(name, float("inf")), median_time(step, samples=7, min_time=0.02))
    data = {"micro_s": micro, "shape": shape}
    if "layernorm-pre" in results and "rmsnorm-pre" in results:
        ln, rms = results["layernorm-pre"].final, results["rmsnorm-pre"].final
        data.update(
            val_loss_delta=rms["final_val_loss"] - ln["final_val_loss"],
            in_train_saving=100 * (1 - rms["norm_ms"] / ln["norm_ms"]) if ln["norm_ms"] > 0 else float("nan"),
            isolated_saving=100 * (1 - micro["rmsnorm-pre"] / micro["layernorm-pre"]),
            step_saving=100 * (1 - rms["step_ms"] / ln["step_ms"]),
        )
    return data


def render_loss_and_speed(results: dict[str, RunResult], cfg: StudyConfig, out_dir: Path, data: dict,
                          verdict: Verdict | None) -> Experiment:
    rows = []
    for name, r in results.items():
        f = r.final
        rows.append([name, f["init_val_loss"], f["final_val_loss"], f["final_train_loss"], f["wall_s"], f["step_ms"],
                     f["tokens_per_s"], f["norm_ms"], 100 * f["norm_frac"]])
    fig, (ax_loss, ax_time) = new_figure(2)
    for name, r in results.items():
        s, v = r.val_curve()
        line = ax_loss.plot(s, v, marker="o", ms=3, label=f"{name} (val)")[0]
        ts, tl = r.train_curve()
        k = max(1, len(tl) // 40)
        sm = [sum(tl[max(0, i - k + 1) : i + 1]) / len(tl[max(0, i - k + 1) : i + 1]) for i in range(len(tl))]
        ax_loss.plot(ts, sm, color=line.get_color(), alpha=0.35, lw=1)
    ax_loss.set(xlabel="step", ylabel="loss (nats/char)", title="validation (markers) and train (faint) loss")
    ax_loss.set_ylim(top=min(ax_loss.get_ylim()[1], 4.8))
    ax_loss.legend(fontsize=7)
    names = list(results)
    norm_ms = [results[n].final["norm_ms"] for n in names]
    rest_ms = [results[n].final["step_ms"] - results[n].final["norm_ms"] for n in names]
    ax_time.barh(names, norm_ms, label="inside norm layers")
    ax_time.barh(names, rest_ms, left=norm_ms, label="rest of the step", alpha=0.5)
    ax_time.set(xlabel="ms per training step (median)", title="time inside norm layers vs the rest")
    ax_time.legend(fontsize=7)
    plot = save_figure(fig, out_dir / "exp1_loss_speed.png")

    claim = ("RMSNorm reaches quality comparable to LayerNorm while reducing running time by 7%–64% "
             "(Zhang & Sennrich 2019, *Root Mean Square Layer Normalization*).")
    notes, word, measured = [], "not measured", "needs the layernorm-pre and rmsnorm-pre variants"
    extra = []
    if verdict is not None:
        ln, rms = results["layernorm-pre"].final, results["rmsnorm-pre"].final
        micro, shape, isolated = data["micro_s"], data["shape"], data["isolated_saving"]
        word = verdict.word
        measured = (f"Pre-RMSNorm val loss {fmt(rms['final_val_loss'])} vs Pre-LN {fmt(ln['final_val_loss'])} "
                    f"(Δ {data['val_loss_delta']:+.3f}); time saved by RMSNorm in the norm layers {isolated:+.1f}% "
                    f"in isolation, {data['in_train_saving']:+.1f}% in training; whole training step "
                    f"{data['step_saving']:+.1f}%")
        extra.append((("Isolated forward+backward of one norm layer at the model's activation shape "
                       f"{shape[0]}×{shape[1]} (best of three interleaved medians of 7):"),
                      ["layer", "µs", "RMSNorm saving"],
                      [["LayerNorm (layernorm-pre)", 1e6 * micro["layernorm-pre"], ""],
                       ["RMSNorm (rmsnorm-pre)", 1e6 * micro["rmsnorm-pre"], f"{isolated:+.1f}%"]]))
        notes.append("Quality counts as comparable when the final validation losses differ by "
                     f"≤ {COMPARABLE_NATS:g} nats/char; faster means ≥ {FASTER_BY:g}% less forward+backward time "
                     "of the norm layer in the isolated measurement (best of "
                     "three interleaved medians of 7). The in-training norm time is reported too, but the variants "
                     "train one after another, so on a shared machine it also measures the load of the moment.")
    for name, r in results.items():
        if parse_variant(name)[0] == "dyt":
            notes.append(_dyt_saturation_note(name, r, cfg))
    shares = [100 * r.final["norm_frac"] for r in results.values() if r.final["norm_ms"] > 0]
    if shares:
        notes.append(f"Norm time is measured with forward/backward hooks on the norm modules (fwd + bwd): "
                     f"{min(shares):.0f}–{max(shares):.0f}% of a training step here, so even a large saving inside the "
                     "norm layers moves the whole step by a few % — about the timing noise of a shared machine.")
    return Experiment(1, "Loss curves and speed per variant", claim, measured, word,
                      ["variant", "val loss @0", "final val loss", "final train loss", "wall s", "step ms", "tokens/s",
                       "norm ms/step", "norm %"], rows, plot, notes, extra,
                      data={"micro_s": data["micro_s"]})


def exp1_loss_and_speed(results: dict[str, RunResult], cfg: StudyConfig, out_dir: Path) -> Experiment:
    data = measure_loss_and_speed(results, cfg)
    verdict = None
    if "val_loss_delta" in data:
        verdict = verdicts.loss_and_speed(data["val_loss_delta"], data["isolated_saving"])
    return render_loss_and_speed(results, cfg, out_dir, data, verdict)


def _dyt_saturation_note(name: str, r: RunResult, cfg: StudyConfig) -> str:
    """How much of a trained DyT model's tanh is saturated (|αx| > 9: tanh rounds to ±1 in fp32 and its
    derivative to 0), and from which logged step its blocks got exactly zero gradient."""
    from normlab.study.data import load_corpus

    model = r.load_model()
    corpus = load_corpus(None if r.config.data.startswith("builtin:") else r.config.data)
    x = corpus.batch("val", 0, cfg.batch_size, r.config.model["block_size"], cfg.seed)[0]
    with torch.no_grad(), ActivationStats(model, keep_inputs=True) as rec:
        model(x)
    layers = dict(find_norm_layers(model))
    if not rec.order:
        return f"{name}: no DyT layer ran (placement without norms)."
    last = rec.order[-1]
    h = rec.inputs[last][0]
    sat = (layers[last].alpha.detach().abs() * h.abs() > 9).double().mean().item()
    dead = [g["step"] for g in r.records
            if "layer_grad_norm" in g and g["layer_grad_norm"] and not any(g["layer_grad_norm"].values())]
    text = (f"{name}: the input of its last DyT ({last.replace('transformer.', '')}) has rms "
            f"{h.double().pow(2).mean().sqrt().item():.3g}; {100 * sat:.0f}% of its entries saturate tanh (|αx| > 9, "
            "where tanh' rounds to 0 in fp32)")
    if dead:
        text += (f", and from logged step {dead[0]} on every block's gradient is exactly 0 — only the embeddings and "
                 "the head train")
    return text + (". DyT (Zhu et al. 2025) has no statistics to bound the residual stream; "
                   "its paper tunes α₀ per model (α₀ = 0.5 here).")


# ---------------------------------------------------------------------------------------------------
# 2. Gradient norm at initialization
# ---------------------------------------------------------------------------------------------------
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


def _mean_curve(per_seed: list[list[float]]) -> tuple[list[float], list[float]]:
    stats = [verdicts.mean_std([g[i] for g in per_seed]) for i in range(len(per_seed[0]))]
    return [m for m, _ in stats], [s for _, s in stats]


def _pm(values: list[float]) -> str:
    mean, std = verdicts.mean_std(values)
    return f"{mean:.3g} ± {std:.2g}"


def render_grad_at_init(cfg: StudyConfig, out_dir: Path, curves: dict[tuple[str, int, str], list[list[float]]],
                        verdict: Verdict, results: dict[str, RunResult] | None = None) -> Experiment:
    def rows_of(setting: str) -> list[list]:
        rows = []
        for (s, depth, placement), per_seed in curves.items():
            if s == setting:
                mean, _ = _mean_curve(per_seed)
                rows.append([depth, f"{placement}-LN", mean[0], mean[len(mean) // 2], mean[-1],
                             _pm([g[-1] / g[0] for g in per_seed])])
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
                mean, std = _mean_curve(curves[(setting, depth, placement)])
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
    per_depth = "; ".join(f"{d} layers Post-LN {_pm(ratio[(d, 'post')])}, Pre-LN {_pm(ratio[(d, 'pre')])}"
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
             (f"Holds when Post-LN's last/first ratio at the deepest depth has mean − {verdicts.SPREAD_K:g}·std > "
              f"{GROWS_ABOVE:g} (the last layer's gradient larger than the first's beyond the seeds' spread) and "
              "Pre-LN's does not at any depth; partly when only one of the two.")]
    if max(cfg.grad_depths) < 12 or cfg.grad_d_model < 512:
        notes.append(f"Below the paper's scale (6 and 12 layers, d=512): deepest {max(cfg.grad_depths)} layers, "
                     f"d={cfg.grad_d_model}.")
    return Experiment(2, "Gradient norm per layer at initialization", claim, measured, verdict.word,
                      headers, rows_of(PAPER_SETTING), plot, notes,
                      [("Library default init (nanoGPT's):", headers, rows_of(DEFAULT_SETTING))],
                      data={f"{s}|{d}|{p}": g for (s, d, p), g in curves.items()})


def exp2_grad_at_init(cfg: StudyConfig, corpus: Corpus, out_dir: Path,
                      results: dict[str, RunResult] | None = None) -> Experiment:
    """‖∂L/∂W^{2,l}‖ at initialization, Post-LN vs Pre-LN at two depths, in the paper's setting and the
    library's default, over seeds."""
    curves = measure_grad_at_init(cfg, corpus)
    verdict = verdicts.grad_at_init(grad_ratios(curves))
    return render_grad_at_init(cfg, out_dir, curves, verdict, results)


# ---------------------------------------------------------------------------------------------------
# 3. Warmup sensitivity
# ---------------------------------------------------------------------------------------------------
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
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size).double()
    prob = counts[counts > 0] / counts.sum()
    unigram = -(prob * prob.log()).sum().item()  # the loss of predicting character frequencies only
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
    return Experiment(3, "Warmup sensitivity at a high learning rate", claim, measured, word,
                      ["placement", "warmup", "final val loss", "final train loss", "diverged"], rows, plot, notes,
                      data={"post_cost": post_cost, "pre_cost": pre_cost})


# ---------------------------------------------------------------------------------------------------
# 4. Geometry
# ---------------------------------------------------------------------------------------------------
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
    return Experiment(4, "Geometry: cos(h, 1) of norm inputs, irreversibility", claim, measured, word,
                      ["variant", "mean |cos| at init", "mean |cos| trained", "largest layer", "its |cos|", "baseline",
                       "trained / baseline"], rows, plot, notes, extra, data={"per_layer": per_layer, "baseline": base})


def exp4_geometry(results: dict[str, RunResult], cfg: StudyConfig, corpus: Corpus, out_dir: Path) -> Experiment:
    data = measure_geometry(results, cfg, corpus)
    verdict = None
    if data["ln_ratios"]:
        verdict = verdicts.geometry(data["ln_ratios"], [(r[1], r[2]) for r in data["irrev_rows"]])
    return render_geometry(results, cfg, out_dir, data, verdict)


# ---------------------------------------------------------------------------------------------------
# 5. Invariances
# ---------------------------------------------------------------------------------------------------
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
    return Experiment(5, "Invariances of LayerNorm vs RMSNorm", claim, measured_txt, verdict.word,
                      ["transformation", "LN rel. change", "LN paper", "LN measured",
                       "RMS rel. change", "RMS paper", "RMS measured"],
                      rows, plot, notes, data=measured)


def exp5_invariances(cfg: StudyConfig, out_dir: Path) -> Experiment:
    measured, matches = measure_invariances_of_norms(cfg)
    return render_invariances(cfg, out_dir, measured, matches, verdicts.invariances(matches))


# ---------------------------------------------------------------------------------------------------
# 6. Pre-LN → Pre-RMSNorm conversion
# ---------------------------------------------------------------------------------------------------
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
              f"norms on the {_backend_name()} backend; the time saved is the norm layers' saving minus those extras.")]
    return Experiment(6, "Pre-LN → Pre-RMSNorm conversion", CONVERSION_CLAIM, measured, verdict.word,
                      ["quantity", "value"], rows, plot, notes, data={"d32": d32, "d64": d64, "speed": speed})


def exp6_conversion(results: dict[str, RunResult], cfg: StudyConfig, corpus: Corpus, out_dir: Path) -> Experiment:
    if "layernorm-pre" not in results:
        return Experiment(6, "Pre-LN → Pre-RMSNorm conversion", CONVERSION_CLAIM, "needs the layernorm-pre variant",
                          "not measured", ["quantity", "value"], [], None)
    data = measure_conversion(results["layernorm-pre"].load_model(), cfg, corpus)
    verdict = verdicts.conversion(data["d32"], data["d64"], data["scale"], data["speed"]["forward"],
                                  data["speed"]["forward+backward"])
    return render_conversion(cfg, out_dir, data, verdict)


# ---------------------------------------------------------------------------------------------------
# 7. The norm layers' share of a training step
# ---------------------------------------------------------------------------------------------------
SHARE_VARIANTS = {"LayerNorm": "layernorm-pre", "RMSNorm": "rmsnorm-pre", "identity": "none-pre"}


def _training_step(model_cfg: dict, corpus: Corpus, cfg: StudyConfig):
    """One AdamW step (forward, backward, update) of a fresh model on the study's first batch."""
    model = build_model(model_cfg, cfg.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = corpus.batch("train", 0, cfg.batch_size, cfg.block_size, cfg.seed)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()

    return step


def measure_norm_share(cfg: StudyConfig, corpus: Corpus) -> dict[int, dict[str, list[float]]]:
    """``width → {"LayerNorm" | "RMSNorm" | "identity": seconds per step, one per repeat}``: the study's model
    at each width (a head per 32 channels) with LayerNorm, RMSNorm and identity norms, timed round-robin
    (medians of 7 interleaved samples) ``cfg.share_repeats`` times."""
    out: dict[int, dict[str, list[float]]] = {}
    for d in cfg.share_widths:
        steps = {name: _training_step(model_config(cfg, corpus.vocab_size, variant, d_model=d, n_head=max(1, d // 32)),
                                      corpus, cfg)
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
             _pm(shares[d]) + " %", _pm(savings[d]) + " %"] for d, t in times.items()]
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
    measured = (f"norm layers' share of a training step {_pm(shares[widest])}% at d={widest} "
                f"({', '.join(f'{_pm(shares[d])}% at d={d}' for d in widths if d != widest)}); "
                f"RMSNorm saves {_pm(savings[widest])}% of the step at d={widest}")
    claim = ("LayerNorm is a tiny fraction of a Transformer's compute, which bounds what a cheaper norm can save "
             "end to end — against RMSNorm's reported 7%–64% (Zhang & Sennrich 2019).")
    notes = [(f"The study's model ({cfg.n_layer} layers, context {cfg.block_size}, batch {cfg.batch_size}, "
              "a head per 32 channels) at each width, one AdamW step on a fixed batch, with LayerNorm, RMSNorm and "
              "identity norms (norm='none'); the three are timed round-robin, medians of 7 samples of ≥ 20 ms, "
              f"repeated {cfg.share_repeats} times (± is the std over the repeats)."),
             (f"Holds when, at the widest width, the share's mean + {verdicts.SPREAD_K:g}·std is below "
              f"{verdicts.TINY_SHARE:g}% and RMSNorm's saving stays within the share (beyond the spread) at every "
              "width; partly when one of the two.")]
    if widest < 1024:
        notes.append(f"Widths up to d={widest} only (the claim is about d = 128 … 1024): `--share-widths` adds more.")
    return Experiment(7, "Norm layers' share of a training step across widths", claim, measured, verdict.word,
                      ["d_model", "LayerNorm step ms", "identity-norm step ms", "norm share", "RMSNorm saving"], rows,
                      plot, notes, data={str(d): t for d, t in times.items()})


def exp7_norm_share(cfg: StudyConfig, corpus: Corpus, out_dir: Path) -> Experiment:
    times = measure_norm_share(cfg, corpus)
    return render_norm_share(cfg, out_dir, times, verdicts.norm_share(*share_percents(times)))
