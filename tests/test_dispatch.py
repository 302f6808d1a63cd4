"""The dispatch point (docs/architecture.md §3): choice order, fallback to reference, what ``supports`` is asked."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import dispatch
from normlab.ops.rms_norm import rms_norm_bwd_ref, rms_norm_fwd_ref
from tests.helpers import rand


@pytest.fixture
def stand_in(monkeypatch):
    """A "cpu" backend built from the reference that serves fp32 only and records what it is asked."""
    log = {"supports": [], "calls": []}

    def supports(op, x, **options):
        log["supports"].append((op, tuple(x.shape), sorted(options)))
        return x.dtype == torch.float32

    def fwd(x, weight, eps, casting, offset, k, out=None):
        log["calls"].append("fwd")
        y, rstd = rms_norm_fwd_ref(x, weight, eps, casting, offset, k)
        return (y if out is None else out.copy_(y)), rstd

    def bwd(dy, x, weight, rstd, offset, k, dsum=None):
        log["calls"].append("bwd")
        return rms_norm_bwd_ref(dy, x, weight, rstd, offset, k, 1.0, dsum)

    backend = dispatch._Backend("cpu", {"rms_norm_fwd": fwd, "rms_norm_bwd": bwd}, supports)
    monkeypatch.setitem(dispatch._registry, "cpu", backend)
    monkeypatch.setattr(dispatch, "_decisions", {})  # decisions cached for the real backend
    monkeypatch.delenv("NORMLAB_BACKEND", raising=False)
    return log


def test_default_is_the_registered_backend_that_supports_the_input(stand_in):
    x, w = rand(3, 5, 16).requires_grad_(), rand(16, seed=1)
    normlab.rms_norm(x, 16, w, partial=0.5).sum().backward()
    assert stand_in["calls"] == ["fwd", "bwd"]
    # asked about the (rows, n) view with the documented options
    assert stand_in["supports"][-1] == ("rms_norm", (15, 16), ["casting", "k", "offset", "weight"])
    assert dispatch.select("rms_norm", x.reshape(-1, 16).detach()) == "cpu"


def test_unsupported_input_falls_back_to_reference(stand_in):
    x = rand(4, 16, dtype=torch.float64)
    y = normlab.rms_norm(x, 16, backend="cpu")  # asked for, but it declines fp64
    assert stand_in["calls"] == [] and torch.equal(y, normlab.rms_norm(x, 16, backend="reference"))
    assert dispatch.select("rms_norm", x) == "reference"
    # an op the backend registers no kernel for is served by reference without asking it
    normlab.layer_norm(rand(4, 16), 16, backend="cpu")
    assert stand_in["calls"] == [] and all(op == "rms_norm" for op, _, _ in stand_in["supports"])


def test_choice_order_call_then_block_then_environment(stand_in, monkeypatch):
    x = rand(4, 16)
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    assert dispatch.select("rms_norm", x) == "reference"
    with normlab.backend("cpu"):
        assert dispatch.select("rms_norm", x) == "cpu"  # the block beats the environment
        with normlab.backend("reference"):
            assert dispatch.select("rms_norm", x) == "reference"  # the innermost block wins
        assert dispatch.select("rms_norm", x, "reference") == "reference"  # the call beats the block
    assert dispatch.select("rms_norm", x, "cpu") == "cpu"  # the call beats the environment
    normlab.rms_norm(x, 16)
    assert stand_in["calls"] == []
    monkeypatch.setenv("NORMLAB_BACKEND", "CPU")
    with pytest.raises(ValueError, match="unknown backend 'CPU' in the environment variable NORMLAB_BACKEND"):
        normlab.rms_norm(x, 16)


def test_unknown_names_raise_and_every_backend_is_reported():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; expected one of \['cpu', 'reference', 'triton'\]"):
        dispatch.register("gpu", "rms_norm_fwd", lambda *a: None)
    status = dispatch.available()
    assert set(status) == {"triton", "cpu", "reference"} and status["reference"] == "ok"


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_get_a_clear_error_and_the_references_work(transform):
    """normlab's ops are custom autograd functions, which torch.func cannot transform: a clear error
    pointing to the plain-PyTorch references, which can (checked against torch's own op)."""
    import torch.nn.functional as F

    from normlab.ops.rms_norm import rms_norm_reference

    x, w = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    apply = (lambda f: torch.func.grad(lambda t: f(t).sum())) if transform == "grad" else torch.func.vmap
    for op in (lambda t: normlab.rms_norm(t, 16, w), lambda t: normlab.layer_norm(t, 16, w),
               lambda t: normlab.group_norm(t, 1), lambda t: normlab.batch_norm(t, None, None, training=True)):
        with pytest.raises(RuntimeError, match="do not support torch.func transforms.*rms_norm_reference"):
            apply(op)(x)
    ours = apply(lambda t: rms_norm_reference(t, 16, w, casting="gemma"))(x)
    torch.testing.assert_close(ours, apply(lambda t: F.rms_norm(t, (16,), w))(x))
