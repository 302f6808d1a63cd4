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
STANDARD_SHAPES = [(8192, 4096), (32768, 1024), (2048, 8192), (4096, 768)]
QUICK_SHAPES = [(4096, 768)]
DTYPES = ("float32", "bfloat16")
ALL_DTYPES = (*DTYPES, "float16")
MODES = ("fwd", "fwd+bwd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one shape (4096x768), no torch.compile: under 2 minutes")
    parser.add_argument("--ops", type=comma_list(str, OPS), default=list(OPS),
                        help=f"comma-separated, of {', '.join(OPS)} (default: all)")
    parser.add_argument("--shapes", type=comma_list(shape), default=None,
                        help="comma-separated ROWSxN, positive integers (default: the standard shapes)")
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
    return env


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):  # GPU path: triton vs torch, compiled reference, Liger-Kernel
        from normlab.bench import cuda

        if args.out == "runs/bench":
            args.out = "runs/bench-cuda"
        return cuda.main(args)
    _ensure_allocator_env()
    from normlab.bench.run import run_all

    if args.samples < 7 or args.min_time < 0.03:
        raise SystemExit("--samples must be >= 7 and --min-time >= 0.03 (DESIGN §5)")
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
        memory=args.memory,
    )
    env["load_average_after"] = [round(v, 2) for v in os.getloadavg()[:2]]
    env["seconds"] = round(time.time() - t0, 1)
    env["command"] = " ".join(["normlab", "bench", *sys.orig_argv[sys.orig_argv.index("bench") + 1:]]) if "bench" in sys.orig_argv else " ".join(sys.orig_argv)

    from normlab.bench.report import markdown, plot, summary

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, short = markdown(results), summary(results)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
    (out / "results.md").write_text(short + "\n" + table)
    plot(results, out / "results.png")
    print(table)
    print(short)
    print(f"took {env['seconds']} s; load average after: {env['load_average_after'][0]}; wrote {out}/results.json, results.md, results.png")
    return 0
