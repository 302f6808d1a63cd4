"""One training run: AdamW, cosine decay with optional linear warmup, gradient clipping; checkpoints
that resume with no lost or repeated step.

A run directory holds ``config.json`` (the :class:`RunConfig`), ``metrics.jsonl`` (one JSON record per
training step and per evaluation), ``checkpoint.pt`` (model, optimizer, RNG states, steps done,
written atomically), and once finished ``model/`` (``normlab.models.save_pretrained``: what ``normlab
inspect`` and ``normlab convert`` read) and ``result.json``. Re-running resumes from the checkpoint and drops
any metric record newer than it; a finished run is loaded, not retrained.

``NORMLAB_STOP_AFTER_STEP=N`` makes the process kill itself (SIGKILL, or the signal named by
``NORMLAB_STOP_SIGNAL``, e.g. ``INT``) right after step ``N`` — the deterministic interruption the
resume tests use.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import time
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
    """AdamW; weight decay on matrices only (not on gains, biases, embeddings' 1-D params)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": rc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=rc.lr, betas=(0.9, 0.95), eps=1e-8)


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


def _self_stop(step: int) -> None:
    want = os.environ.get("NORMLAB_STOP_AFTER_STEP")
    if want is not None and int(want) == step:
        sig = getattr(signal, "SIG" + os.environ.get("NORMLAB_STOP_SIGNAL", "KILL").upper())
        os.environ.pop("NORMLAB_STOP_AFTER_STEP")
        os.kill(os.getpid(), sig)
        if sig == signal.SIGKILL:
            time.sleep(5)  # the kill arrives before anything else runs


def _save_checkpoint(run_dir: Path, model, opt, step: int, extra: dict) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        **extra,
    }
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


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
) -> RunResult:
    """Train (or resume, or load when finished) the run ``name`` in ``run_dir``. Only rank 0 writes."""
    from tqdm.auto import tqdm

    info = info or DistInfo()
    rc.check_valid()
    block_size = rc.model["block_size"]
    corpus.check_block_size(block_size)
    run_dir = Path(run_dir)
    on_main_then_share(lambda: check_or_write_config(run_dir, rc.to_dict(), what="run"), info)
    result_path = run_dir / RESULT
    if result_path.exists() and (run_dir / CHECKPOINT).exists():
        return RunResult(name, run_dir, rc, json.loads(result_path.read_text()), read_records(run_dir / METRICS))

    model = build_model(rc.model, rc.seed).to(info.device)
    opt = make_optimizer(model, rc)
    start, elapsed = 0, 0.0
    records: list[dict] = []
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=info.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        start, elapsed = ckpt["step"], ckpt["elapsed"]
        if ckpt.get("threads", torch.get_num_threads()) != torch.get_num_threads() and info.is_main:
            print(f"note: {name} resumes on {torch.get_num_threads()} thread(s), it started on {ckpt['threads']}: "
                  "the result may differ from an uninterrupted run in the last bits (pass --threads to match)")
        records = [r for r in read_records(run_dir / METRICS) if r["step"] <= start]
    if info.is_main:  # drop records newer than the checkpoint (they are recomputed)
        atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in records))
    metrics_file = open(run_dir / METRICS, "a") if info.is_main else None

    def emit(rec: dict) -> None:
        records.append(rec)
        if metrics_file:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    sync_batch_norm(model, info)
    train_model = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[torch.device(info.device).index] if info.device.startswith("cuda") else None)
    interval = checkpoint_interval or rc.eval_interval
    tokens_per_step = rc.batch_size * block_size
    show = progress and info.is_main

    def eval_record(step: int) -> None:
        rec = {"kind": "eval", "step": step, "val_loss": evaluate(model, corpus, rc, block_size, info, show)}
        if record_activations and info.is_main:
            x, _ = corpus.batch("val", 0, rc.batch_size, block_size, rc.seed)
            with torch.no_grad(), ActivationStats(model) as act:
                model.eval()
                model(x.to(info.device))
                model.train()
            rec["act"] = {k: {"in_abs_cos": v["in"]["abs_cos"], "in_rms": v["in"]["rms"], "out_rms": v["out"]["rms"]} for k, v in act.summary().items()}
        emit(rec)

    model.train()
    if start == 0:
        eval_record(0)
    bar = tqdm(total=rc.steps, initial=start, desc=f"{name:>16}", disable=not show, dynamic_ncols=True, leave=True)
    try:
        with _Interrupt() as interrupt, NormTimer(model) as timer:
            for step in range(start, rc.steps):
                t0 = time.perf_counter()
                timer.reset()
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, rc)
                x, y = corpus.batch("train", step, rc.batch_size, block_size, rc.seed, info.rank, info.world)
                _, loss = train_model(x.to(info.device), y.to(info.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                done = step + 1
                log_grads = done == 1 or done % rc.eval_interval == 0 or done == rc.steps
                layer_grads = grad_norm_per_layer(model) if log_grads else None
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), rc.grad_clip).item()
                opt.step()
                step_s = time.perf_counter() - t0
                elapsed += step_s
                rec = {
                    "kind": "train",
                    "step": done,
                    "lr": lr_at(step, rc),
                    "train_loss": mean_across(loss.detach(), info),
                    "grad_norm": grad_norm,
                    "step_s": step_s,
                    "norm_s": timer.total_s,
                    "tokens_per_s": tokens_per_step / step_s,
                }
                if layer_grads is not None:
                    rec["layer_grad_norm"] = {str(k): v for k, v in layer_grads.items()}
                emit(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", refresh=False)
                if done % rc.eval_interval == 0 or done == rc.steps:
                    t1 = time.perf_counter()
                    eval_record(done)
                    elapsed += time.perf_counter() - t1
                    bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{records[-1]['val_loss']:.3f}", refresh=False)
                _self_stop(done)
                stop = mean_across(float(interrupt.requested), info) > 0  # every rank stops at the same step
                if info.is_main and (done % interval == 0 or done == rc.steps or stop):
                    _save_checkpoint(run_dir, model, opt, done, {"elapsed": elapsed, "threads": torch.get_num_threads()})
                _barrier(info)
                if stop:
                    raise KeyboardInterrupt(f"interrupted after step {done}; checkpoint saved in {run_dir}")
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    final = _summarize(records, rc, tokens_per_step, elapsed)
    final["world"] = info.world
    if info.is_main:
        from normlab.models.serialization import save_pretrained

        save_pretrained(model, run_dir / MODEL_DIR)
        atomic_write_text(result_path, json.dumps(final, indent=2) + "\n")
    _barrier(info)
    return RunResult(name, run_dir, rc, final, records)


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
