"""The ops' common call (``plain_rows`` and one cached look-up, no other check) against their full path: the same
bits, values and gradients; every call that is not plainly valid still gets the full checks' error; the cached
choice follows ``backend=``, ``with normlab.backend()`` and ``NORMLAB_BACKEND``."""

from __future__ import annotations

import importlib

import pytest
import torch

import normlab
from tests.helpers import rand

# the op files (normlab.ops re-exports functions of the same names)
layer_norm_module, rms_norm_module, dyt_module = (
    importlib.import_module(f"normlab.ops.{name}") for name in ("layer_norm", "rms_norm", "dyt")
)

N = 33

# name → (op file, f(x, r, w, b, alpha, **options) → outputs, the op file's custom op of the Python backends)
FRONTS = {
    "layer_norm": (layer_norm_module, lambda x, r, w, b, a, **o: (normlab.layer_norm(x, N, w, b, **o),),
                   "_layer_norm_op"),
    "rms_norm": (rms_norm_module, lambda x, r, w, b, a, **o: (normlab.rms_norm(x, (N,), w, **o),), "_rms_norm_op"),
    "add_layer_norm": (layer_norm_module, lambda x, r, w, b, a, **o: normlab.add_layer_norm(x, r, N, w, b, **o),
                       "_add_layer_norm_op"),
    "add_rms_norm": (rms_norm_module, lambda x, r, w, b, a, **o: normlab.add_rms_norm(x, r, N, w, **o),
                     "_add_rms_norm_op"),
    "dyt": (dyt_module, lambda x, r, w, b, a, **o: (normlab.dyt(x, a, w, b, **o),), "_dyt_op"),
}


def inputs(dtype, shape, seed=0):
    x = rand(*shape, dtype=dtype, seed=seed, mean=0.5)
    if shape[0] == 5:  # a strided input: the common call passes it to the operator as it is
        x = rand(shape[1], shape[0], shape[2], dtype=dtype, seed=seed, mean=0.5).transpose(0, 1)
    r = rand(*shape, dtype=dtype, seed=seed + 1)
    w, b = rand(N, dtype=dtype, seed=seed + 2), rand(N, dtype=dtype, seed=seed + 3)
    return [t.requires_grad_() for t in (x, r, w, b, torch.tensor([0.7], dtype=dtype))]


def run(f, tensors, **options):
    outputs = f(*tensors, **options)
    grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(outputs)), tensors,
                                allow_unused=True)
    return [o.detach() for o in outputs], grads


def full_path_only(monkeypatch, module):
    """The op file's common call turned off, the backend's front and the op file's own: every call takes the full
    checks."""
    monkeypatch.setattr(module.dispatch, "front", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "plain_rows", lambda *args, **kwargs: None)


def count_full_checks(monkeypatch, module):
    calls = []
    check = module._check
    monkeypatch.setattr(module, "_check", lambda *args: calls.append(1) or check(*args))
    return calls


@pytest.mark.parametrize("front", list(FRONTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, N), (5, 3, N)])
def test_common_call_takes_no_full_check_and_gives_the_full_paths_bits(front, dtype, shape, monkeypatch):
    module, f, _ = FRONTS[front]
    tensors = inputs(dtype, shape)
    checks = count_full_checks(monkeypatch, module)
    fast_out, fast_grads = run(f, tensors)
    assert checks == [], f"{front}: the common call ran the full checks"
    full_path_only(monkeypatch, module)
    full_out, full_grads = run(f, tensors)
    assert len(checks) == 1
    for a, e in zip(fast_out, full_out):
        assert a.shape == e.shape == tensors[0].shape and a.dtype == e.dtype
        assert torch.equal(a, e), f"{front}: the common call's output differs from the full path's"
    for a, e in zip(fast_grads, full_grads):
        assert (a is None) == (e is None) and (a is None or torch.equal(a, e)), f"{front}: gradients differ"


@pytest.mark.parametrize("front", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_residual_not_like_the_input_gets_the_full_checks(front):
    _, f, _ = FRONTS[front]
    x, r, w, b, a = (t.detach() for t in inputs(torch.float32, (2, N)))
    f(x, r, w, b, a)  # the common call's choice is cached now; none of the calls below may use it
    with pytest.raises(ValueError, match=rf"expected residual of shape \[2, {N}\]"):
        f(x, r[:1], w, b, a)
    with pytest.raises(ValueError, match=rf"expected residual of shape \[2, {N}\]"):
        f(x, r.reshape(1, 2, N), w, b, a)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        f(x, r.tolist(), w, b, a)
    with pytest.raises(TypeError, match="residual must have a floating dtype"):
        f(x, r.int(), w, b, a)
    with pytest.raises(ValueError, match="expected residual on cpu"):
        f(x, r.to("meta"), w, b, a)
    with pytest.raises(TypeError, match="residual_dtype must be a floating dtype"):
        f(x, r, w, b, a, residual_dtype=torch.int32)
    # a residual of another floating dtype is valid, but not the common call: the full path serves it
    reference = {"add_layer_norm": normlab.add_layer_norm_reference, "add_rms_norm": normlab.add_rms_norm_reference}
    y, s = f(x, r.double(), w, b, a)
    params = (w, b) if front == "add_layer_norm" else (w,)
    y_ref, s_ref = reference[front](x, r.double(), N, *params)
    assert s.dtype == torch.float32 and torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref)


def test_options_outside_the_common_call_get_the_full_checks():
    x, r, w, b, a = (t.detach() for t in inputs(torch.float32, (2, N)))
    for fn in (normlab.rms_norm, lambda *args, **o: normlab.add_rms_norm(x, r, *args[1:], **o)):
        fn(x, N, w, casting="gemma", offset=1.0)  # cached for this key; an invalid one is never cached
        with pytest.raises(ValueError, match="unknown casting mode 'fp8'"):
            fn(x, N, w, casting="fp8")
        with pytest.raises(ValueError, match=r"unknown casting mode \['llama'\]"):
            fn(x, N, w, casting=["llama"])
        for offset in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="offset must be a finite number"):
                fn(x, N, w, casting="gemma", offset=offset)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            fn(x, N, w, eps=float("nan"))
    normlab.dyt(x, a, w, b)
    with pytest.raises(TypeError, match="expected alpha of dtype torch.float32"):
        normlab.dyt(x, a.double(), w, b)
    with pytest.raises(ValueError, match="expected alpha on cpu"):
        normlab.dyt(x, a.to("meta"), w, b)
    normlab.layer_norm(x, N, w, b)
    with pytest.raises(TypeError, match="expected weight of dtype torch.float32"):
        normlab.layer_norm(x, N, w.double(), b)
    with pytest.raises(ValueError, match="expected bias on cpu"):
        normlab.layer_norm(x, N, w, b.to("meta"))


@pytest.mark.parametrize("front", list(FRONTS))
def test_cached_choice_follows_the_requested_backend(front, monkeypatch):
    module, f, python_op = FRONTS[front]
    tensors = [t.detach() for t in inputs(torch.float32, (2, N))]
    served = []
    op = getattr(module, python_op)
    monkeypatch.setattr(module, python_op, lambda *args: served.append(args) or op(*args))
    f(*tensors)  # the default choice (cpu's native operator where it loads) is cached for this key now
    default = len(served)
    f(*tensors, backend="reference")
    with normlab.backend("reference"):
        f(*tensors)
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    f(*tensors)
    assert len(served) == default + 3, f"{front}: a request for the reference took the cached choice"
    monkeypatch.setenv("NORMLAB_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        f(*tensors)
    monkeypatch.delenv("NORMLAB_BACKEND")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        f(*tensors, backend="gpu")
