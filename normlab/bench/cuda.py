"""``normlab bench --device cuda``: normlab's Triton kernels against torch eager, ``torch.compile`` of the
reference formula and Liger-Kernel (when importable), as % of the same-run device ``copy_`` bandwidth.

Timing (DESIGN §5, GPU flavour): CUDA events around back-to-back calls that fill at least ``--min-time``
per sample, the median of ``--samples`` samples, after a warm-up call (which compiles). Bytes counted:
fwd = read x + write y (+ params); fused add + norm = 4N; fwd+bwd = 5N (fused 8N) + 3 × params —
the same accounting as the CPU bench. The ``copy_`` of the same tensor, timed in the same run, is the
bandwidth ceiling (2N bytes). fwd+bwd is the forward followed by ``torch.autograd.grad`` of every
input; peak memory is ``torch.cuda.max_memory_allocated`` above the inputs during one such call.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

import normlab
from normlab.bench import MODES, QUICK_SHAPES, STANDARD_SHAPES, BenchArgumentError
from normlab.bench.cases import FUSED, llama_rms_norm, textbook_layer_norm
from normlab.bench.cases import NORM_OPS as OPS  # DyT has no Triton comparison here

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS = 1e-6


# ---- timing ---------------------------------------------------------------------------------------
def cuda_time(fn: Callable[[], object], samples: int, min_time: float) -> float:
    """Median seconds per call: each sample times ``calls`` back-to-back calls with CUDA events, ``calls``
    chosen so that a sample lasts at least ``min_time``."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(calls: int) -> float:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    calls, elapsed = 1, timed(1)
    while elapsed < min_time / 8:
        calls *= 4
        elapsed = timed(calls)
    calls = max(1, math.ceil(calls * min_time / elapsed))
    return statistics.median(timed(calls) / calls for _ in range(samples))


# ---- what is compared -------------------------------------------------------------------------------
def _liger():
    """Liger-Kernel's autograd functions, or None when it is not installed."""
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:  # not installed, or incompatible with this torch/triton
        return None
    return LigerRMSNormFunction, LigerLayerNormFunction, LigerFusedAddRMSNormFunction


def _add_then(norm):
    """The unfused residual add + norm a model writes: ``s = x + r``, then ``(norm(s), s)``."""

    def fused(x, r, w, b):
        s = x + r
        return norm(s, w, b), s

    return fused


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


def implementations(op: str, n: int, compile_reference: bool) -> dict[str, Callable]:
    """Name → function of ``(x, residual, weight, bias)`` returning the op's outputs (a tuple)."""
    if op == "rms_norm":
        impls = {
            "normlab (triton)": lambda x, r, w, b: (normlab.rms_norm(x, n, w, EPS, backend="triton"),),
            "torch": lambda x, r, w, b: (F.rms_norm(x, (n,), w, EPS),),
            "reference": lambda x, r, w, b: (llama_rms_norm(x, w),),
        }
    elif op == "layer_norm":
        impls = {
            "normlab (triton)": lambda x, r, w, b: (normlab.layer_norm(x, n, w, b, EPS, backend="triton"),),
            "torch": lambda x, r, w, b: (F.layer_norm(x, (n,), w, b, EPS),),
            "reference": lambda x, r, w, b: (textbook_layer_norm(x, w, b),),
        }
    elif op == "add_rms_norm":
        impls = {
            "normlab (triton)": lambda x, r, w, b: normlab.add_rms_norm(x, r, n, w, EPS, backend="triton"),
            "torch": _add_then(lambda s, w, b: F.rms_norm(s, (n,), w, EPS)),
            "reference": _add_then(lambda s, w, b: llama_rms_norm(s, w)),
        }
    else:
        impls = {
            "normlab (triton)": lambda x, r, w, b: normlab.add_layer_norm(x, r, n, w, b, EPS, backend="triton"),
            "torch": _add_then(lambda s, w, b: F.layer_norm(s, (n,), w, b, EPS)),
            "reference": _add_then(textbook_layer_norm),
        }
    if compile_reference:
        impls["compiled reference"] = torch.compile(impls["reference"], dynamic=True)
    liger = _liger()
    if liger is not None:
        rms, ln, add_rms = liger
        if op == "rms_norm":
            impls["liger"] = lambda x, r, w, b: (rms.apply(x, w, EPS, 0.0, "llama", False),)
        elif op == "layer_norm":
            impls["liger"] = lambda x, r, w, b: (ln.apply(x, w, b, EPS),)
        elif op == "add_rms_norm":
            impls["liger"] = lambda x, r, w, b: tuple(add_rms.apply(x, r, w, EPS, 0.0, "llama", False))
    return impls


def bytes_moved(op: str, mode: str, x: torch.Tensor, params: list[torch.Tensor]) -> int:
    big = x.numel() * x.element_size()
    p = sum(t.numel() * t.element_size() for t in params)
    if mode == "fwd":
        return (4 if op in FUSED else 2) * big + p
    return (8 if op in FUSED else 5) * big + 3 * p


# ---- one case ---------------------------------------------------------------------------------------
def _inputs(op, rows, n, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    x = randn(rows, n)
    r = randn(rows, n) if op in FUSED else None
    w = randn(n, scale=0.1, shift=1.0)
    b = randn(n, scale=0.1) if op in ("layer_norm", "add_layer_norm") else None
    return x, r, w, b


def run_case(op, rows, n, dtype, mode, device, impls, samples, min_time) -> list[dict]:
    x, r, w, b = _inputs(op, rows, n, dtype, device)
    copy_out = torch.empty_like(x)
    t_copy = cuda_time(lambda: copy_out.copy_(x), samples, min_time)
    copy_gbs = 2 * x.numel() * x.element_size() / t_copy / 1e9
    leaves = [t for t in (x, r, w, b) if t is not None]
    nbytes = bytes_moved(op, mode, x, [t for t in (w, b) if t is not None])
    results = []
    for name, fn in impls.items():
        if name == "reference":
            continue  # the eager reference is what torch.compile compiles; torch's own op is the eager bar
        if mode == "fwd":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(x, r, w, b)
        else:
            for t in leaves:
                t.requires_grad_(True)
            grads = [torch.ones_like(o) for o in fn(x, r, w, b)]

            def call(fn=fn, grads=grads):
                outs = fn(x, r, w, b)
                return torch.autograd.grad(outs, leaves, grads)
        try:
            seconds = cuda_time(call, samples, min_time)
            peak = None
            if mode == "fwd+bwd":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as exc:  # e.g. a comparison library that does not support this case
            results.append({"impl": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        finally:
            for t in leaves:
                t.requires_grad_(False)
        gbs = nbytes / seconds / 1e9
        results.append({"impl": name, "ms": seconds * 1e3, "GB/s": gbs, "% of copy": 100 * gbs / copy_gbs, "peak MiB": peak})
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
            lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {r['impl']} | error: {r['error']} |||||")
            continue
        lines.append(
            f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
            f"{r['% of copy']:.0f} % | {f(r['x torch'], '.2f')} | {f(r['x compiled'], '.2f')} | {f(r['peak MiB'], '.0f')} |"
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
            out.append(f"{'ok ' if r['% of copy'] >= 85 else 'MISS'} fwd ≥ 85 % of copy: {case}: {r['% of copy']:.0f} %")
        if r["mode"] == "fwd+bwd" and r["op"] in ("rms_norm", "layer_norm") and r["x torch"] is not None:
            out.append(f"{'ok ' if r['x torch'] >= 1 else 'MISS'} fwd+bwd not slower than torch: {case}: ×{r['x torch']:.2f}")
    return out


def benchmark(*, ops=OPS, shapes=None, dtypes=("float32", "bfloat16"), modes=MODES, device: str = "cuda",
              samples: int = 7, min_time: float = 0.03, compile_reference: bool | None = None, quick: bool = False,
              out: str | Path = "runs/bench-cuda", command: str = "") -> int:
    """Time ``ops`` on ``shapes`` × ``dtypes`` × ``modes`` on a CUDA ``device``, print the table and write
    ``results.json`` and ``results.md`` to ``out`` (the options as in :func:`normlab.bench.benchmark`)."""
    if not torch.cuda.is_available():
        raise BenchArgumentError("--device cuda: no CUDA device is visible to torch")
    if samples < 7 or min_time < 0.03:
        raise BenchArgumentError("--samples must be >= 7 and --min-time >= 0.03 (DESIGN §5)")
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
