"""Experiment 9: why Transformers prefer LayerNorm to BatchNorm (Shen et al. 2020, *PowerNorm*): the same Pre-norm
GPT with ``batchnorm`` or ``layernorm``, trained at several batch sizes over seeds, then evaluated with batch and
with running statistics, at the trained context and a shorter one."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig
from normlab.study.data import Corpus
from normlab.study.experiments.common import Context, below_paper, pm, run_config
from normlab.study.report import Experiment, new_figure, save_figure
from normlab.study.train import RunResult

NUMBER, TITLE, TRAINS = 9, "Why Transformers prefer LayerNorm to BatchNorm", True
BATCHNORM, LAYERNORM = "batchnorm-pre", "layernorm-pre"
VARIANTS = (BATCHNORM, LAYERNORM)
#: What each trained run measures (nats): its final val loss; train-mode minus eval-mode loss; the loss at the
#: shorter context minus the same positions' at the trained one, with batch and with running statistics.
MEASURES = ("val_loss", "train_eval_gap", "length_change_batch", "length_change_running")
CLAIM = ("BatchNorm suits Transformers worse than LayerNorm: (a) it is sensitive to the batch size, its statistics "
         "being noisy in small batches; (b) it behaves differently in training (batch statistics) and inference "
         "(running statistics); (c) its statistics mix tokens across the batch and the positions, so a model "
         "trained at one context length behaves differently at another (Shen et al. 2020, *PowerNorm: Rethinking "
         "Batch Normalization in Transformers*).")


def bn_run_config(cfg: StudyConfig, corpus: Corpus, variant: str, batch_size: int, seed: int) -> RunConfig:
    """Experiment 9's run of ``variant`` at ``batch_size``: ``cfg.bn_steps`` steps whatever the batch size,
    evaluated before and after training only."""
    steps = cfg.bn_steps
    return run_config(cfg, corpus, variant, model=dict(n_layer=cfg.bn_n_layer, d_model=cfg.bn_d_model),
                      steps=steps, batch_size=batch_size, seed=seed, warmup=steps // 10, eval_interval=steps)


def train_runs(ctx: Context) -> dict[tuple[str, int], list[RunResult]]:
    """``(variant, batch size) → one run per seed`` (every rank trains)."""
    runs = {}
    for variant in VARIANTS:
        for b in sorted(set(ctx.cfg.bn_batch_sizes)):
            runs[(variant, b)] = [
                ctx.train(f"{variant} b{b} s{seed}", f"batch_vs_layer/{variant}-b{b}/seed-{seed}",
                          bn_run_config(ctx.cfg, ctx.corpus, variant, b, seed), record_activations=False)
                for seed in ctx.seeds]
    return runs


def val_batches(corpus: Corpus, rc: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's fixed validation batches: those its ``evaluate`` averaged over."""
    return [corpus.batch("val", i, rc.batch_size, rc.model["block_size"], rc.seed) for i in range(rc.eval_iters)]


@torch.no_grad()
def window_loss(model: nn.Module, batches: list, length: int, batch_stats: bool, scored: int | None = None) -> float:
    """Mean loss over ``batches`` cut to their first ``length`` tokens, counting the first ``scored`` positions
    (all when None); the norms use their batch's statistics (train mode) or their running ones (eval mode)."""
    model = copy.deepcopy(model).train(batch_stats)  # a copy: train-mode BatchNorm updates its running statistics
    total = 0.0
    for x, y in batches:
        x, y = x[:, :length], y[:, :length].clone()
        if scored is not None:
            y[:, scored:] = -1  # ignored targets
        total += model(x, y)[1].item()
    return total / len(batches)


def measure_run(model: nn.Module, batches: list, length: int, short: int) -> dict[str, float]:
    """One trained model's :data:`MEASURES` but the val loss, on the same validation ``batches``."""
    def length_change(batch_stats: bool) -> float:
        return (window_loss(model, batches, short, batch_stats)
                - window_loss(model, batches, length, batch_stats, scored=short))

    return {"train_eval_gap": window_loss(model, batches, length, True) - window_loss(model, batches, length, False),
            "length_change_batch": length_change(True), "length_change_running": length_change(False)}


def measure(cfg: StudyConfig, corpus: Corpus, runs: dict[tuple[str, int], list[RunResult]]
            ) -> dict[tuple[str, int], dict[str, list[float]]]:
    """``(variant, batch size) → measure → per-seed values`` of every run."""
    out = {}
    for key, per_seed in runs.items():
        values = {m: [] for m in MEASURES}
        for r in per_seed:
            measured = measure_run(r.load_model(), val_batches(corpus, r.config), cfg.block_size, cfg.bn_short_block)
            for m, v in {"val_loss": r.final["final_val_loss"], **measured}.items():
                values[m].append(v)
        out[key] = values
    return out


def batch_cost(values: dict[tuple[str, int], dict[str, list[float]]], variant: str) -> list[float]:
    """Per seed, ``variant``'s val loss at the smallest batch size minus at the largest."""
    sizes = sorted(b for v, b in values if v == variant)
    return [s - l for s, l in zip(values[(variant, sizes[0])]["val_loss"], values[(variant, sizes[-1])]["val_loss"])]


def judge(values: dict[tuple[str, int], dict[str, list[float]]]) -> verdicts.Verdict:
    """The verdict: (a) from the smallest and largest batch sizes; (b) and (c) at the largest batch size."""
    largest = max(b for _, b in values)
    pair = lambda m: (values[(BATCHNORM, largest)][m], values[(LAYERNORM, largest)][m])
    return verdicts.batch_vs_layer((batch_cost(values, BATCHNORM), batch_cost(values, LAYERNORM)),
                                   pair("train_eval_gap"), pair("length_change_batch"))


def _errorbar_bars(ax, values, measure: str, sizes: list[int], title: str, ylabel: str) -> None:
    """Grouped bars of ``measure`` per batch size and variant, ± 1 std over the seeds."""
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        stats = [verdicts.mean_std(values[(variant, b)][measure]) for b in sizes]
        xs = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=variant)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
    ax.set(xlabel="training batch size", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def render(cfg: StudyConfig, out_dir: Path, values: dict[tuple[str, int], dict[str, list[float]]],
           verdict: verdicts.Verdict) -> Experiment:
    sizes = sorted({b for _, b in values})
    fig, (ax_loss, ax_gap, ax_len) = new_figure(3, 5, 4)
    for variant in VARIANTS:
        stats = [verdicts.mean_std(values[(variant, b)]["val_loss"]) for b in sizes]
        ax_loss.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                         label=variant)
    ax_loss.set(xscale="log", xlabel="training batch size (sequences)", ylabel="final val loss (running statistics)",
                title=f"{cfg.bn_steps} steps at every batch size, ± 1 std over {cfg.seeds} seeds")
    ax_loss.set_xticks(sizes, [str(b) for b in sizes])
    ax_loss.minorticks_off()
    ax_loss.legend(fontsize=8)
    _errorbar_bars(ax_gap, values, "train_eval_gap", sizes, "loss with batch − with running statistics",
                   "Δ val loss (nats)")
    _errorbar_bars(ax_len, values, "length_change_batch", sizes,
                   f"context {cfg.bn_short_block} vs {cfg.block_size}, same positions (batch statistics)",
                   "Δ val loss (nats)")
    plot = save_figure(fig, out_dir / "exp9_batch_vs_layer.png")
    rows = [[variant, b, *(pm(values[(variant, b)][m]) for m in MEASURES)] for variant in VARIANTS for b in sizes]
    largest = sizes[-1]
    bn, ln = (values[(v, largest)] for v in VARIANTS)
    measured = (f"val loss at batch {sizes[0]} minus at {largest}: BatchNorm {pm(batch_cost(values, BATCHNORM))}, "
                f"LayerNorm {pm(batch_cost(values, LAYERNORM))}; at batch {largest}, batch − running statistics "
                f"BatchNorm {pm(bn['train_eval_gap'])}, LayerNorm {pm(ln['train_eval_gap'])}; context "
                f"{cfg.bn_short_block} vs {cfg.block_size} (batch statistics) BatchNorm "
                f"{pm(bn['length_change_batch'])}, LayerNorm {pm(ln['length_change_batch'])}")
    k, margin = verdicts.SPREAD_K, verdicts.BATCHNORM_WORSE_NATS
    notes = [
        (f"GPT with Pre-norm BatchNorm or LayerNorm, otherwise the same: {cfg.bn_n_layer} layers, d={cfg.bn_d_model}, "
         f"{cfg.n_head} heads, context {cfg.block_size}; lr {cfg.lr:g}, warmup {cfg.bn_steps // 10} steps, cosine "
         f"decay. Every batch size trains the same {cfg.bn_steps} steps (not the same tokens: a smaller batch sees "
         "fewer), which costs both norms; part (a) compares BatchNorm's cost to LayerNorm's. Seeds "
         f"{', '.join(map(str, cfg.seed_list))} set init and data order, the same for both "
         "norms. BatchNorm normalizes each channel over all B·T tokens of the batch (layout NLC)."),
        (f"Measured on each run's {cfg.eval_iters} fixed validation batches of its own batch size (those of its "
         "final val loss): (b) the loss with every norm in train mode (each batch's own statistics; the running "
         "statistics are left as trained) minus in eval mode; (c) the loss of the windows cut to their first "
         f"{cfg.bn_short_block} tokens minus the loss of those same positions in the full windows, so that the "
         "context a position sees is the same and only the norm statistics differ. In eval mode both norms are "
         "per token and the model causal, so that change is zero up to rounding (last column, the control); the "
         "verdict reads it with batch statistics, as in training."),
        ("Part (b) mixes three effects: running statistics that lag the weights (an average over the last "
         "1/momentum = 10 steps), one batch's statistics against the training population's (the validation text "
         "differs from the training text too), and a leak: train-mode BatchNorm's statistics include the later "
         "tokens of the batch, so a causal model partly sees the future. A loss with batch statistics below the "
         "one with running statistics can be lag or leak."),
        (f"Holds when all three parts show BatchNorm worse: its cost — (a) val loss at batch {sizes[0]} minus at "
         f"{largest}; (b) |batch − running statistics| and (c) |shorter context| at batch {largest} — exceeds "
         f"LayerNorm's by more than {margin:g} nats and {k:g}× their pooled std over seeds (a diverged BatchNorm "
         f"run counts as worse); partly when one or two parts do. {verdict.reason}."),
    ]
    return Experiment(
        NUMBER, TITLE, CLAIM, measured, verdict.word,
        ["norm", "batch size", "final val loss", "batch − running stats", f"ctx {cfg.bn_short_block}: batch stats",
         f"ctx {cfg.bn_short_block}: running stats"], rows, plot, notes,
        data={f"{v}|{b}": m for (v, b), m in values.items()},
        below_paper=below_paper({"layers": (cfg.bn_n_layer, 6), "d": (cfg.bn_d_model, 512)}))


def run(ctx: Context) -> Experiment | None:
    runs = train_runs(ctx)
    if not ctx.info.is_main:  # the other ranks train with rank 0, which alone measures and renders
        return None
    values = measure(ctx.cfg, ctx.corpus, runs)
    return render(ctx.cfg, ctx.out_dir, values, judge(values))
