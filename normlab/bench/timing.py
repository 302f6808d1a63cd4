"""The one timer of the benchmarks and of the study's speed measurements.

A measurement is the median over samples of the time per call of back-to-back calls, each sample lasting
at least ``min_time``, after a warm-up call and a calibration of how many calls fill a sample. The clock
is ``time.perf_counter`` read after ``sync()``: nothing on the CPU, ``torch.cuda.synchronize`` on a CUDA
device (:func:`device_sync`), so queued kernels are counted where they finish.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch

Sync = Callable[[], None]


def _no_sync() -> None:
    pass


def device_sync(device: str | torch.device) -> Sync:
    """What to call before reading the clock: ``torch.cuda.synchronize`` on CUDA, nothing elsewhere."""
    return torch.cuda.synchronize if str(device).startswith("cuda") else _no_sync


def _calibrated(fn: Callable[[], object], sync: Sync, min_time: float) -> int:
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


def _sample(fn: Callable[[], object], sync: Sync, reps: int, min_time: float) -> tuple[float, int]:
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


def interleaved_medians(fns: dict[str, Callable[[], object]], sync: Sync, samples: int,
                        min_time: float, calls: dict[str, int] | None = None) -> dict[str, float | Exception]:
    """Median time per call of each function, sampled round-robin: round r takes one sample of every
    function in turn, so a slow drift of the machine (another tenant's memory traffic) shifts all of
    them alike. Each round takes the functions in a new order (a fixed-seed shuffle), since a sample can
    be slower right after some others (docs/benchmarks.md). Each sample lasts at least ``min_time``
    (:func:`_sample`). A function that raises maps to the error. ``calls``, when given, receives the
    median number of back-to-back calls per sample of each function."""
    reps, out = {}, {}
    for name, fn in fns.items():
        try:
            reps[name] = _calibrated(fn, sync, min_time)
        except Exception as exc:  # noqa: BLE001 — report and go on: one failing comparison must not hide the rest
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


def median_time(fn: Callable[[], object], samples: int = 7, min_time: float = 0.03, sync: Sync = _no_sync) -> float:
    """Median seconds per call of ``fn`` alone (:func:`interleaved_medians` of one function); its error
    is raised."""
    out = interleaved_medians({"fn": fn}, sync, samples, min_time)["fn"]
    if isinstance(out, Exception):
        raise out
    return out
