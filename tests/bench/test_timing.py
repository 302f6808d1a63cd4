"""The shared timer (normlab.bench.timing) on a simulated clock: calibration, sample length, medians."""

from __future__ import annotations

import pytest
import torch

from normlab.bench import timing


def test_calibration_of_a_microsecond_call(monkeypatch):
    """A 2 µs call behind a 10 µs timer read: the per-call time comes from a long enough run of calls
    (a single timed call would put it at 12 µs). Simulated clock, no wall time."""
    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-5
        return clock[0]

    def call():
        clock[0] += 2e-6

    monkeypatch.setattr(timing.time, "perf_counter", perf_counter)
    reps = timing._calibrated(call, lambda: None, min_time=0.03)
    assert 0.029 <= reps * 2e-6 <= 0.031


def test_every_sample_lasts_min_time_even_after_a_preempted_calibration(monkeypatch):
    """A preemption during calibration makes a 2 µs call look slow, and a later slowdown makes it slow:
    each sample still runs until min_time has passed, and no longer than a little past it; the median
    is the call's time. Simulated clock."""
    clock, count, durations = [0.0], [0], []

    def call():
        count[0] += 1
        clock[0] += 1e-2 if count[0] == 10 else 2e-6  # one preempted call, inside the calibration

    def slowed():
        clock[0] += 6e-6  # 3× slower after its calibration

    real_sample = timing._sample

    def recorded(fn, sync, reps, min_time):
        t0 = clock[0]
        out = real_sample(fn, sync, reps, min_time)
        durations.append(clock[0] - t0)
        return out

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing, "_sample", recorded)
    calls = {}
    fns = {"tiny": call, "slowed": lambda: slowed() if count[0] > 20_000 else call()}
    out = timing.interleaved_medians(fns, lambda: None, samples=3, min_time=0.03, calls=calls)
    assert out["tiny"] == pytest.approx(2e-6) and calls["tiny"] * 2e-6 >= 0.03
    assert out["slowed"] == pytest.approx(6e-6) and calls["slowed"] * 6e-6 >= 0.03
    assert all(0.03 <= d <= 0.03 * 1.1 for d in durations), durations


def test_median_time_is_the_per_call_median_and_raises_the_call_error(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += 5e-6

    assert timing.median_time(call, samples=3, min_time=0.01) == pytest.approx(5e-6)

    def broken():
        raise RuntimeError("no such kernel")

    with pytest.raises(RuntimeError, match="no such kernel"):
        timing.median_time(broken, samples=3, min_time=0.01)


def test_the_clock_waits_for_cuda_only_on_cuda():
    assert timing.device_sync("cuda:0") is torch.cuda.synchronize
    assert timing.device_sync(torch.device("cuda")) is torch.cuda.synchronize
    assert timing.device_sync("cpu") is not torch.cuda.synchronize
    assert timing.device_sync("cpu")() is None
