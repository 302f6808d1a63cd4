"""``normlab bench``: the command line of :func:`normlab.bench.benchmark` (``--device cuda``:
:func:`normlab.bench.cuda.benchmark`)."""

from __future__ import annotations

import argparse
import os
import sys

from normlab.bench import (
    ALL_DTYPES,
    DTYPES,
    MALLOC_ENV,
    MODEL_GROUPS,
    MODES,
    QUICK_SHAPES,
    STANDARD_SHAPES,
    BenchArgumentError,
    benchmark,
)
from normlab.bench.cases import OPS
from normlab.cli.argtypes import comma_list, device, positive_float, positive_int, shape


def _shape_list(shapes) -> str:
    return ", ".join(f"{r}x{n}" for r, n in shapes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {_shape_list(QUICK_SHAPES)} only, no torch.compile, no eager reference formula "
                             "nor normlab add-then-norm, smaller --models inputs: under 2 minutes")
    parser.add_argument("--ops", type=comma_list(str, OPS), default=list(OPS),
                        help=f"comma-separated, of {', '.join(OPS)} (default: all)")
    parser.add_argument("--shapes", type=comma_list(shape), default=None,
                        help="comma-separated ROWSxN, positive integers "
                             f"(default: the ladder {_shape_list(STANDARD_SHAPES)})")
    parser.add_argument("--dtypes", type=comma_list(str, ALL_DTYPES), default=list(DTYPES),
                        help=f"comma-separated, of {', '.join(ALL_DTYPES)} (default: {','.join(DTYPES)})")
    parser.add_argument("--modes", type=comma_list(str, MODES), default=list(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default: both)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="device of the tensors: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (the native kernels run on torch's pool), ≥ 1 (default: all cores)")
    parser.add_argument("--samples", type=int, default=7, help="samples per measurement (median taken; at least 7)")
    parser.add_argument("--min-time", type=positive_float, default=0.03, help="seconds per sample (at least 0.03)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile of the reference (default: on unless --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument("--models", type=comma_list(str, MODEL_GROUPS), nargs="?", const=list(MODEL_GROUPS), default=[],
                        help="also time whole models, normlab against torch: comma-separated, of "
                             f"{', '.join(MODEL_GROUPS)} (no value: all) — the study GPT's training step with normlab "
                             "vs torch.nn norms, a torch.nn nanoGPT's training step patched vs unpatched, a Hugging "
                             "Face Llama forward and decode step patched vs unpatched")
    parser.add_argument("--no-ops", dest="run_ops", action="store_false",
                        help="skip the op ladder (with --models: the models only)")
    parser.add_argument("--out", default="runs/bench", help="directory for results.json, results.md and results.png")


def _ensure_allocator_env() -> None:
    """Re-execute this very command with the allocator settings if they are not in the environment."""
    if all(os.environ.get(k) for k in MALLOC_ENV) or os.environ.get("NORMLAB_BENCH_REEXEC"):
        return
    env = {**os.environ, **{k: os.environ.get(k) or v for k, v in MALLOC_ENV.items()}, "NORMLAB_BENCH_REEXEC": "1"}
    sys.stdout.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def _command() -> str:
    """This command as typed, from ``bench`` on (for results.json)."""
    argv = sys.orig_argv
    return " ".join(["normlab", "bench", *argv[argv.index("bench") + 1:]]) if "bench" in argv else " ".join(argv)


def main(args: argparse.Namespace) -> int:
    on_cuda = args.device.startswith("cuda")
    if not on_cuda:
        _ensure_allocator_env()
    out = "runs/bench-cuda" if on_cuda and args.out == "runs/bench" else args.out
    try:
        return benchmark(ops=args.ops, shapes=args.shapes, dtypes=args.dtypes, modes=args.modes, device=args.device,
                         threads=args.threads, samples=args.samples, min_time=args.min_time,
                         compile_reference=args.compile, memory=args.memory, models=args.models,
                         run_ops=args.run_ops, quick=args.quick, out=out, command=_command())
    except BenchArgumentError as e:  # checks that span several flags: a usage error, as argparse's
        print(f"normlab bench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
