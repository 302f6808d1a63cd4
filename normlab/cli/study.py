"""``normlab study``: train a grid of norm variants and write ``report.md`` with plots.

Data parallel: ``torchrun --nproc_per_node=2 -m normlab study …`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import fields

from normlab.cli.argtypes import comma_list, device, dir_name, number_in, positive_float, positive_int
from normlab.study.config import EXPERIMENTS, NORMS, PLACEMENTS, PROFILES, StudyConfig, StudyConfigError


def _both(field: str) -> str:
    """``(default: X; full profile: Y)`` for a StudyConfig field."""
    d, f = getattr(StudyConfig(), field), getattr(StudyConfig.from_profile("full"), field)
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return f"(default: {show(d)}" + (f"; full profile: {show(f)})" if f != d else ")")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=list(PROFILES), default="default",
                   help="the settings every other option starts from: 'default' (make study, a few minutes) or "
                        "'full' (each experiment at the scale where its claim can show, about an hour on 2 cores)")

    def option(flag: str, type, text: str, field: str | None = None) -> None:
        """A StudyConfig field's option: unset, it keeps the profile's value."""
        field = field or flag[2:].replace("-", "_")
        p.add_argument(flag, type=type, default=None, dest=field, help=f"{text} {_both(field)}".replace("%", "%%"))

    option("--variants", str, f"comma-separated <norm>-<placement>; norms {', '.join(NORMS)}; "
                              f"placements {', '.join(PLACEMENTS)}")
    option("--steps", positive_int, "training steps per variant of the grid")
    option("--seeds", positive_int, "seeds of every training comparison (seed, seed+1, …)")
    p.add_argument("--preset", choices=["gpt2", "llama"], default=None,
                   help="model preset; --variants still sets norm and placement")
    option("--n-layer", positive_int, "layers of the grid's model")
    option("--n-head", positive_int, "attention heads of the grid's model")
    option("--d-model", positive_int, "width of the grid's model")
    option("--block-size", positive_int, "context length")
    option("--batch-size", positive_int, "global batch size")
    option("--lr", positive_float, "peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    option("--min-lr-ratio", number_in(0, 1), "the cosine decay's final learning rate, as a fraction of --lr")
    option("--beta1", number_in(0, 1, hi_open=True), "AdamW's β₁")
    option("--beta2", number_in(0, 1, hi_open=True), "AdamW's β₂")
    option("--weight-decay", number_in(0, math.inf), "AdamW's weight decay, on weight matrices only")
    option("--grad-clip", number_in(0, math.inf), "max gradient norm; 0: no clipping")
    option("--seed", int, "the first seed")
    option("--eval-interval", positive_int, "steps between evaluations")
    option("--eval-iters", positive_int, "validation batches per evaluation")
    option("--timing-rounds", positive_int, "interleaved rounds of every timing comparison")
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: CPython's help text, pydoc_data.topics)")
    option("--experiments", comma_list(int, EXPERIMENTS),
           f"comma-separated, which of {EXPERIMENTS[0]}-{EXPERIMENTS[-1]}")
    option("--grad-depths", comma_list(positive_int), "comma-separated depths of experiment 2 (the paper's: 6,12)")
    option("--grad-d-model", positive_int, "width of experiment 2's models (the paper's: 512)")
    option("--grad-seeds", positive_int, "seeds of experiment 2")
    option("--grad-n-head", positive_int, "attention heads of experiment 2's models")
    option("--grad-batch-size", positive_int, "rows per batch of experiment 2")
    option("--grad-batches", positive_int, "batches averaged per seed in experiment 2")
    option("--depth-placements", comma_list(str, PLACEMENTS),
           "comma-separated placements of experiment 10's LayerNorm models (must include pre, sandwich, lnscaling)")
    option("--depth-n-layer", positive_int, "layers of experiment 10's models")
    option("--depth-d-model", positive_int, "width of experiment 10's models")
    option("--depth-n-head", positive_int, "attention heads of experiment 10's models")
    option("--depth-steps", positive_int, "training steps per run of experiment 10")
    option("--depth-batch-size", positive_int, "batch size of experiment 10's runs")
    option("--warmup-lrs", comma_list(positive_float), "comma-separated learning-rate sweep of experiment 3")
    option("--warmup-layers", positive_int, "layers of experiment 3's models")
    option("--warmup-d-model", positive_int, "width of experiment 3's models")
    option("--warmup-steps", positive_int, "steps per run of experiment 3")
    option("--warmup-warmup", positive_int, "linear warmup of experiment 3's runs with warmup, unless given a "
                                            "third of --warmup-steps")
    option("--warmup-beta2", number_in(0, 1, hi_open=True), "Adam's β₂ in experiment 3 (the paper's: 0.98)")
    option("--warmup-grad-clip", number_in(0, math.inf), "max gradient norm in experiment 3; 0: no clipping")
    option("--warmup-sweep-seeds", positive_int, "seeds of every learning rate of experiment 3's sweep; the edge "
                                                 "lr gets all --seeds")
    option("--share-widths", comma_list(positive_int), "model widths of experiment 7, multiples of 32")
    option("--share-repeats", positive_int, "interleaved timing repeats per width in experiment 7")
    option("--bn-batch-sizes", comma_list(positive_int), "comma-separated training batch sizes of experiment 9 "
                                                         "(BatchNorm vs LayerNorm), at least two")
    option("--bn-steps", positive_int, "steps per run of experiment 9, the same at every batch size")
    option("--bn-n-layer", positive_int, "layers of experiment 9's models")
    option("--bn-d-model", positive_int, "width of experiment 9's models")
    option("--bn-short-block", positive_int, "the shorter context experiment 9 evaluates its models at, below "
                                             "--block-size; unset: a quarter of it")
    option("--qk-lrs", comma_list(positive_float), "comma-separated peak learning rates of experiment 11's sweep")
    option("--qk-steps", positive_int, "steps per run of experiment 11")
    option("--qk-n-layer", positive_int, "layers of experiment 11's model (None: the grid's)")
    option("--qk-d-model", positive_int, "width of experiment 11's model (None: the grid's)")
    option("--dyt-alphas", comma_list(positive_float), "comma-separated DyT α₀ of experiment 12's sweep")
    option("--dyt-steps", positive_int, "steps per run of experiment 12")
    option("--dyt-n-layer", positive_int, "layers of experiment 12's model (None: the grid's)")
    option("--dyt-d-model", positive_int, "width of experiment 12's model (None: the grid's)")
    p.add_argument("--out", default="runs", help="parent directory of the study directory (default: %(default)s)")
    p.add_argument("--name", type=dir_name, default=None,
                   help="study directory name inside --out (default: the profile's name for an unchanged profile, "
                        "else a config hash)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process, ≥ 1 (default: cores / processes, 1 when the machine is busy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The profile's settings, overridden by every option given."""
    names = {f.name for f in fields(StudyConfig)} - {"profile"}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return StudyConfig.from_profile(args.profile, **overrides)


def default_threads(world: int) -> int:
    """Cores per process; 1 when the machine is already busy (load average ≥ cores − ½): small CPU ops on
    threads that must wait for a core cost more than they gain (figures: docs/benchmarks.md)."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except (AttributeError, OSError):
        busy = False
    return 1 if busy else max(1, cores // world)


def main(args: argparse.Namespace) -> int:
    import torch

    from normlab.study import run_study

    torch.set_num_threads(args.threads or default_threads(int(os.environ.get("WORLD_SIZE", "1"))))
    try:
        cfg = config_from_args(args)
        run_study(cfg, out=args.out, name=args.name, progress=not args.no_progress, device=args.device)
    except (StudyConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"normlab study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"\nnormlab study: {e or 'interrupted'} — re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
