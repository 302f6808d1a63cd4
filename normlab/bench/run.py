"""Timing and peak memory of every (op, shape, dtype, mode, implementation)."""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable

import torch

from normlab.bench.cases import Inputs, bytes_moved, implementations, make_inputs

COPY = "copy_"  # the same-run bandwidth ceiling, sampled among the implementations


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _calibrated(fn: Callable[[], object], sync: Callable[[], None], min_time: float) -> int:
    """Calls expected to last ``min_time`` (after a warm-up call); a sample reads the clock after every
    32nd part of them (:func:`_sample`). The per-call time comes from a run of back-to-back calls lasting
    ≥ a quarter of ``min_time`` (4× more calls until it does): one call of a microsecond op is mostly
    timer and cold-cache noise."""

    def run(calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return time.perf_counter() - t0

    fn()
    sync()
    calls = 1
    while (elapsed := run(calls)) < min_time / 4:
        calls *= 4
    return max(1, math.ceil(calls * min_time / max(elapsed, 1e-9)))


def _sample(fn: Callable[[], object], sync: Callable[[], None], reps: int, min_time: float) -> tuple[float, int]:
    """(seconds per call, calls) of back-to-back calls until ``min_time`` has passed: the clock is read
    after every ``reps // 32`` calls (``reps`` from the calibration), so a sample lasts ``min_time`` and
    not much more even when calls slow down after the calibration (a thread of the call preempted)."""
    chunk, calls = max(1, reps // 32), 0
    t0 = time.perf_counter()
    while True:
        for _ in range(chunk):
            fn()
        sync()
        calls += chunk
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / calls, calls


def interleaved_medians(fns: dict[str, Callable[[], object]], sync: Callable[[], None], samples: int,
                        min_time: float, calls: dict[str, int] | None = None) -> dict[str, float | Exception]:
    """Median time per call of each function, sampled round-robin: round r takes one sample of every
    function in turn, so a slow drift of the machine (another tenant's memory traffic) shifts all of
    them alike instead of whichever happened to run during it. Each round takes the functions in a new
    order (a fixed-seed shuffle): a sample is slower right after some others (the same call measured
    0.55–0.80 ms right after ``copy_``, 0.40–0.67 ms elsewhere in a fixed cyclic order), and shuffling
    spreads that over every function. Each sample lasts at least ``min_time`` (:func:`_sample`). A
    function that raises maps to the error. ``calls``, when given, receives the median number of
    back-to-back calls per sample of each function."""
    reps, out = {}, {}
    for name, fn in fns.items():
        try:
            reps[name] = _calibrated(fn, sync, min_time)
        except Exception as exc:  # report and go on: one failing comparison must not hide the rest
            out[name] = exc
    times: dict[str, list[float]] = {name: [] for name in reps}
    counts: dict[str, list[int]] = {name: [] for name in reps}
    names, order = list(reps), random.Random(0)
    for _ in range(samples):
        for name in order.sample(names, len(names)):
            per_call, n = _sample(fns[name], sync, reps[name], min_time)
            times[name].append(per_call)
            counts[name].append(n)
    if calls is not None:
        calls.update({name: int(statistics.median(ns)) for name, ns in counts.items()})
    out.update({name: statistics.median(ts) for name, ts in times.items()})
    return out


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


def _runner(impl, inputs: Inputs, mode: str, grads: list[torch.Tensor]):
    if mode == "fwd":  # run under no_grad by the caller: a context per call would be timed with a µs op
        return lambda: impl(inputs)
    wrt = inputs.tensors()

    def fwd_bwd():
        outs = impl(inputs)
        return torch.autograd.grad(outs, wrt, grads[: len(outs)])

    return fwd_bwd


def run_all(ops, shapes, dtypes, modes, device, samples, min_time, compile_reference, memory, secondary=True) -> list[dict]:
    sync = _sync(device)
    results = []
    # every (op, shape, dtype, grad mode) compiles its own graph of the same reference function: lift
    # dynamo's per-function recompilation limit, or it would silently fall back to eager
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 8192
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
                    grads = [torch.randn(rows, n, generator=torch.Generator().manual_seed(i)).to(dtype=dtype, device=device) for i in (1, 2)]
                    nbytes = bytes_moved(op, mode, inputs)
                    fns = {name: _runner(impl, inputs, mode, grads) for name, impl in impls.items()}
                    calls: dict[str, int] = {}
                    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                        timed = interleaved_medians({COPY: lambda: dst.copy_(plain.x), **fns}, sync, samples, min_time, calls)
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
