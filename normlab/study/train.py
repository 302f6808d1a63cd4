"""One training run: AdamW, cosine decay with optional linear warmup, gradient clipping; checkpoints
that resume with no lost or repeated step.

A run directory holds ``config.json`` (the :class:`RunConfig`), ``metrics.jsonl`` (one JSON record per
training step and per evaluation), ``checkpoint.pt`` (model, optimizer, RNG states, steps done,
written atomically), and once finished ``model/`` (``normlab.models.save_pretrained``: what ``normlab
inspect`` and ``normlab convert`` read) and ``result.json``. Re-running resumes from the checkpoint and drops
any metric record newer than it; a finished run is loaded, not retrained.

``train_run(..., callbacks=[...])`` calls each callback after every step with a :class:`StepState`; a
callback can end the run there (:meth:`StepState.request_stop`), as SIGINT does.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from normlab.analysis import ActivationStats, NormTimer, grad_norm_per_layer
from normlab.study.config import RunConfig, atomic_write_text, check_or_write_config
from normlab.study.data import Corpus
from normlab.study.distributed import DistInfo, mean_across, on_main_then_share

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"
MODEL_DIR = "model"  # the final model, saved with normlab.models.save_pretrained


def lr_at(step: int, rc: RunConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warmup over ``rc.warmup`` steps, then cosine decay
    from ``lr`` to ``min_lr`` at the last step."""
    if step < rc.warmup:
        return rc.lr * (step + 1) / rc.warmup
    span = max(1, rc.steps - rc.warmup - 1)
    t = min(1.0, (step - rc.warmup) / span)
    return rc.min_lr + 0.5 * (rc.lr - rc.min_lr) * (1 + math.cos(math.pi * t))


def build_model(model_cfg: dict, seed: int) -> nn.Module:
    """``GPT(GPTConfig.from_dict(model_cfg))`` initialised from ``seed`` (same seed → same init)."""
    from normlab.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig.from_dict(model_cfg))


def make_optimizer(model: nn.Module, rc: RunConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on gains, biases, embeddings' 1-D params). torch's fused
    kernel on CPU and CUDA: one call per step instead of a dozen small ops per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": rc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=rc.lr, betas=(rc.beta1, rc.beta2), eps=1e-8, fused=fused)


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """The end of a training step after ``backward``: clip the gradients' total norm to ``grad_clip``
    (0: measure it, don't clip), then the optimizer's update. Returns the norm before clipping."""
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return grad_norm


def sync_batch_norm(model: nn.Module, info: DistInfo) -> int:
    """Point every BatchNorm of ``model`` at the default process group (cross-rank statistics);
    returns how many were switched."""
    if not info.enabled:
        return 0
    import torch.distributed as dist

    n = 0
    for m in model.modules():
        if "batchnorm" in type(m).__name__.lower() and hasattr(m, "process_group"):
            m.process_group = dist.group.WORLD
            n += 1
    return n


@dataclass
class RunResult:
    name: str
    run_dir: Path
    config: RunConfig
    final: dict
    records: list[dict] = field(default_factory=list)

    def train_curve(self) -> tuple[list[int], list[float]]:
        r = [x for x in self.records if x["kind"] == "train"]
        return [x["step"] for x in r], [x["train_loss"] for x in r]

    def val_curve(self) -> tuple[list[int], list[float]]:
        r = [x for x in self.records if x["kind"] == "eval"]
        return [x["step"] for x in r], [x["val_loss"] for x in r]

    def load_model(self) -> nn.Module:
        """The trained model (eval mode) from the final checkpoint."""
        ckpt = torch.load(self.run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        model = build_model(self.config.model, self.config.seed)
        model.load_state_dict(ckpt["model"])
        return model.eval()


def read_records(path: Path) -> list[dict]:
    """Metric records in ``path``; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class _Interrupt:
    """SIGINT → finish the current step, save a checkpoint, then raise KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _summarize(records: list[dict], rc: RunConfig, tokens_per_step: int, elapsed: float) -> dict:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steady = train[min(5, len(train) - 1) :] if train else []
    step_s = statistics.median(r["step_s"] for r in steady) if steady else float("nan")
    norm_s = statistics.median(r["norm_s"] for r in steady) if steady else float("nan")
    last = train[-10:]
    return {
        "steps": rc.steps,
        "final_train_loss": sum(r["train_loss"] for r in last) / max(1, len(last)),
        "last_train_loss": train[-1]["train_loss"] if train else float("nan"),
        "final_val_loss": evals[-1]["val_loss"] if evals else float("nan"),
        "init_val_loss": evals[0]["val_loss"] if evals else float("nan"),
        "wall_s": elapsed,
        "step_ms": 1e3 * step_s,
        "norm_ms": 1e3 * norm_s,
        "norm_frac": norm_s / step_s if step_s else float("nan"),
        "tokens_per_s": tokens_per_step / step_s if step_s else float("nan"),
        "diverged": _diverged(train, evals),
    }


#: A run whose last validation loss is this many nats above its loss at initialization has diverged.
DIVERGED_ABOVE_INIT = 1.0


def _diverged(train: list[dict], evals: list[dict]) -> bool:
    """A non-finite training loss, or a last validation loss that is not finite or lies more than
    :data:`DIVERGED_ABOVE_INIT` above the untrained model's (an exploded run can stay finite: 1e5 nats)."""
    if any(not math.isfinite(r["train_loss"]) for r in train):
        return True
    if len(evals) < 2:
        return False
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    return not math.isfinite(last) or last > first + DIVERGED_ABOVE_INIT


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, rc: RunConfig, block_size: int, info: DistInfo, progress: bool) -> float:
    """Mean loss over ``rc.eval_iters`` fixed validation batches (split across ranks)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total = 0.0
    for i in tqdm(range(rc.eval_iters), desc="  eval", leave=False, disable=not progress, dynamic_ncols=True):
        x, y = corpus.batch("val", i, rc.batch_size, block_size, rc.seed, info.rank, info.world)
        _, loss = model(x.to(info.device), y.to(info.device))
        total += loss.item()
    model.train(was_training)
    return mean_across(total / rc.eval_iters, info)


@dataclass
class StepState:
    """What a step callback sees after each training step (and its evaluation, if one was due).
    :meth:`request_stop` ends the run after this step as SIGINT does: checkpoint saved, KeyboardInterrupt."""

    name: str
    run_dir: Path
    step: int  # steps done
    steps: int  # steps of the whole run
    record: dict  # this step's training record
    stop_requested: bool = False

    def request_stop(self) -> None:
        self.stop_requested = True


#: Called once per training step with its :class:`StepState`, on every rank.
StepCallback = Callable[[StepState], None]


class _Metrics:
    """The run's metric records: kept in memory, appended to ``metrics.jsonl`` by rank 0."""

    def __init__(self, path: Path, kept: list[dict], info: DistInfo) -> None:
        self.records = kept
        self._file = None
        if info.is_main:  # drop records newer than the checkpoint (they are recomputed)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._file = open(path, "a")  # noqa: SIM115 — append handle kept open across steps, closed in close()

    def emit(self, rec: dict) -> None:
        self.records.append(rec)
        if self._file:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def _resume(run_dir: Path, name: str, model: nn.Module, opt: torch.optim.Optimizer,
            info: DistInfo) -> tuple[int, float, list[dict]]:
    """Load the checkpoint into ``model`` and ``opt`` and restore the RNG states: ``(steps done, elapsed
    seconds, metric records up to the checkpoint)``; ``(0, 0.0, [])`` without a checkpoint."""
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        return 0, 0.0, []
    ckpt = torch.load(ckpt_path, map_location=info.device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    start = ckpt["step"]
    if ckpt.get("threads", torch.get_num_threads()) != torch.get_num_threads() and info.is_main:
        print(f"note: {name} resumes on {torch.get_num_threads()} thread(s), it started on {ckpt['threads']}: "
              "the result may differ from an uninterrupted run in the last bits (pass --threads to match)")
    return start, ckpt["elapsed"], [r for r in read_records(run_dir / METRICS) if r["step"] <= start]


def _wrap_for_training(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` itself in one process; under torchrun, synchronized BatchNorm and a DDP wrapper."""
    sync_batch_norm(model, info)
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[torch.device(info.device).index] if info.device.startswith("cuda") else None)


def _step(step: int, model: nn.Module, train_model: nn.Module, opt: torch.optim.Optimizer, corpus: Corpus,
          rc: RunConfig, info: DistInfo, timer: NormTimer) -> dict:
    """One optimizer step (0-based ``step``) on its fixed batch; returns the step's training record."""
    block_size = rc.model["block_size"]
    t0 = time.perf_counter()
    timer.reset()
    for g in opt.param_groups:
        g["lr"] = lr_at(step, rc)
    x, y = corpus.batch("train", step, rc.batch_size, block_size, rc.seed, info.rank, info.world)
    _, loss = train_model(x.to(info.device), y.to(info.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    done = step + 1
    log_grads = done == 1 or done % rc.grad_log_interval == 0 or done == rc.steps
    layer_grads = grad_norm_per_layer(model) if log_grads else None
    grad_norm = clip_and_step(model, opt, rc.grad_clip).item()
    step_s = time.perf_counter() - t0
    rec = {
        "kind": "train",
        "step": done,
        "lr": lr_at(step, rc),
        "train_loss": mean_across(loss.detach(), info),
        "grad_norm": grad_norm,
        "step_s": step_s,
        "norm_s": timer.total_s,
        "tokens_per_s": rc.batch_size * block_size / step_s,
    }
    if layer_grads is not None:
        rec["layer_grad_norm"] = {str(k): v for k, v in layer_grads.items()}
    return rec


def _evaluate(step: int, model: nn.Module, corpus: Corpus, rc: RunConfig, info: DistInfo, show: bool,
              record_activations: bool) -> dict:
    """The evaluation record after ``step`` steps: validation loss, and the norm layers' activation
    statistics on one validation batch (rank 0, when ``record_activations``)."""
    block_size = rc.model["block_size"]
    rec = {"kind": "eval", "step": step, "val_loss": evaluate(model, corpus, rc, block_size, info, show)}
    if record_activations and info.is_main:
        x, _ = corpus.batch("val", 0, rc.batch_size, block_size, rc.seed)
        with torch.no_grad(), ActivationStats(model) as act:
            model.eval()
            model(x.to(info.device))
            model.train()
        rec["act"] = {k: {"in_abs_cos": v["in"]["abs_cos"], "in_rms": v["in"]["rms"], "out_rms": v["out"]["rms"]}
                      for k, v in act.summary().items()}
    return rec


def _checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, done: int, elapsed: float) -> None:
    """Save the state after ``done`` steps atomically (a temp file, then renamed), with the RNG states and
    the thread count, which a resume compares."""
    state = {
        "step": done,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "elapsed": elapsed,
        "threads": torch.get_num_threads(),
    }
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


def train_run(
    name: str,
    run_dir: Path,
    rc: RunConfig,
    corpus: Corpus,
    info: DistInfo | None = None,
    *,
    progress: bool = True,
    checkpoint_interval: int | None = None,
    record_activations: bool = True,
    callbacks: Sequence[StepCallback] = (),
) -> RunResult:
    """Train (or resume, or load when finished) the run ``name`` in ``run_dir``. Only rank 0 writes.
    Each of ``callbacks`` is called after every step with a :class:`StepState`."""
    from tqdm.auto import tqdm

    info = info or DistInfo()
    rc.check_valid()
    corpus.check_block_size(rc.model["block_size"])
    run_dir = Path(run_dir)
    on_main_then_share(lambda: check_or_write_config(run_dir, rc.to_dict(), what="run"), info)
    result_path = run_dir / RESULT
    if result_path.exists() and (run_dir / CHECKPOINT).exists():
        return RunResult(name, run_dir, rc, json.loads(result_path.read_text()), read_records(run_dir / METRICS))

    model = build_model(rc.model, rc.seed).to(info.device)
    opt = make_optimizer(model, rc)
    start, elapsed, kept = _resume(run_dir, name, model, opt, info)
    metrics = _Metrics(run_dir / METRICS, kept, info)
    train_model = _wrap_for_training(model, info)
    interval = checkpoint_interval or rc.eval_interval
    show = progress and info.is_main

    model.train()
    if start == 0:
        metrics.emit(_evaluate(0, model, corpus, rc, info, show, record_activations))
    bar = tqdm(total=rc.steps, initial=start, desc=f"{name:>16}", disable=not show, dynamic_ncols=True, leave=True)
    try:
        with _Interrupt() as interrupt, NormTimer(model) as timer:
            for step in range(start, rc.steps):
                rec = _step(step, model, train_model, opt, corpus, rc, info, timer)
                done = rec["step"]
                elapsed += rec["step_s"]
                metrics.emit(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", refresh=False)
                if done % rc.eval_interval == 0 or done == rc.steps:
                    t1 = time.perf_counter()
                    ev = _evaluate(done, model, corpus, rc, info, show, record_activations)
                    metrics.emit(ev)
                    elapsed += time.perf_counter() - t1
                    bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{ev['val_loss']:.3f}", refresh=False)
                state = StepState(name, run_dir, done, rc.steps, rec)
                for callback in callbacks:
                    callback(state)
                # every rank stops at the same step
                stop = mean_across(float(interrupt.requested or state.stop_requested), info) > 0
                if info.is_main and (done % interval == 0 or done == rc.steps or stop):
                    _checkpoint(run_dir, model, opt, done, elapsed)
                _barrier(info)
                if stop:
                    raise KeyboardInterrupt(f"interrupted after step {done}; checkpoint saved in {run_dir}")
    finally:
        bar.close()
        metrics.close()
    final = _summarize(metrics.records, rc, rc.batch_size * rc.model["block_size"], elapsed)
    final["world"] = info.world
    if info.is_main:
        from normlab.models.serialization import save_pretrained

        save_pretrained(model, run_dir / MODEL_DIR)
        atomic_write_text(result_path, json.dumps(final, indent=2) + "\n")
    _barrier(info)
    return RunResult(name, run_dir, rc, final, metrics.records)


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
