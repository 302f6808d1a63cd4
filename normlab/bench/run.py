"""Timing and peak memory of every (op, shape, dtype, mode, implementation)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from normlab.bench.cases import bytes_moved, implementations, make_inputs, runner, upstream_grads
from normlab.bench.timing import device_sync, interleaved_medians

COPY = "copy_"  # the same-run bandwidth ceiling, sampled among the implementations


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Largest live total of bytes allocated during one call (see the package docstring)."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_all(ops, shapes, dtypes, modes, device, samples, min_time, compile_reference, memory,
            secondary=True) -> list[dict]:
    sync = device_sync(device)
    results = []
    for op in ops:
        for rows, n in shapes:
            impls = implementations(op, n, device, compile_reference, secondary)
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                plain = make_inputs(op, rows, n, dtype, device, requires_grad=False)
                dst = torch.empty_like(plain.x)
                copy_bytes = 2 * plain.x.numel() * plain.x.element_size()
                for mode in modes:
                    inputs = plain if mode == "fwd" else make_inputs(op, rows, n, dtype, device, requires_grad=True)
                    grads = upstream_grads(rows, n, dtype, device)
                    nbytes = bytes_moved(op, mode, inputs)
                    fns = {name: runner(impl, inputs, mode, grads) for name, impl in impls.items()}
                    calls: dict[str, int] = {}
                    timed_fns = {COPY: lambda dst=dst, plain=plain: dst.copy_(plain.x), **fns}
                    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                        timed = interleaved_medians(timed_fns, sync, samples, min_time, calls)
                    copy_s = timed.pop(COPY)
                    for name, fn in fns.items():
                        rec = {"op": op, "rows": rows, "n": n, "dtype": dtype_name, "mode": mode, "impl": name,
                               "bytes": nbytes, "copy_ms": copy_s * 1e3, "copy_gbps": copy_bytes / copy_s / 1e9}
                        s = timed[name]
                        if isinstance(s, Exception):
                            rec["error"] = f"{type(s).__name__}: {str(s).splitlines()[0][:200]}"
                        else:
                            rec.update(ms=s * 1e3, gbps=nbytes / s / 1e9, calls_per_sample=calls[name])
                            rec["pct_copy"] = 100 * rec["gbps"] / rec["copy_gbps"]
                            if memory and mode == "fwd+bwd":
                                rec["peak_mb"] = peak_bytes(fn, device) / 2**20
                        results.append(rec)
                        state = rec.get("error") or f"{rec['ms']:.4g} ms, {rec['pct_copy']:.0f}% of copy"
                        print(f"  {op:15s} {rows}x{n:<5d} {dtype_name:8s} {mode:7s} {name:24s} {state}", flush=True)
                    del inputs, grads
    return results
