"""``normlab study``: train a grid of norm variants and write ``report.md`` with plots.

Data parallel: ``torchrun --nproc_per_node=2 -m normlab study …`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from normlab.cli.argtypes import comma_list, device, dir_name, number_in, positive_float, positive_int
from normlab.study.config import DEFAULT_VARIANTS, EXPERIMENTS, NORMS, PLACEMENTS, StudyConfig, StudyConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = StudyConfig()
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated <norm>-<placement>; norms {', '.join(NORMS)}; "
                        f"placements {', '.join(PLACEMENTS)} (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help="training steps per variant (default: %(default)s)")
    p.add_argument("--preset", choices=["gpt2", "llama"], default=None,
                   help="model preset; --variants still sets norm and placement")
    p.add_argument("--n-layer", type=positive_int, default=d.n_layer)
    p.add_argument("--n-head", type=positive_int, default=d.n_head)
    p.add_argument("--d-model", type=positive_int, default=d.d_model)
    p.add_argument("--block-size", type=positive_int, default=d.block_size,
                   help="context length (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="global batch size (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    p.add_argument("--min-lr-ratio", type=number_in(0, 1), default=d.min_lr_ratio,
                   help="the cosine decay's final learning rate, as a fraction of --lr (default: %(default)s)")
    p.add_argument("--beta1", type=number_in(0, 1, hi_open=True), default=d.beta1,
                   help="AdamW's β₁ (default: %(default)s)")
    p.add_argument("--beta2", type=number_in(0, 1, hi_open=True), default=d.beta2,
                   help="AdamW's β₂ (default: %(default)s)")
    p.add_argument("--weight-decay", type=number_in(0, math.inf), default=d.weight_decay,
                   help="AdamW's weight decay, on weight matrices only (default: %(default)s)")
    p.add_argument("--grad-clip", type=number_in(0, math.inf), default=d.grad_clip,
                   help="max gradient norm; 0: no clipping (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-interval", type=positive_int, default=d.eval_interval)
    p.add_argument("--eval-iters", type=positive_int, default=d.eval_iters)
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: CPython's help text, pydoc_data.topics)")
    p.add_argument("--experiments", type=comma_list(int, EXPERIMENTS), default=list(d.experiments),
                   help="comma-separated, which of 1-7 (default: all)")
    p.add_argument("--share-widths", type=comma_list(positive_int), default=list(d.share_widths),
                   help="model widths of experiment 7, multiples of 32 (default: 128,256,512)")
    p.add_argument("--grad-depths", type=comma_list(positive_int), default=list(d.grad_depths),
                   help="comma-separated depths of experiment 2 (default: 6,12, the paper's)")
    p.add_argument("--grad-d-model", type=positive_int, default=d.grad_d_model,
                   help="width of experiment 2's models (default: %(default)s, the paper's)")
    p.add_argument("--grad-seeds", type=positive_int, default=d.grad_seeds,
                   help="seeds of experiment 2 (default: %(default)s)")
    p.add_argument("--warmup-lr", type=positive_float, default=d.warmup_lr,
                   help="high learning rate of experiment 3 (default: %(default)s)")
    p.add_argument("--warmup-steps", type=positive_int, default=d.warmup_steps, help="steps per run of experiment 3")
    p.add_argument("--out", default="runs", help="parent directory of the study directory (default: %(default)s)")
    p.add_argument("--name", type=dir_name, default=None,
                   help="study directory name inside --out "
                        "(default: 'default' for the default study, else a config hash)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process, ≥ 1 (default: cores / processes, 1 when the machine is busy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    return StudyConfig(
        variants=args.variants, steps=args.steps, preset=args.preset, n_layer=args.n_layer, n_head=args.n_head,
        d_model=args.d_model, block_size=args.block_size, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio, beta1=args.beta1, beta2=args.beta2, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed, eval_interval=args.eval_interval, eval_iters=args.eval_iters, data=args.data,
        experiments=args.experiments, grad_depths=args.grad_depths,
        grad_d_model=args.grad_d_model, grad_seeds=args.grad_seeds, share_widths=args.share_widths,
        warmup_lr=args.warmup_lr,
        warmup_steps=args.warmup_steps,
    )


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
