"""``normlab bench``: normlab's norm kernels against torch, the reference formulas and ``copy_`` bandwidth.

Hygiene (docs/architecture.md §8): every measurement is the median of ``--samples`` (≥ 7) samples, each at least
``--min-time`` (30 ms) of back-to-back calls; a ``copy_`` of the same tensor is timed in the same run as the
bandwidth ceiling; glibc's allocator is told to keep freed memory (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``; ``normlab bench`` re-executes itself with them if they are missing) so large fresh
outputs do not page-fault on every call; load average, threads, CPU model and versions are printed.

Peak memory of fwd+bwd: on CPU, the largest sum of live bytes allocated through PyTorch's allocator
during one call, from the profiler's memory events (``profile_memory=True``) — every tensor of torch, of
``torch.compile`` code and of normlab's kernels (their outputs and gradient partials are torch tensors)
is counted. On CUDA, ``max_memory_allocated``.

``--models`` adds whole models, normlab against torch in the same process (:mod:`normlab.bench.models`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from normlab._machine import cpu_model
from normlab.bench.cases import OPS

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
#: the ladder of docs/architecture.md §8, rows × hidden: one-row calls (a decode step), the study model's 768×128,
#: then calls from a few MB to a few hundred MB
STANDARD_SHAPES = [(1, 64), (1, 4096), (768, 128), (4096, 768), (2048, 4096), (8192, 4096), (32768, 1024), (2048, 8192)]
QUICK_SHAPES = [(1, 4096), (768, 128), (4096, 768)]
MODEL_GROUPS = ("study", "nanogpt", "llama")  # see normlab.bench.models
DTYPES = ("float32", "bfloat16")
ALL_DTYPES = (*DTYPES, "float16")
MODES = ("fwd", "fwd+bwd")


def _cpu_isa() -> str:
    """The ISA build of the native cpu kernels in use, or why there is none."""
    try:
        from normlab.kernels import cpu
    except Exception as exc:  # noqa: BLE001 — no native build here, or one that fails to load in any way
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
    from importlib.metadata import PackageNotFoundError, version

    try:
        env["transformers"] = version("transformers")
    except PackageNotFoundError:  # not installed: the llama rows say so
        env["transformers"] = None
    return env


class BenchArgumentError(ValueError):
    """Options out of range or that cannot go together (``normlab bench`` reports it as a usage error, status 2)."""


def benchmark(*, ops=OPS, shapes=None, dtypes=DTYPES, modes=MODES, device: str = "cpu", threads: int | None = None,
              samples: int = 7, min_time: float = 0.03, compile_reference: bool | None = None, memory: bool = True,
              models=(), run_ops: bool = True, quick: bool = False, out: str | Path | None = None,
              command: str = "") -> int:
    """Time ``ops`` on ``shapes`` × ``dtypes`` × ``modes`` (and, with ``models``, whole models), print the tables
    and write ``results.json``, ``results.md`` and ``results.png`` to ``out`` (default ``runs/bench``, on CUDA
    ``runs/bench-cuda``). ``shapes=None``: the standard ladder, or the quick shapes under ``quick``;
    ``compile_reference=None``: ``torch.compile`` of the reference unless ``quick``; ``command`` is recorded in
    ``results.json``. Raises :class:`BenchArgumentError` for options out of range or that do not go together,
    before any work."""
    if device.startswith("cuda"):  # GPU path: triton vs torch, compiled reference, Liger-Kernel
        if models or not run_ops:
            raise BenchArgumentError("--models and --no-ops are CPU options: the GPU bench times the ops only")
        from normlab.bench import cuda

        return cuda.benchmark(ops=ops, shapes=shapes, dtypes=dtypes, modes=modes, device=device, samples=samples,
                              min_time=min_time, compile_reference=compile_reference, quick=quick,
                              out=out or "runs/bench-cuda", command=command)
    from normlab.bench.run import run_all

    if samples < 7 or min_time < 0.03:
        raise BenchArgumentError("--samples must be >= 7 and --min-time >= 0.03")
    if not (run_ops or models):
        raise BenchArgumentError("--no-ops without --models: nothing to time")
    import torch

    if threads:
        torch.set_num_threads(threads)
    compile_ref = (not quick) if compile_reference is None else compile_reference
    shapes = shapes or (QUICK_SHAPES if quick else STANDARD_SHAPES)
    env = environment(device)
    print(f"normlab bench — {env['cpu']}, {env['cores']} cores; "
          f"threads {env['torch_threads']} (torch's pool, the native kernels' too), kernels {env['cpu_isa']}")
    print(f"versions: python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, normlab {env['normlab']}")
    print("allocator: " + " ".join(f"{k}={v}" for k, v in env["malloc"].items()))
    print(f"load average: {env['load_average'][0]} (1 min), {env['load_average'][1]} (5 min)")
    if env["load_average"][0] > 0.5:
        print(f"WARNING: machine not idle (load average {env['load_average'][0]}); figures taken under load")
    t0 = time.time()
    results = run_all(
        ops=ops, shapes=shapes, dtypes=dtypes, modes=modes,
        device=device, samples=samples, min_time=min_time, compile_reference=compile_ref,
        memory=memory, secondary=not quick,
    ) if run_ops else []
    model_rows = []
    if models:
        from normlab.bench.models import run_models

        model_rows = run_models(models, samples=samples, min_time=min_time, quick=quick)
    env["load_average_after"] = [round(v, 2) for v in os.getloadavg()[:2]]
    env["seconds"] = round(time.time() - t0, 1)
    env["command"] = command

    from normlab.bench.report import markdown, models_markdown, plot, summary, targets

    out = Path(out or "runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results) if results else ""
    sections = (summary(results) if results else "", targets(results), models_markdown(model_rows))
    short = "\n".join(t for t in sections if t)
    record = {"environment": env, "results": results, "models": model_rows}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "results.md").write_text(short + "\n" + table)
    written = "results.json, results.md"
    if results:
        plot(results, out / "results.png")
        written += ", results.png"
    print(table)  # the long table first, the summaries last on the screen
    print(short)
    print(f"took {env['seconds']} s; load average after: {env['load_average_after'][0]}; wrote {out}/{written}")
    return 0
