"""What every experiment shares: the study's model and run configurations, the :class:`Context` an
experiment runs in, and the mean ± std helpers of its tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from normlab.study import verdicts
from normlab.study.config import RunConfig, StudyConfig, parse_variant
from normlab.study.data import Corpus
from normlab.study.distributed import DistInfo
from normlab.study.train import RunResult, train_run

#: RunConfig fields an experiment may override beside the model's.
MODEL_KEYS = ("n_layer", "d_model", "n_head", "block_size")


@dataclass
class Context:
    """Where and with what an experiment runs. ``grid`` holds experiment 1's runs, ``variant → one run per
    seed``, when the grid trained."""

    cfg: StudyConfig
    corpus: Corpus
    out_dir: Path
    info: DistInfo = field(default_factory=DistInfo)
    progress: bool = True
    callbacks: tuple = ()
    grid: dict[str, list[RunResult]] = field(default_factory=dict)

    def train(self, name: str, subdir: str, rc: RunConfig, **kwargs) -> RunResult:
        """Train (resume, or load) ``rc`` in ``out_dir/subdir`` on every rank."""
        return train_run(name, self.out_dir / subdir, rc, self.corpus, self.info, progress=self.progress,
                         callbacks=self.callbacks, **kwargs)

    @property
    def seeds(self) -> list[int]:
        return self.cfg.seed_list


def model_config(cfg: StudyConfig, vocab_size: int, variant: str, **overrides) -> dict:
    """The ``GPTConfig`` dict of ``variant`` (``<norm>-<placement>``) at the study's model size."""
    from normlab.models import GPTConfig

    norm, placement = parse_variant(variant)
    kw = dict(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
              d_model=cfg.d_model, norm=norm, placement=placement)
    kw.update(overrides)
    c = GPTConfig.preset(cfg.preset, **kw) if cfg.preset else GPTConfig(**kw)
    return c.to_dict()


def run_config(cfg: StudyConfig, corpus: Corpus, variant: str, model: dict | None = None, **overrides) -> RunConfig:
    """The study's training run of ``variant``; ``model`` overrides ``GPTConfig`` fields (``n_layer``,
    ``qk_norm``…), ``overrides`` the :class:`RunConfig`'s (``steps``, ``lr``, ``seed``…)."""
    model = dict(model or {})
    model.update({k: overrides.pop(k) for k in list(overrides) if k in MODEL_KEYS})
    rc = RunConfig(
        model=model_config(cfg, corpus.vocab_size, variant, **model),
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio,
        warmup=cfg.warmup_iters, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed,
        beta1=cfg.beta1, beta2=cfg.beta2,
        eval_interval=min(cfg.eval_interval, cfg.steps), eval_iters=cfg.eval_iters, data=corpus.source,
        data_digest=corpus.digest,
    )
    rc = replace(rc, **overrides)
    if "eval_interval" not in overrides:
        rc = replace(rc, eval_interval=min(rc.eval_interval, rc.steps))
    return rc


def backend_name() -> str:
    """The backend that serves a CPU fp32 norm here (the dispatch's choice)."""
    from normlab import dispatch

    try:
        return dispatch.select("layer_norm", torch.zeros(2, 8), None)
    except Exception:  # noqa: BLE001 — only for a note in the report
        return "default"


def pm(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` of ``values`` (sample std)."""
    mean, std = verdicts.mean_std(values)
    return f"{mean:.{digits}g} ± {std:.2g}"


def mean_curve(per_seed: list[list[float]]) -> tuple[list[float], list[float]]:
    """Pointwise mean and std of equally long per-seed curves."""
    n = min(len(c) for c in per_seed)
    stats = [verdicts.mean_std([c[i] for c in per_seed]) for i in range(n)]
    return [m for m, _ in stats], [s for _, s in stats]


def band(ax, xs, per_seed: list[list[float]], label: str, **kwargs):
    """Plot the seeds' mean curve with a ± 1 std band; returns the line."""
    mean, std = mean_curve(per_seed)
    xs = list(xs)[: len(mean)]
    line = ax.plot(xs, mean, label=label, **kwargs)[0]
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.2, lw=0)
    return line


def unigram_entropy(corpus: Corpus) -> float:
    """The loss (nats/char) of predicting the training text's character frequencies without context."""
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size).double()
    prob = counts[counts > 0] / counts.sum()
    return -(prob * prob.log()).sum().item()


def capped_loss(final: dict) -> float:
    """A run's final val loss, capped at its untrained model's (a diverged or non-finite run counts at that
    loss, as in Wortsman et al. 2023's learning-rate sensitivity)."""
    loss, init = final["final_val_loss"], final["init_val_loss"]
    return min(loss, init) if math.isfinite(loss) else init


def dyt_saturations(model: torch.nn.Module, idx: torch.Tensor, threshold: float) -> dict[str, tuple[float, float]]:
    """On token ids ``idx``, every DyT layer in the order they ran: ``name → (its input's rms, the fraction of
    its input entries in tanh's saturated region |α·x| > threshold)``."""
    from normlab.analysis import ActivationStats, find_norm_layers

    with torch.no_grad(), ActivationStats(model, keep_inputs=True) as rec:
        model(idx)
    layers = dict(find_norm_layers(model))
    out = {}
    for name in rec.order:
        h, alpha = rec.inputs[name][0], layers[name].alpha.detach()
        out[name] = (h.double().pow(2).mean().sqrt().item(), (alpha.abs() * h.abs() > threshold).double().mean().item())
    return out


def dyt_saturation(model: torch.nn.Module, idx: torch.Tensor, threshold: float) -> tuple[str, float, float] | None:
    """The last DyT layer that ran on ``idx``: its name, its input's rms and saturated fraction (see
    :func:`dyt_saturations`); None when no norm layer ran."""
    per_layer = dyt_saturations(model, idx, threshold)
    if not per_layer:
        return None
    last = list(per_layer)[-1]
    return last, *per_layer[last]


def below_paper(what: dict[str, tuple[float, float]]) -> str | None:
    """A note naming every ``quantity → (used, paper's)`` where the study ran below the paper's scale."""
    low = [f"{k} {used:g} (paper: {paper:g})" for k, (used, paper) in what.items() if used < paper]
    return ("Below the paper's scale: " + ", ".join(low) + ".") if low else None
