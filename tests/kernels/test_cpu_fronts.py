"""The cpu backend's fronts (``csrc/front.cpp``): a plainly valid call computes the operator's very output, autograd
included; every other call is declined (None), so that the op front's Python checks take it and raise their errors."""

from __future__ import annotations

import threading
from typing import ClassVar

import pytest
import torch
from torch.overrides import TorchFunctionMode

import normlab
from normlab import dispatch
from normlab.kernels import cpu as K
from tests.helpers import rand

N = 24
OPS = torch.ops.normlab
FRONT_OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "dyt"]
ORDER = {  # each front's positional arguments, as the op files pass them
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "add_layer_norm": ("input", "residual", "normalized_shape", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps", "casting", "offset", "bias"),
    "add_rms_norm": ("input", "residual", "normalized_shape", "weight", "eps", "casting", "offset"),
    "dyt": ("input", "alpha", "weight", "bias"),
}


def call(dtype=torch.float32, w_dtype=None, shape=(3, 5, N), **changes):
    """A plain call's arguments by name, with ``changes``."""
    named = {
        "input": rand(*shape, dtype=dtype, mean=0.3), "residual": rand(*shape, dtype=dtype, seed=1),
        "normalized_shape": (N,), "weight": rand(N, dtype=w_dtype or dtype, seed=2),
        "bias": rand(N, dtype=w_dtype or dtype, seed=3), "alpha": torch.tensor([0.7], dtype=w_dtype or dtype),
        "eps": 1e-5, "casting": "llama", "offset": 0.0,
    }
    named.update(changes)
    return named


def front(op, named):
    return getattr(K._C, op)(*(named[name] for name in ORDER[op]))


def operator_outputs(op, t):
    """What the front must return: the operator's own outputs (y, or y and the sum for the fused ops)."""
    x, r, w, b = t["input"], t["residual"], t["weight"], t["bias"]
    eps = torch.finfo(torch.float32).eps if t["eps"] is None else t["eps"]
    if op == "layer_norm":
        return (OPS.layer_norm(x, w, b, eps)[0],)
    if op == "add_layer_norm":
        return OPS.add_layer_norm(x, r, w, b, eps, x.dtype)[:2]
    if op == "rms_norm":
        return (OPS.rms_norm(x, w, eps, t["casting"], float(t["offset"]), N, b)[0],)
    if op == "add_rms_norm":
        return OPS.add_rms_norm(x, r, w, eps, t["casting"], float(t["offset"]), N, x.dtype)[:2]
    return (OPS.dyt(x, t["alpha"], w, b),)


@pytest.mark.parametrize("op", FRONT_OPS)
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_a_plain_call_gives_the_operators_bits(op, dtype, w_dtype):
    t = call(dtype, w_dtype)
    x, r = t["input"], t["residual"]
    variants = [{}, {"bias": None}, {"normalized_shape": N}, {"normalized_shape": torch.Size([N])},
                {"input": x.transpose(0, 1), "residual": r.transpose(0, 1)}, {"input": x[0, 0], "residual": r[0, 0]}]
    if op != "dyt":
        variants.append({"weight": None, "bias": None})
    if op.endswith("rms_norm"):
        variants += [{"eps": None}, {"casting": "gemma", "offset": 1}, {"casting": "none", "offset": 0.5}]
    for changes in variants:
        named = {**t, **changes}
        got = front(op, named)
        got = (got,) if isinstance(got, torch.Tensor) else got
        expected = operator_outputs(op, named)
        assert len(got) == len(expected), (op, changes)
        for a, e in zip(got, expected):
            assert a.dtype == e.dtype and torch.equal(a, e), (op, changes)


@pytest.mark.parametrize("op", FRONT_OPS)
def test_a_plain_call_records_the_operators_autograd_node(op):
    t = call()
    for name in ("input", "residual", "weight", "bias", "alpha"):
        t[name].requires_grad_()
    outputs = front(op, t)
    y = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    expected = {"layer_norm": "LayerNorm", "add_layer_norm": "AddLayerNorm", "rms_norm": "RmsNorm",
                "add_rms_norm": "AddRmsNorm", "dyt": "Dyt"}[op]
    assert y.grad_fn.name() == f"normlab::{expected}Backward"
    with torch.no_grad():
        outputs = front(op, t)
    assert all(o.grad_fn is None for o in ((outputs,) if isinstance(outputs, torch.Tensor) else outputs))


class Subclass(torch.Tensor):
    pass


DECLINED = {
    "fp64 input (the reference serves it)": lambda t: {
        name: t[name].double() for name in ("input", "residual", "weight", "bias", "alpha")},
    "int input": lambda t: {"input": t["input"].int()},
    "0-dim input": lambda t: {"input": t["input"][0, 0, 0], "normalized_shape": ()},
    "empty input": lambda t: {"input": t["input"][:0], "residual": t["residual"][:0]},
    "input not a tensor": lambda t: {"input": t["input"].tolist()},
    "input a subclass (its __torch_function__)": lambda t: {"input": t["input"].as_subclass(Subclass)},
    "input sparse": lambda t: {"input": t["input"][0].to_sparse(), "residual": t["residual"][0]},
    "input on meta": lambda t: {
        name: t[name].to("meta") for name in ("input", "residual", "weight", "bias", "alpha")},
    "weight of another size": lambda t: {"weight": t["weight"][:-1]},
    "weight of two dims": lambda t: {"weight": t["weight"][None]},
    "weight in fp64": lambda t: {"weight": t["weight"].double()},
    "weight in bf16 on fp32 input": lambda t: {"weight": t["weight"].bfloat16()},
    "weight on meta": lambda t: {"weight": t["weight"].to("meta")},
    "weight a list": lambda t: {"weight": t["weight"].tolist()},
    "bias of another size": lambda t: {"bias": t["bias"][:-1]},
    "bias in fp16 on fp32 input": lambda t: {"bias": t["bias"].half()},
}
NORMS_ONLY = {
    "normalized_shape of another size": lambda t: {"normalized_shape": (N - 1,)},
    "normalized_shape of two dims": lambda t: {"normalized_shape": (5, N)},
    "normalized_shape a list": lambda t: {"normalized_shape": [N]},
    "normalized_shape a bool": lambda t: {"input": t["input"][..., :1], "normalized_shape": True},
    "normalized_shape huge": lambda t: {"normalized_shape": 2**70},
    "eps an int": lambda t: {"eps": 1},
    "eps nan": lambda t: {"eps": float("nan")},
    "eps inf": lambda t: {"eps": float("inf")},
    "eps 0": lambda t: {"eps": 0.0},
    "eps negative": lambda t: {"eps": -1e-5},
}
LAYER_NORM_ONLY = {"eps None (LayerNorm has no default rule)": lambda t: {"eps": None}}
RMS_ONLY = {
    "unknown casting": lambda t: {"casting": "fp8"},
    "casting not a str": lambda t: {"casting": ["llama"]},
    "offset nan": lambda t: {"offset": float("nan")},
    "offset inf": lambda t: {"offset": float("inf")},
    "offset a bool": lambda t: {"offset": True},
    "offset a str": lambda t: {"offset": "1"},
    "offset a huge int": lambda t: {"offset": 10**400},
}
FUSED_ONLY = {
    "residual of another shape": lambda t: {"residual": t["residual"][:1]},
    "residual of another dtype": lambda t: {"residual": t["residual"].double()},
    "residual a subclass": lambda t: {"residual": t["residual"].as_subclass(Subclass)},
    "residual on meta": lambda t: {"residual": t["residual"].to("meta")},
}
DYT_ONLY = {
    "alpha of two elements": lambda t: {"alpha": torch.tensor([0.5, 0.5])},
    "alpha a float": lambda t: {"alpha": 0.5},
    "alpha in fp64": lambda t: {"alpha": t["alpha"].double()},
    "alpha in bf16 on fp32 input": lambda t: {"alpha": t["alpha"].bfloat16()},
    "alpha on meta": lambda t: {"alpha": t["alpha"].to("meta")},
    "alpha a subclass": lambda t: {"alpha": t["alpha"].as_subclass(Subclass)},
    "no weight (the op file's rows come from it)": lambda t: {"weight": None},
}


def declined_cases():
    for op in FRONT_OPS:
        cases = dict(DECLINED)
        cases.update(DYT_ONLY if op == "dyt" else NORMS_ONLY)
        if op != "dyt":
            cases.update(RMS_ONLY if op.endswith("rms_norm") else LAYER_NORM_ONLY)
        if op.startswith("add_"):
            cases.update(FUSED_ONLY)
        if op == "add_rms_norm":  # the fused RMSNorm has no bias
            cases = {name: case for name, case in cases.items() if not name.startswith("bias")}
        for name, changes in cases.items():
            yield pytest.param(op, changes, id=f"{op}-{name}")


@pytest.mark.parametrize("op,changes", list(declined_cases()))
def test_a_call_not_plainly_served_is_declined(op, changes):
    t = call()
    assert front(op, {**t, **changes(t)}) is None


@pytest.mark.parametrize("op", FRONT_OPS)
def test_declined_under_a_torch_function_mode_and_a_torch_func_transform(op):
    t = call()
    with TorchFunctionMode():
        assert front(op, t) is None
    declined = []
    torch.func.vmap(lambda x: declined.append(front(op, {**t, "input": x, "residual": t["residual"][0]})) or x)(
        t["input"]
    )
    assert declined == [None]


@pytest.mark.parametrize("op", FRONT_OPS)
def test_a_wrong_argument_count_raises(op):
    t = call()
    with pytest.raises(TypeError, match=f"{op} takes {len(ORDER[op])} positional arguments, got 2"):
        getattr(K._C, op)(t["input"], N)


def test_the_ops_reach_their_modes_and_subclasses_as_before():
    """A call the front declines still reaches the operator through torch.ops, where a mode or a subclass's
    ``__torch_function__`` sees it."""
    seen = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b = (call()[name] for name in ("input", "weight", "bias"))
    with Recorder():
        y = normlab.layer_norm(x, N, w, b)
    assert "normlab.layer_norm.default" in seen
    assert torch.equal(y, normlab.layer_norm(x, N, w, b))

    class Logged(torch.Tensor):
        calls: ClassVar[list] = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    y = normlab.rms_norm(x.as_subclass(Logged), N, w)
    assert "normlab.rms_norm.default" in Logged.calls and type(y) is Logged


def test_requests_choose_whose_front_serves(monkeypatch):
    """No request and a request for cpu: cpu's fronts; the reference and unknown names: none (the op files then
    choose, and raise for unknown names)."""
    assert dispatch.front("layer_norm") is K._C.layer_norm
    assert dispatch.front("layer_norm", "cpu") is K._C.layer_norm
    assert dispatch.front("dyt") is K._C.dyt
    assert dispatch.front("group_norm") is None  # no front: the op file's own path
    for requested in ("reference", "triton", "bogus"):
        assert dispatch.front("layer_norm", requested) is None
    with normlab.backend("reference"):
        assert dispatch.front("rms_norm") is None
        assert dispatch.front("rms_norm", "cpu") is K._C.rms_norm
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    assert dispatch.front("add_rms_norm") is None
    monkeypatch.setenv("NORMLAB_BACKEND", "cpu")
    assert dispatch.front("add_rms_norm") is K._C.add_rms_norm


def test_concurrent_calls_from_threads_give_each_its_own_result():
    """The fronts run the operator without the GIL: calls from several Python threads at once stay correct."""
    inputs = [[call(shape=(64, N), input=rand(64, N, seed=10 + i))[name] for name in ("input", "weight", "bias")]
              for i in range(4)]
    expected = [normlab.layer_norm(x, N, w, b) for x, w, b in inputs]
    failures = []

    def work(i):
        x, w, b = inputs[i]
        for _ in range(200):
            if not torch.equal(K._C.layer_norm(x, (N,), w, b, 1e-5), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
