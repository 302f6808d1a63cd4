"""The study: train a grid of norm variants on a character-level corpus and report on twelve published claims.

``normlab.study.run_study(steps=200, variants=["layernorm-pre", "rmsnorm-pre"])`` or ``normlab study``.
Re-running the same command resumes where it stopped; finished runs are not retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from normlab.study.config import DEFAULT_VARIANTS, EXPERIMENTS, StudyConfig, StudyConfigError, check_or_write_config
from normlab.study.data import load_corpus
from normlab.study.distributed import DistInfo, barrier, on_main_then_share, setup, teardown
from normlab.study.report import Experiment, environment, text_table, write_report
from normlab.study.train import RunResult, StepCallback, train_run

__all__ = ["DEFAULT_VARIANTS", "EXPERIMENTS", "StudyConfig", "StudyConfigError", "StudyResult", "run_study"]


@dataclass
class StudyResult:
    out_dir: Path
    report: Path | None
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # the grid: variant → one run per seed
    experiments: list[Experiment] = field(default_factory=list)

    def summary(self) -> str:
        """The table printed at the end: one line per variant, then one per experiment."""
        parts = []
        if self.runs:
            columns = ["final_val_loss", "final_train_loss", "tokens_per_s", "norm_ms", "wall_s"]
            parts.append(text_table(
                ["variant", "final val loss", "final train loss", "tokens/s", "norm ms/step", "wall s"],
                [[n, *(_mean([r.final[c] for r in runs]) for c in columns)] for n, runs in self.runs.items()]))
        if self.experiments:
            parts.append(text_table(["#", "experiment", "verdict", "measured"],
                                    [[e.number, e.title, e.verdict, e.measured] for e in self.experiments]))
        return "\n\n".join(parts)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def default_name(cfg: StudyConfig) -> str:
    """``default`` for the default study, else ``study-<hash of the config>``."""
    d = cfg.to_dict()
    if d == StudyConfig().to_dict():
        return "default"
    if d == StudyConfig.from_profile(cfg.profile).to_dict():
        return cfg.profile
    return "study-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def run_study(
    config: StudyConfig | None = None,
    *,
    out: str | Path = "runs",
    name: str | None = None,
    progress: bool = True,
    device: str | None = None,
    info: DistInfo | None = None,
    log=print,
    callbacks: Sequence[StepCallback] = (),
    **overrides,
) -> StudyResult:
    """Run (or resume) the study in ``out/name`` and write ``report.md`` with its plots there.

    ``config`` or keyword ``overrides`` of :class:`StudyConfig` (``steps``, ``variants``, ``n_layer``…).
    Inside ``torchrun`` the training is data parallel; only rank 0 writes. ``callbacks`` go to every
    training run (:func:`normlab.study.train.train_run`).
    """
    from normlab.study import experiments as ex

    cfg = config if config is not None else StudyConfig(**overrides)
    if config is not None and overrides:
        raise TypeError("give either a StudyConfig or keyword overrides, not both")
    own_dist = info is None
    info = info or setup(device)
    try:
        return _run(cfg, Path(out), name or default_name(cfg), progress, info, log, ex, tuple(callbacks))
    finally:
        if own_dist:
            teardown(info)


def _run(cfg: StudyConfig, out: Path, name: str, progress: bool, info: DistInfo, log, ex,
         callbacks: tuple[StepCallback, ...]) -> StudyResult:
    if info.is_main is False:
        log = lambda *a, **k: None
    # everything that can be wrong is checked before any work
    corpus = load_corpus(cfg.data)
    corpus.check_block_size(cfg.block_size)
    if cfg.batch_size % info.world:
        raise StudyConfigError(
            f"batch size {cfg.batch_size} must be divisible by the number of processes {info.world}")
    run_configs = {v: ex.run_config(cfg, corpus, v) for v in cfg.variants}  # validates every variant's model
    for rc in run_configs.values():
        rc.check_valid()
    out_dir = out / name
    study_config = {**cfg.to_dict(), "data_digest": corpus.digest}
    on_main_then_share(lambda: check_or_write_config(out_dir, study_config, what="study"), info)
    log(f"normlab study → {out_dir}  ({len(cfg.variants)} variants × {cfg.steps} steps, corpus {corpus.source}: "
        f"{len(corpus.text):,} chars, vocab {corpus.vocab_size}; "
        f"{info.world} process(es), {torch.get_num_threads()} threads)")
    load = _load_average()
    if load is not None and load > (os.cpu_count() or 1):
        log(f"note: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): timings are noisy and the "
            f"study takes longer than on an idle machine (running on {torch.get_num_threads()} thread(s))")
    t0 = time.perf_counter()
    result = StudyResult(out_dir, None)
    want = [n for n in ex.REGISTRY if n in cfg.experiments]
    ctx = ex.Context(cfg, corpus, out_dir, info, progress, callbacks)
    seconds: dict[str, float] = {}  # wall time of this invocation per part (the grid, then each experiment)
    if set(want) & ex.USES_GRID:
        for v, rc in run_configs.items():
            ctx.grid[v] = [train_run(v if cfg.seeds == 1 else f"{v} s{seed}", out_dir / "grid" / v / f"seed-{seed}",
                                     replace(rc, seed=seed), corpus, info, progress=progress, callbacks=callbacks)
                           for seed in ctx.seeds]
        result.runs = ctx.grid
        seconds["grid"] = time.perf_counter() - t0
        log(f"grid done in {seconds['grid']:.0f} s")
    exps = []
    for n in want:  # training experiments run on every rank; the others on rank 0 only
        module = ex.REGISTRY[n]
        if module.TRAINS or info.is_main:
            start = time.perf_counter()
            e = module.run(ctx)
            seconds[str(n)] = time.perf_counter() - start
            if info.is_main:
                exps.append(e)
                log(f"experiment {n} ({module.TITLE}): {e.verdict}, {seconds[str(n)]:.0f} s")
    if info.is_main:
        result.experiments = exps
        env = environment()
        below = [e.number for e in exps if e.below_paper]
        setup_lines = [
            (f"Profile: **{cfg.profile}**"
             + (" (`make study`: every experiment at a reduced scale; `normlab study --profile full` runs each at the "
                "scale where its claim can show)" if cfg.profile == "default" else "")
             + (f". Experiments run below their paper's scale (⚠, flagged beside the verdict): "
                f"{', '.join(map(str, below))}." if below else ".")),
            "",
            (f"Grid (experiments {', '.join(map(str, sorted(ex.USES_GRID)))}): GPT, {cfg.n_layer} layers, "
             f"{cfg.n_head} heads, "
             f"d={cfg.d_model}, context {cfg.block_size}"
             f"{', preset ' + cfg.preset if cfg.preset else ''}; batch {cfg.batch_size}; "
             f"AdamW (β₁ {cfg.beta1:g}, β₂ {cfg.beta2:g}) lr {cfg.lr:g} "
             f"(cosine to {cfg.lr * cfg.min_lr_ratio:g}, warmup {cfg.warmup_iters} steps), "
             f"weight decay {cfg.weight_decay:g}, "
             f"grad clip {format(cfg.grad_clip, 'g') if cfg.grad_clip else 'none'}; {cfg.steps} steps per variant, "
             f"seeds {', '.join(map(str, cfg.seed_list))}: a seed sets the init and the data "
             "order, the same for every variant."),
            "",
            (f"Data: {corpus.source} — {len(corpus.text):,} characters, vocabulary {corpus.vocab_size}, "
             f"90/10 train/val split; validation loss over {cfg.eval_iters} fixed batches."),
            "",
            f"Machine: {env['cpu']}, {env['threads']} threads, {info.world} process(es) on {info.device}; "
            f"torch {env['torch']}, normlab {env['normlab']}, Python {env['python']}. "
            f"Study time: {time.perf_counter() - t0:.0f} s "
            f"(this invocation; runs finished earlier are loaded, not retrained)"
            + (f"; load average at the start {load:.1f}." if load is not None else "."),
        ]
        title = "normlab study — normalization in Transformers, measured"
        result.report = write_report(out_dir, title, setup_lines, exps)
        experiment_rows = [{"number": e.number, "title": e.title, "verdict": e.verdict, "measured": e.measured}
                           for e in exps]
        summary = {"profile": cfg.profile, "runs": {n: [r.final for r in runs] for n, runs in result.runs.items()},
                   "experiments": experiment_rows, "seconds": seconds}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log("\n" + result.summary())
        log(f"\nstudy time {time.perf_counter() - t0:.0f} s — report: {result.report}")
    barrier(info)
    return result
