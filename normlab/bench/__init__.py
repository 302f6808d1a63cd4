"""``normlab bench``: normlab's norm kernels against torch, the reference formulas and ``copy_`` bandwidth.

Hygiene (DESIGN §5): every measurement is the median of ``--samples`` (≥ 7) samples, each at least
``--min-time`` (30 ms) of back-to-back calls; a ``copy_`` of the same tensor is timed in the same run as the
bandwidth ceiling; glibc's allocator is told to keep freed memory (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``; the process re-executes itself with them if they are missing) so large fresh
outputs do not page-fault on every call; load average, threads, CPU model and versions are printed.

Peak memory of fwd+bwd: on CPU, the largest sum of live bytes allocated through PyTorch's allocator
during one call, from the profiler's memory events (``profile_memory=True``) — every tensor of torch, of
``torch.compile`` code and of normlab's kernels (their outputs and gradient partials are torch tensors)
is counted. On CUDA, ``max_memory_allocated``.

``--models`` adds whole models, normlab against torch in the same process (:mod:`normlab.bench.models`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from normlab._machine import cpu_model
from normlab.bench.cases import OPS
from normlab.cli import comma_list, device, positive_float, positive_int, shape

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
#: the ladder of DESIGN §5, rows × hidden: one-row calls (a decode step), the study model's 768×128,
#: then calls from a few MB to a few hundred MB
STANDARD_SHAPES = [(1, 64), (1, 4096), (768, 128), (4096, 768), (2048, 4096), (8192, 4096), (32768, 1024), (2048, 8192)]
QUICK_SHAPES = [(1, 4096), (768, 128), (4096, 768)]
MODEL_GROUPS = ("study", "nanogpt", "llama")  # see normlab.bench.models
DTYPES = ("float32", "bfloat16")
ALL_DTYPES = (*DTYPES, "float16")
MODES = ("fwd", "fwd+bwd")


def _shape_list(shapes) -> str:
    return ", ".join(f"{r}x{n}" for r, n in shapes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {_shape_list(QUICK_SHAPES)} only, no torch.compile, no eager reference formula "
                             "nor normlab add-then-norm, smaller --models inputs: under 2 minutes")
    parser.add_argument("--ops", type=comma_list(str, OPS), default=list(OPS),
                        help=f"comma-separated, of {', '.join(OPS)} (default: all)")
    parser.add_argument("--shapes", type=comma_list(shape), default=None,
                        help=f"comma-separated ROWSxN, positive integers (default: the ladder {_shape_list(STANDARD_SHAPES)})")
    parser.add_argument("--dtypes", type=comma_list(str, ALL_DTYPES), default=list(DTYPES),
                        help=f"comma-separated, of {', '.join(ALL_DTYPES)} (default: {','.join(DTYPES)})")
    parser.add_argument("--modes", type=comma_list(str, MODES), default=list(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default: both)")
    parser.add_argument("--device", type=device, default="cpu", help="device of the tensors: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (the native kernels run on torch's pool), ≥ 1 (default: all cores)")
    parser.add_argument("--samples", type=int, default=7, help="samples per measurement (median taken; at least 7)")
    parser.add_argument("--min-time", type=positive_float, default=0.03, help="seconds per sample (at least 0.03)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile of the reference (default: on unless --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument("--models", type=comma_list(str, MODEL_GROUPS), nargs="?", const=list(MODEL_GROUPS), default=[],
                        help=f"also time whole models, normlab against torch: comma-separated, of {', '.join(MODEL_GROUPS)} "
                             "(no value: all) — the study GPT's training step with normlab vs torch.nn norms, a torch.nn "
                             "nanoGPT's training step patched vs unpatched, a Hugging Face Llama forward and decode step "
                             "patched vs unpatched")
    parser.add_argument("--no-ops", dest="run_ops", action="store_false", help="skip the op ladder (with --models: the models only)")
    parser.add_argument("--out", default="runs/bench", help="directory for results.json, results.md and results.png")


def _ensure_allocator_env() -> None:
    """Re-execute this very command with the allocator settings if they are not in the environment."""
    if all(os.environ.get(k) for k in MALLOC_ENV) or os.environ.get("NORMLAB_BENCH_REEXEC"):
        return
    env = {**os.environ, **{k: os.environ.get(k) or v for k, v in MALLOC_ENV.items()}, "NORMLAB_BENCH_REEXEC": "1"}
    sys.stdout.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def _cpu_isa() -> str:
    """The ISA build of the native cpu kernels in use, or why there is none."""
    try:
        from normlab.kernels import cpu
    except Exception as exc:  # no native build here
        return f"none ({type(exc).__name__})"
    return cpu.isa()


def environment(device: str) -> dict:
    import numpy
    import torch

    import normlab

    load1, load5, _ = os.getloadavg()
    env = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(load1, 2), round(load5, 2)],
        "malloc": {k: os.environ.get(k) for k in MALLOC_ENV},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "normlab": normlab.__version__,
        "backends": normlab.dispatch.available(),
        "cpu_isa": _cpu_isa(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        from importlib.metadata import version

        env["transformers"] = version("transformers")
    except Exception:  # not installed: the llama rows say so
        env["transformers"] = None
    return env


def _usage_error(message: str) -> None:
    """Exit as argparse does for a bad argument (status 2), for checks that span several flags."""
    print(f"normlab bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):  # GPU path: triton vs torch, compiled reference, Liger-Kernel
        if args.models or not args.run_ops:
            _usage_error("--models and --no-ops are CPU options: the GPU bench times the ops only")
        from normlab.bench import cuda

        if args.out == "runs/bench":
            args.out = "runs/bench-cuda"
        return cuda.main(args)
    _ensure_allocator_env()
    from normlab.bench.run import run_all

    if args.samples < 7 or args.min_time < 0.03:
        raise SystemExit("--samples must be >= 7 and --min-time >= 0.03 (DESIGN §5)")
    if not (args.run_ops or args.models):
        _usage_error("--no-ops without --models: nothing to time")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    compile_ref = (not args.quick) if args.compile is None else args.compile
    shapes = args.shapes or (QUICK_SHAPES if args.quick else STANDARD_SHAPES)
    env = environment(args.device)
    print(f"normlab bench — {env['cpu']}, {env['cores']} cores; threads {env['torch_threads']} (torch's pool, the native kernels' too), kernels {env['cpu_isa']}")
    print(f"versions: python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, normlab {env['normlab']}")
    print("allocator: " + " ".join(f"{k}={v}" for k, v in env["malloc"].items()))
    print(f"load average: {env['load_average'][0]} (1 min), {env['load_average'][1]} (5 min)")
    if env["load_average"][0] > 0.5:
        print(f"WARNING: machine not idle (load average {env['load_average'][0]}); figures taken under load")
    t0 = time.time()
    results = run_all(
        ops=args.ops, shapes=shapes, dtypes=args.dtypes, modes=args.modes,
        device=args.device, samples=args.samples, min_time=args.min_time, compile_reference=compile_ref,
        memory=args.memory, secondary=not args.quick,
    ) if args.run_ops else []
    model_rows = []
    if args.models:
        from normlab.bench.models import run_models

        model_rows = run_models(args.models, samples=args.samples, min_time=args.min_time, quick=args.quick)
    env["load_average_after"] = [round(v, 2) for v in os.getloadavg()[:2]]
    env["seconds"] = round(time.time() - t0, 1)
    env["command"] = " ".join(["normlab", "bench", *sys.orig_argv[sys.orig_argv.index("bench") + 1:]]) if "bench" in sys.orig_argv else " ".join(sys.orig_argv)

    from normlab.bench.report import markdown, models_markdown, plot, summary, targets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results) if results else ""
    short = "\n".join(t for t in (summary(results) if results else "", targets(results), models_markdown(model_rows)) if t)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": results, "models": model_rows}, indent=1))
    (out / "results.md").write_text(short + "\n" + table)
    written = "results.json, results.md"
    if results:
        plot(results, out / "results.png")
        written += ", results.png"
    print(table)  # the long table first, the summaries last on the screen
    print(short)
    print(f"took {env['seconds']} s; load average after: {env['load_average_after'][0]}; wrote {out}/{written}")
    return 0
