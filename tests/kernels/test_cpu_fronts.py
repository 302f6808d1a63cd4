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


def args_of(op, x, r, w, b, **changes):
    """The front's positional arguments for ``op`` (as the op files pass them), with ``changes`` by name."""
    named = {"input": x, "residual": r, "normalized_shape": (N,), "weight": w, "bias": b, "eps": 1e-5,
             "casting": "llama", "offset": 0.0}
    named.update(changes)
    order = {
        "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
        "add_layer_norm": ("input", "residual", "normalized_shape", "weight", "bias", "eps"),
        "rms_norm": ("input", "normalized_shape", "weight", "eps", "casting", "offset"),
        "add_rms_norm": ("input", "residual", "normalized_shape", "weight", "eps", "casting", "offset"),
    }[op]
    return [named[name] for name in order]


def operator_outputs(op, x, r, w, b, eps=1e-5, casting="llama", offset=0.0):
    """What the front must return: the operator's own outputs (y, or y and the sum for the fused ops)."""
    eps32 = torch.finfo(torch.float32).eps if eps is None else eps
    if op == "layer_norm":
        return OPS.layer_norm(x, w, b, eps)[0]
    if op == "add_layer_norm":
        return OPS.add_layer_norm(x, r, w, b, eps, x.dtype)[:2]
    if op == "rms_norm":
        return OPS.rms_norm(x, w, eps32, casting, float(offset), N)[0]
    return OPS.add_rms_norm(x, r, w, eps32, casting, float(offset), N, x.dtype)[:2]


FRONT_OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]


def tensors(dtype=torch.float32, w_dtype=None, shape=(3, 5, N)):
    x, r = rand(*shape, dtype=dtype, mean=0.3), rand(*shape, dtype=dtype, seed=1)
    w, b = (rand(N, dtype=w_dtype or dtype, seed=s) for s in (2, 3))
    return x, r, w, b


@pytest.mark.parametrize("op", FRONT_OPS)
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_a_plain_call_gives_the_operators_bits(op, dtype, w_dtype):
    front = getattr(K._C, op)
    x, r, w, b = tensors(dtype, w_dtype)
    variants = [{}, {"weight": None, "bias": None}, {"normalized_shape": N}, {"normalized_shape": torch.Size([N])}]
    if op.endswith("rms_norm"):
        variants += [{"eps": None}, {"casting": "gemma", "offset": 1}, {"casting": "none", "offset": 0.5}]
    if op == "layer_norm":
        variants += [{"input": x.transpose(0, 1)}, {"input": x[0, 0]}]  # strided rows, one row of its own
    for changes in variants:
        args = args_of(op, x, r, w, b, **changes)
        got = front(*args)
        options = {k: v for k, v in changes.items() if k in ("eps", "casting", "offset")}
        params = {k: changes.get(k, v) for k, v in (("weight", w), ("bias", b))}
        expected = operator_outputs(op, changes.get("input", x), r, params["weight"], params["bias"], **options)
        for a, e in zip((got,) if op in ("layer_norm", "rms_norm") else got,
                        (expected,) if op in ("layer_norm", "rms_norm") else expected):
            assert a.dtype == e.dtype and torch.equal(a, e), (op, changes)


@pytest.mark.parametrize("op", FRONT_OPS)
def test_a_plain_call_records_the_operators_autograd_node(op):
    x, r, w, b = (t.requires_grad_() for t in tensors())
    outputs = getattr(K._C, op)(*args_of(op, x, r, w, b))
    y = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    expected = {"layer_norm": "LayerNorm", "add_layer_norm": "AddLayerNorm", "rms_norm": "RmsNorm",
                "add_rms_norm": "AddRmsNorm"}[op]
    assert y.grad_fn.name() == f"normlab::{expected}Backward"
    with torch.no_grad():
        assert getattr(K._C, op)(*args_of(op, x, r, w, b)) is not None


class Subclass(torch.Tensor):
    pass


DECLINED = {
    "fp64 input (the reference serves it)": lambda x, r, w, b: {"input": x.double(), "weight": None, "bias": None},
    "int input": lambda x, r, w, b: {"input": x.int(), "weight": None, "bias": None},
    "0-dim input": lambda x, r, w, b: {"input": x[0, 0, 0], "normalized_shape": ()},
    "empty input": lambda x, r, w, b: {"input": x[:0]},
    "not a tensor": lambda x, r, w, b: {"input": x.tolist()},
    "a subclass (its __torch_function__)": lambda x, r, w, b: {"input": x.as_subclass(Subclass)},
    "a sparse input": lambda x, r, w, b: {"input": x[0].to_sparse(), "weight": None, "bias": None},
    "a meta input": lambda x, r, w, b: {"input": x.to("meta"), "weight": None, "bias": None},
    "normalized_shape of another size": lambda x, r, w, b: {"normalized_shape": (N - 1,)},
    "normalized_shape of two dims": lambda x, r, w, b: {"normalized_shape": (5, N)},
    "normalized_shape a list": lambda x, r, w, b: {"normalized_shape": [N]},
    "normalized_shape a bool": lambda x, r, w, b: {"input": x[..., :1], "normalized_shape": True},
    "normalized_shape huge": lambda x, r, w, b: {"normalized_shape": 2**70},
    "weight of another size": lambda x, r, w, b: {"weight": w[:-1]},
    "weight of two dims": lambda x, r, w, b: {"weight": w[None]},
    "weight in fp64": lambda x, r, w, b: {"weight": w.double()},
    "weight in bf16 on fp32 input": lambda x, r, w, b: {"weight": w.bfloat16()},
    "weight on meta": lambda x, r, w, b: {"weight": w.to("meta")},
    "weight a list": lambda x, r, w, b: {"weight": w.tolist()},
    "eps an int": lambda x, r, w, b: {"eps": 1},
    "eps nan": lambda x, r, w, b: {"eps": float("nan")},
    "eps inf": lambda x, r, w, b: {"eps": float("inf")},
    "eps 0": lambda x, r, w, b: {"eps": 0.0},
    "eps negative": lambda x, r, w, b: {"eps": -1e-5},
}
LAYER_NORM_ONLY = {
    "bias of another size": lambda x, r, w, b: {"bias": b[:-1]},
    "bias in fp16 on fp32 input": lambda x, r, w, b: {"bias": b.half()},
    "eps None (LayerNorm has no default rule)": lambda x, r, w, b: {"eps": None},
}
RMS_ONLY = {
    "unknown casting": lambda x, r, w, b: {"casting": "fp8"},
    "casting not a str": lambda x, r, w, b: {"casting": ["llama"]},
    "offset nan": lambda x, r, w, b: {"offset": float("nan")},
    "offset inf": lambda x, r, w, b: {"offset": float("inf")},
    "offset a bool": lambda x, r, w, b: {"offset": True},
    "offset a str": lambda x, r, w, b: {"offset": "1"},
    "offset a huge int": lambda x, r, w, b: {"offset": 10**400},
}
FUSED_ONLY = {
    "residual of another shape": lambda x, r, w, b: {"residual": r[:1]},
    "residual of another dtype": lambda x, r, w, b: {"residual": r.double()},
    "residual a subclass": lambda x, r, w, b: {"residual": r.as_subclass(Subclass)},
    "residual on meta": lambda x, r, w, b: {"residual": r.to("meta")},
}


def declined_cases():
    for op in FRONT_OPS:
        cases = dict(DECLINED)
        cases.update(RMS_ONLY if op.endswith("rms_norm") else LAYER_NORM_ONLY)
        if op.startswith("add_"):
            cases.update(FUSED_ONLY)
        for name, changes in cases.items():
            yield pytest.param(op, changes, id=f"{op}-{name}")


@pytest.mark.parametrize("op,changes", list(declined_cases()))
def test_a_call_not_plainly_served_is_declined(op, changes):
    x, r, w, b = tensors()
    assert getattr(K._C, op)(*args_of(op, x, r, w, b, **changes(x, r, w, b))) is None


@pytest.mark.parametrize("op", FRONT_OPS)
def test_declined_under_a_torch_function_mode_and_a_torch_func_transform(op):
    x, r, w, b = tensors()
    front = getattr(K._C, op)
    with TorchFunctionMode():
        assert front(*args_of(op, x, r, w, b)) is None
    declined = []
    torch.func.vmap(lambda t: declined.append(front(*args_of(op, t, r[0], w, b))) or t)(x)
    assert declined == [None]


@pytest.mark.parametrize("op", FRONT_OPS)
def test_a_wrong_argument_count_raises(op):
    x, r, w, b = tensors()
    with pytest.raises(TypeError, match=f"{op} takes {len(args_of(op, x, r, w, b))} positional arguments, got 2"):
        getattr(K._C, op)(x, N)


def test_the_ops_reach_their_modes_and_subclasses_as_before():
    """A call the front declines still reaches the operator through torch.ops, where a mode or a subclass's
    ``__torch_function__`` sees it."""
    seen = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, _, w, b = tensors()
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
    assert dispatch.front("dyt") is None  # no front: the op file's own common call
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
    inputs = [tensors(shape=(64, N)) for _ in range(4)]
    expected = [normlab.layer_norm(x, N, w, b) for x, _, w, b in inputs]
    failures = []

    def work(i):
        x, _, w, b = inputs[i]
        for _ in range(200):
            if not torch.equal(K._C.layer_norm(x, (N,), w, b, 1e-5), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
