"""``normlab bench --device cuda``: normlab's Triton kernels against torch eager, ``torch.compile`` of the
reference formula and Liger-Kernel (when importable), as % of the same-run device ``copy_`` bandwidth.

Inputs, byte counts, the timed calls and the timer are the CPU bench's (:mod:`normlab.bench.cases`,
:mod:`normlab.bench.timing`, the clock read after ``torch.cuda.synchronize``): medians of ``--samples``
samples of ≥ ``--min-time`` each, every implementation and the same-run ``copy_`` of the input (the
bandwidth ceiling, 2N bytes) sampled round-robin. Peak memory is ``torch.cuda.max_memory_allocated``
above the inputs during one fwd+bwd call.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

import normlab
from normlab.bench import MODES, QUICK_SHAPES, STANDARD_SHAPES, BenchArgumentError, cases
from normlab.bench.cases import EPS
from normlab.bench.cases import NORM_OPS as OPS  # DyT has no Triton comparison here
from normlab.bench.run import peak_bytes
from normlab.bench.timing import device_sync, interleaved_medians

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- what is compared -------------------------------------------------------------------------------
def _liger():
    """Liger-Kernel's autograd functions, or None when it is not installed."""
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:  # noqa: BLE001 — not installed, or incompatible with this torch/triton in any way
        return None
    return LigerRMSNormFunction, LigerLayerNormFunction, LigerFusedAddRMSNormFunction


def liger_extra_impls() -> dict[str, dict[str, Callable]]:
    """Liger-Kernel for a runner keyed by op: ``op → {"liger": (n, device) → fn(inputs) | None}``, where
    ``inputs`` has ``x``, ``residual``, ``weight``, ``bias`` (CUDA devices only; empty without Liger)."""
    liger = _liger()
    if liger is None:
        return {}
    rms, ln, add_rms = liger

    def on_cuda(make):
        return lambda n, device: make() if str(device).startswith("cuda") else None

    return {
        "rms_norm": {"liger": on_cuda(lambda: lambda i: (rms.apply(i.x, i.weight, EPS, 0.0, "llama", False),))},
        "layer_norm": {"liger": on_cuda(lambda: lambda i: (ln.apply(i.x, i.weight, i.bias, EPS),))},
        "add_rms_norm": {"liger": on_cuda(
            lambda: lambda i: tuple(add_rms.apply(i.x, i.residual, i.weight, EPS, 0.0, "llama", False)))},
    }


#: The entries of :func:`normlab.bench.cases.implementations` compared here, under their names in this report.
#: The eager reference formula is built only to be compiled: torch's own op is the eager bar.
COMPARED = {"normlab": "normlab (triton)", "torch": "torch", "compiled reference": "compiled reference"}
COPY = "copy_"  # the same-run bandwidth ceiling, sampled among the implementations


def implementations(op: str, n: int, compile_reference: bool, device: str = "cuda") -> dict[str, Callable]:
    """Name → forward function of the op's :class:`~normlab.bench.cases.Inputs`: the CPU bench's cases
    with normlab on its Triton backend, and Liger-Kernel when it is importable."""
    impls = cases.implementations(op, n, device, compile_reference, secondary=False, backend="triton")
    out = {COMPARED[name]: fn for name, fn in impls.items() if name in COMPARED}
    for name, build in liger_extra_impls().get(op, {}).items():
        fn = build(n, device)
        if fn is not None:
            out[name] = fn
    return out


# ---- one case ---------------------------------------------------------------------------------------
def run_case(op, rows, n, dtype, mode, device, impls, samples, min_time) -> list[dict]:
    """Every implementation of one (op, shape, dtype, mode) and the ``copy_`` of its input, sampled
    round-robin by the shared timer; one result per implementation (an ``error`` where it failed)."""
    plain = cases.make_inputs(op, rows, n, dtype, device, requires_grad=False)
    inputs = plain if mode == "fwd" else cases.make_inputs(op, rows, n, dtype, device, requires_grad=True)
    grads = cases.upstream_grads(rows, n, dtype, device)
    nbytes = cases.bytes_moved(op, mode, inputs)
    copy_out = torch.empty_like(plain.x)
    fns = {name: cases.runner(fn, inputs, mode, grads) for name, fn in impls.items()}
    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
        timed = interleaved_medians({COPY: lambda: copy_out.copy_(plain.x), **fns}, device_sync(device), samples,
                                    min_time)
    t_copy = timed.pop(COPY)
    copy_gbs = 2 * plain.x.numel() * plain.x.element_size() / t_copy / 1e9
    results = []
    for name, fn in fns.items():
        seconds = timed[name]
        try:
            if isinstance(seconds, Exception):
                raise seconds
            peak = peak_bytes(fn, str(device)) / 2**20 if mode == "fwd+bwd" else None
        except Exception as exc:  # noqa: BLE001 — a comparison library that fails this case is reported, not fatal
            results.append({"impl": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        gbs = nbytes / seconds / 1e9
        results.append({"impl": name, "ms": seconds * 1e3, "GB/s": gbs, "% of copy": 100 * gbs / copy_gbs,
                        "peak MiB": peak})
    base = {"op": op, "rows": rows, "n": n, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
            "copy GB/s": copy_gbs, "copy ms": t_copy * 1e3}
    for res in results:
        res.update(base)
    ms = {res["impl"]: res.get("ms") for res in results}
    for res in results:
        if "ms" in res:
            res["x torch"] = ms["torch"] / res["ms"] if ms.get("torch") else None
            res["x compiled"] = ms["compiled reference"] / res["ms"] if ms.get("compiled reference") else None
    return results


# ---- report -----------------------------------------------------------------------------------------
def markdown(results: list[dict], device_name: str) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = [f"Device: {device_name}. % of copy = GB/s ÷ same-run `copy_` GB/s; ×torch, ×compiled = speed-up.", "",
             "| op | shape | dtype | mode | impl | ms | GB/s | % of copy | × torch | × compiled | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shape = f"{r['rows']}×{r['n']}"
        if "error" in r:
            lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                         f"error: {r['error']} |||||")
            continue
        lines.append(
            f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
            f"{r['% of copy']:.0f} % | {f(r['x torch'], '.2f')} | {f(r['x compiled'], '.2f')} | "
            f"{f(r['peak MiB'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, checked on these results."""
    out = []
    for r in results:
        if r["impl"] != "normlab (triton)" or "ms" not in r:
            continue
        case = f"{r['op']} {r['rows']}×{r['n']} {r['dtype']} {r['mode']}"
        if r["mode"] == "fwd" and r["n"] >= 1024:
            verdict = "ok " if r["% of copy"] >= 85 else "MISS"
            out.append(f"{verdict} fwd ≥ 85 % of copy: {case}: {r['% of copy']:.0f} %")
        if r["mode"] == "fwd+bwd" and r["op"] in ("rms_norm", "layer_norm") and r["x torch"] is not None:
            verdict = "ok " if r["x torch"] >= 1 else "MISS"
            out.append(f"{verdict} fwd+bwd not slower than torch: {case}: ×{r['x torch']:.2f}")
    return out


def benchmark(*, ops=OPS, shapes=None, dtypes=("float32", "bfloat16"), modes=MODES, device: str = "cuda",
              samples: int = 7, min_time: float = 0.03, compile_reference: bool | None = None, quick: bool = False,
              out: str | Path = "runs/bench-cuda", command: str = "") -> int:
    """Time ``ops`` on ``shapes`` × ``dtypes`` × ``modes`` on a CUDA ``device``, print the table and write
    ``results.json`` and ``results.md`` to ``out`` (the options as in :func:`normlab.bench.benchmark`)."""
    if not torch.cuda.is_available():
        raise BenchArgumentError("--device cuda: no CUDA device is visible to torch")
    if samples < 7 or min_time < 0.03:
        raise BenchArgumentError("--samples must be >= 7 and --min-time >= 0.03")
    import triton

    device = torch.device(device)
    compile_ref = (not quick) if compile_reference is None else compile_reference
    shapes = shapes or (QUICK_SHAPES if quick else STANDARD_SHAPES)
    name = torch.cuda.get_device_name(device)
    liger = _liger()
    env = {"gpu": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "normlab": normlab.__version__, "liger": None if liger is None else metadata.version("liger-kernel"),
           "samples": samples, "min_time": min_time, "command": command}
    print(f"normlab bench --device cuda — {name}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
          f"liger-kernel {env['liger'] or 'not installed'}; medians of {samples} samples of ≥ {min_time * 1e3:.0f} ms")
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for op in ops:
        for rows, n in shapes:
            impls = implementations(op, n, compile_ref)
            for dtype_name in dtypes:
                for mode in modes:
                    case = run_case(op, rows, n, DTYPES[dtype_name], mode, device, impls, samples, min_time)
                    results.extend(case)
                    pct = {r["impl"]: round(r["% of copy"]) for r in case if "ms" in r}
                    print(f"{op} {rows}×{n} {dtype_name} {mode}: % of copy {pct}", flush=True)
        env["seconds"] = round(time.time() - t0, 1)
        table, checks = markdown(results, name), targets(results)
        (out / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
        (out / "results.md").write_text(table + "\n" + "\n".join(checks) + "\n")
    print(table)
    print("\n".join(checks))
    print(f"took {env['seconds']} s; wrote {out}/results.json and results.md")
    return 0

