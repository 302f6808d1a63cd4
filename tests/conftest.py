"""Suite-wide fixtures: every test starts from the same torch RNG state and must leave the process's
global state (threads, dtype, grad mode, environment, cwd, normlab's backend stack) as it found it.

pytest-randomly shuffles the test order; its seed (printed in the header and at the end of the run)
also seeds torch for each test, as it does ``random`` and numpy: ``pytest --randomly-seed=N`` replays a run.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# set by pytest for each test; set once by torch's inductor on first use (any test may be the first)
_ENV_IGNORED = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}


def _randomly_seed(config: pytest.Config) -> int:
    seed = config.getoption("randomly_seed", default=None)
    return seed if isinstance(seed, int) else 0  # -p no:randomly: a fixed seed


def _global_state() -> dict:
    from normlab import dispatch

    state = {
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch float32 matmul precision": torch.get_float32_matmul_precision(),
        "normlab backend stack": list(dispatch._local.stack),
        "cwd": os.getcwd(),
        "environment": {k: v for k, v in os.environ.items() if k not in _ENV_IGNORED},
    }
    return state


def _describe(before: dict, after: dict) -> list[str]:
    out = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if a == b or key not in before:
            continue
        if key == "environment":
            for name in sorted(a.keys() | b.keys()):
                if a.get(name) != b.get(name):
                    out.append(f"environment variable {name}: {a.get(name)!r} -> {b.get(name)!r}")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _restore(before: dict) -> None:
    from normlab import dispatch

    torch.set_num_threads(before["torch threads"])
    torch.set_default_dtype(before["torch default dtype"])
    torch.set_grad_enabled(before["torch grad mode"])
    torch.use_deterministic_algorithms(before["torch deterministic algorithms"])
    torch.set_float32_matmul_precision(before["torch float32 matmul precision"])
    dispatch._local.stack = list(before["normlab backend stack"])
    os.chdir(before["cwd"])
    os.environ.clear()
    os.environ.update(before["environment"])


@pytest.fixture(autouse=True)
def _isolated(request):
    """Seed torch from the run's seed and the test's id; after the test, fail it if it changed global
    state (restored first, so that one leak does not cascade into other tests)."""
    torch.manual_seed(_randomly_seed(request.config) + zlib.crc32(request.node.nodeid.encode()))
    before = _global_state()
    yield
    after = _global_state()
    leaks = _describe(before, after)
    if leaks:
        _restore(before)
        pytest.fail(f"{request.node.nodeid} leaked global state: " + "; ".join(leaks), pytrace=False)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models: intra-op threads only add contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    seed = config.getoption("randomly_seed", default=None)
    if isinstance(seed, int):  # also under -q, where pytest-randomly's header line is not shown
        terminalreporter.write_line(f"Using --randomly-seed={seed} (pass it to replay this order and these draws)")
