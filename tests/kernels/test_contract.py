"""Every registered kernel backend against the kernel contract (``normlab/kernels/contract.py``): each entry point
it registers exists with exactly the stub's signature (native operators: the stub's schema), a backend serves
whole families, and a small run returns the outputs the stub returns (shapes, dtypes, the given buffers).
The triton backend runs under Triton's interpreter here (``tests/kernels/_triton.py``); a backend that breaks
the contract in each way the checker knows is rejected."""

from __future__ import annotations

import inspect

import pytest
import torch

from normlab import dispatch
from normlab.kernels import contract
from normlab.ops.layer_norm import layer_norm_fwd_ref
from normlab.ops.rms_norm import rms_norm_bwd_ref
from tests import helpers
from tests.kernels._triton import DEVICE, backend_module  # first: sets TRITON_INTERPRET before triton loads

ROWS, N = 3, 8
GROUP = 4  # gated_rms_norm's group size: two groups per row


def _load(backend: str) -> dispatch._Backend:
    if backend == "triton":
        backend_module()  # the kernels defined for the interpreter (or the GPU under NORMLAB_TEST_DEVICE=cuda)
    else:
        import normlab.kernels.cpu  # noqa: F401
    return dispatch._registry[backend]


#: What each backend serves: the cpu backend every entry point, the triton one the kernels of two families.
EXPECTED = {
    "cpu": (*contract.kernels(), *contract.native_ops()),
    "triton": contract.kernels("rms_norm", "layer_norm", "gated_rms_norm"),
}
DEVICES = {"cpu": "cpu", "triton": DEVICE}


# ---- the checker ------------------------------------------------------------------------------------------
def _parameters(fn) -> list[tuple]:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _schema(schema: torch.FunctionSchema) -> tuple[list, list]:
    args = [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    return args, [str(r.type) for r in schema.returns]


def _stub_schema(name: str) -> tuple[list, list]:
    entry = contract.ENTRY_POINTS[name]
    inferred = torch.library.infer_schema(entry.stub, mutates_args=entry.writes)
    return _schema(torch._C.parse_schema(f"contract::{name}{inferred}"))


def _samples(dtype: torch.dtype, device: str, optional: bool) -> dict:
    """A value for every argument name of the contract: ``(rows, n)`` rows of ``dtype``, fp32 statistics,
    the optional tensors given (``optional``) or None."""
    def r(*shape, seed, dt=dtype, mean=0.0):
        return helpers.rand(*shape, dtype=dt, seed=seed, mean=mean).to(device)

    x, dy, dsum = r(ROWS, N, seed=0), r(ROWS, N, seed=1), r(ROWS, N, seed=2)
    rstd, mean = r(ROWS, seed=3, dt=torch.float32).abs() + 0.5, r(ROWS, seed=7, dt=torch.float32)
    given = {"weight": r(N, seed=4, mean=1.0), "bias": r(N, seed=5), "dsum": dsum, "grad_sum": dsum}
    return {
        "x": x, "input": x, "dy": dy, "grad": dy, "residual": r(ROWS, N, seed=6), "eps": 1e-5, "casting": "llama",
        "offset": 0.5, "k": N - 2, "residual_dtype": torch.float32, "rstd": rstd, "mean": mean,
        "alpha": torch.tensor([0.7], device=device), "weight_grad": optional, "bias_grad": optional,
        "group_size": GROUP, "norm_before_gate": optional, "gate": r(ROWS, N, seed=8) if optional else None,
        "out": torch.empty_like(x), "residual_out": torch.empty_like(x, dtype=torch.float32),
        "tanh": torch.tanh(0.7 * x.float()) if optional else None,
        **{name: t if optional else None for name, t in given.items()},
    }


def _outputs_problem(name: str, got, want, args: list) -> str | None:
    """How ``got`` differs from the stub's ``want`` (None where it does not)."""
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    if not isinstance(got, tuple) or len(got) != len(want):
        return f"{name} returns {got!r:.80}, expected {len(want)} outputs"

    def describe(t):
        return f"{list(t.shape)}, {t.dtype}, {t.device}" if isinstance(t, torch.Tensor) else repr(t)

    for i, (g, w) in enumerate(zip(got, want)):
        if describe(g) != describe(w):
            return f"{name} output {i} is {describe(g)}: expected {describe(w)}"
        if w is not None and any(w is a for a in args) and g is not w:
            return f"{name} output {i} must be the buffer it was given"
    return None


def _run_problem(name: str, fn, device: str) -> str | None:
    """Run ``fn`` and the stub on the same small inputs (fp32 and bf16, optional tensors given and not)."""
    entry = contract.ENTRY_POINTS[name]
    params = inspect.signature(entry.stub).parameters.values()
    for dtype in (torch.float32, torch.bfloat16):
        for optional in (True, False):
            values = _samples(dtype, device, optional)
            if entry.family == "gated_rms_norm":  # statistics per row and group
                values["rstd"] = values["rstd"][:, None].repeat(1, N // GROUP)
            args = [values[p.name] for p in params if p.default is inspect.Parameter.empty]
            kwargs = {p.name: values[p.name] for p in params if p.default is not inspect.Parameter.empty and optional}
            got, want = fn(*args, **kwargs), entry.stub(*args, **kwargs)
            problem = _outputs_problem(name, got, want, [*args, *kwargs.values()])
            if problem:
                return f"{problem} ({dtype}, {'with' if optional else 'without'} the optional arguments)"
    return None


def contract_problems(entries: dict, supports, device: str = "cpu") -> set[tuple[str, str]]:
    """Every way the backend with the registered ``entries`` (name → function or native operator) and
    ``supports`` breaks the contract, as ``(name, what)``; each message is printed."""
    problems: dict[tuple[str, str], str] = {}
    if _parameters(supports) != _parameters(contract.supports):
        expected = inspect.signature(contract.supports)
        problems["supports", "signature"] = f"supports{inspect.signature(supports)}, expected {expected}"
    for name in set(entries) - set(contract.ENTRY_POINTS):
        problems[name, "unknown"] = f"{name} is no entry point of the contract"
    served = {(e.kind, e.family) for name, e in contract.ENTRY_POINTS.items() if name in entries}
    for name, e in contract.ENTRY_POINTS.items():
        if (e.kind, e.family) in served and name not in entries:
            problems[name, "missing"] = f"{name} missing: a backend has every {e.kind} of the {e.family} family or none"
    for name, fn in entries.items():
        entry = contract.ENTRY_POINTS.get(name)
        if entry is None:
            continue
        if entry.kind == contract.NATIVE:
            got, want = _schema(fn.default._schema), _stub_schema(name)
            if got != want:
                problems[name, "schema"] = f"{name} schema {got}, expected {want}"
                continue
        elif _parameters(fn) != _parameters(entry.stub):
            expected = inspect.signature(entry.stub)
            problems[name, "signature"] = f"{name}{inspect.signature(fn)}, expected {name}{expected}"
            continue
        message = _run_problem(name, fn, device)
        if message:
            problems[name, "outputs"] = message
    for message in problems.values():
        print(message)
    return set(problems)


# ---- the backends -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_backend_follows_the_contract(backend):
    entry = _load(backend)
    assert set(entry.kernels) == set(EXPECTED[backend])
    assert contract_problems(entry.kernels, entry.supports, DEVICES[backend]) == set()


def test_the_contract_lists():
    """The lists the backends register from: every entry point once, by family."""
    assert contract.kernels("rms_norm") == ("rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_fwd")
    assert contract.native_ops("dyt") == ("dyt", "dyt_forward", "dyt_backward")
    assert contract.kernels("gated_rms_norm") == ("gated_rms_norm_fwd", "gated_rms_norm_bwd")
    assert contract.native_ops("gated_rms_norm") == ("gated_rms_norm", "gated_rms_norm_backward")
    assert set(contract.kernels()) | set(contract.native_ops()) == set(contract.ENTRY_POINTS)
    with pytest.raises(ValueError, match=r"no kernel entry points for the families \['batch_norm'\]"):
        contract.kernels("batch_norm")


# ---- the checker can fail ---------------------------------------------------------------------------------
def test_the_checker_rejects_a_backend_that_breaks_the_contract():
    def rms_norm_fwd(x, weight, eps, casting, offset, k):  # no out=
        return contract.rms_norm_fwd(x, weight, eps, casting, offset, k)

    def rms_norm_bwd(dy, x, weight, rstd, offset, k, dsum=None):  # as the contract says
        return rms_norm_bwd_ref(dy, x, weight, rstd, offset, k, 1e-5, dsum)

    def add_rms_norm_fwd(x, residual, weight, eps, casting, offset, k, residual_dtype, out=None, residual_out=None):
        y, s, rstd = contract.add_rms_norm_fwd(
            x, residual, weight, eps, casting, offset, k, residual_dtype, out, residual_out
        )
        return y, s, rstd[:, None]  # statistics of shape (rows, 1)

    def layer_norm_bwd(dy, x, weight, bias, mean, rstd, dsum=None, block=64):  # a keyword of its own
        return contract.layer_norm_bwd(dy, x, weight, bias, mean, rstd, dsum)

    def add_layer_norm_fwd(x, residual, weight, bias, eps, residual_dtype, out=None, residual_out=None):
        y, s, mean, rstd = contract.add_layer_norm_fwd(x, residual, weight, bias, eps, residual_dtype)
        y.copy_(layer_norm_fwd_ref(s, weight, bias, eps)[0])
        return y, s, mean, rstd  # fresh outputs even when given buffers

    def supports(op, x, *, weight=None):  # not the one signature
        return True

    lib = torch.library.Library("normlab_contract_test", "DEF")
    lib.define("dyt(Tensor x, Tensor alpha, Tensor? weight, Tensor? bias) -> Tensor")  # input named x
    lib.impl("dyt", lambda x, alpha, weight, bias: x.clone(), "CPU")
    entries = {
        "rms_norm_fwd": rms_norm_fwd, "rms_norm_bwd": rms_norm_bwd, "add_rms_norm_fwd": add_rms_norm_fwd,
        "layer_norm_bwd": layer_norm_bwd, "add_layer_norm_fwd": add_layer_norm_fwd,  # no layer_norm_fwd
        "rms_norm_fast_fwd": rms_norm_fwd, "dyt": torch.ops.normlab_contract_test.dyt,  # no dyt_forward, dyt_backward
    }
    assert contract_problems(entries, supports) == {
        ("rms_norm_fwd", "signature"), ("add_rms_norm_fwd", "outputs"), ("layer_norm_fwd", "missing"),
        ("layer_norm_bwd", "signature"), ("add_layer_norm_fwd", "outputs"), ("rms_norm_fast_fwd", "unknown"),
        ("dyt", "schema"), ("dyt_forward", "missing"), ("dyt_backward", "missing"), ("supports", "signature"),
    }
    # the same entry points as the contract states them pass
    right = {name: contract.stub(name) for name in contract.kernels("rms_norm", "layer_norm")}
    assert contract_problems(right, contract.supports) == set()
