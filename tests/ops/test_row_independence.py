"""Every row-wise op: a row's result is a function of that row alone (docs/architecture.md §4) — bitwise the same
alone, inside 2-, 255- and 300-row batches, and with 1 or 2 threads — and a NaN/inf row leaves every
other row's output and the parameter gradients of a loss over other rows exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab
from tests.helpers import assert_tolerance_rule, rand, threads

N = 24
W, B = rand(N, seed=1), rand(N, seed=2)


def wb(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rand(n, seed=1), rand(n, seed=2)


ALPHA = torch.tensor([0.7])

# name → f(x, r) on (rows, …) inputs; rows are dim 0 (samples for group_norm and batch_norm in eval)
ROW_OPS = {
    "layer_norm": lambda x, r: normlab.layer_norm(x, x.shape[-1], *wb(x.shape[-1])),
    "rms_norm": lambda x, r: normlab.rms_norm(x, x.shape[-1], wb(x.shape[-1])[0]),
    "rms_norm_partial_gemma": lambda x, r: normlab.rms_norm(x, x.shape[-1], None, 1e-6, casting="gemma", offset=1.0,
                                                            partial=0.3),
    "add_layer_norm": lambda x, r: torch.cat(normlab.add_layer_norm(x, r, x.shape[-1]), dim=-1),
    "add_rms_norm": lambda x, r: torch.cat(normlab.add_rms_norm(x, r, x.shape[-1], residual_dtype=torch.float64),
                                           dim=-1).float(),
    "group_norm": lambda x, r: normlab.group_norm(x.reshape(x.shape[0], 4, -1), 2, B[:4], W[:4]).reshape(x.shape),
    "group_norm_one_group": lambda x, r: normlab.group_norm(x.reshape(x.shape[0], 4, -1), 1, B[:4],
                                                            W[:4]).reshape(x.shape),
    "dyt": lambda x, r: normlab.dyt(x, ALPHA, *wb(x.shape[-1])),
    "gated_rms_norm": lambda x, r: normlab.gated_rms_norm(x, r, x.shape[-1], wb(x.shape[-1])[0],
                                                          group_size=x.shape[-1] // 4),
    "gated_rms_norm_after": lambda x, r: normlab.gated_rms_norm(x, r, x.shape[-1], wb(x.shape[-1])[0], casting="gemma",
                                                                norm_before_gate=True),
    "batch_norm_eval": lambda x, r: normlab.batch_norm(x.reshape(x.shape[0], 4, -1), W[:4], B[:4].abs() + 0.1,
                                                       W[4:8], B[4:8], False),
    "batch_norm_eval_nlc": lambda x, r: normlab.batch_norm(x.reshape(x.shape[0], -1, 4), W[:4], B[:4].abs() + 0.1,
                                                           None, None, False, layout="NLC"),
}


@pytest.mark.parametrize("op", list(ROW_OPS))
def test_batch_invariance(op):
    f = ROW_OPS[op]
    x, r = rand(300, N, mean=2.0), rand(300, N, seed=3)
    alone = f(x[7:8], r[7:8])
    for m in (8, 255, 300):
        assert torch.equal(f(x[:m], r[:m])[7:8], alone), f"{op}: row 7 differs in a batch of {m}"
    assert torch.equal(f(x[6:8], r[6:8])[1:2], alone), f"{op}: row 7 differs in a batch of 2"


@pytest.mark.parametrize(
    "op", ["layer_norm", "rms_norm", "add_layer_norm", "group_norm_one_group", "gated_rms_norm_after"]
)
def test_long_rows_batch_and_thread_invariant(op, monkeypatch):
    """Rows longer than torch's parallel grain (32768): a lone row is summed in the same order as in a
    batch and with 1 or 2 threads (torch's own x.mean(dim=-1) is neither); dx of the row too."""
    f = ROW_OPS[op]
    n = 40_000
    x, r, dy = rand(3, n, mean=3.0), rand(3, n, seed=3), rand(3, 2 * n if op == "add_layer_norm" else n, seed=4)

    def run(rows):
        xs = x[rows].clone().requires_grad_()
        y = f(xs, r[rows])
        (dx,) = torch.autograd.grad(y, xs, dy[rows])
        return y.detach(), dx

    with threads(2, monkeypatch):
        y_alone, dx_alone = run(slice(1, 2))
        y_batch, dx_batch = run(slice(0, 3))
    with threads(1, monkeypatch):
        y_one, dx_one = run(slice(1, 2))
    assert torch.equal(y_batch[1:2], y_alone) and torch.equal(dx_batch[1:2], dx_alone), f"{op}: not batch invariant"
    assert torch.equal(y_one, y_alone) and torch.equal(dx_one, dx_alone), f"{op}: 1 vs 2 threads differ"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_long_rows_match_torch(dtype):
    """The reference sums rows longer than ``ROW_CHUNK`` (8192) chunk by chunk: every chunk and the tail
    must count. fp64 takes the reference path anyway; fp32 is forced onto it."""
    n = 3 * 8192 + 123
    x = rand(3, n, dtype=dtype, mean=2.0)
    cases = {
        "layer_norm": (lambda t: normlab.layer_norm(t, n, eps=1e-6), lambda t: F.layer_norm(t, (n,), eps=1e-6)),
        "rms_norm": (lambda t: normlab.rms_norm(t, n, eps=1e-6), lambda t: F.rms_norm(t, (n,), eps=1e-6)),
        "group_norm": (
            lambda t: normlab.group_norm(t.reshape(3, 1, n), 1), lambda t: F.group_norm(t.reshape(3, 1, n), 1)
        ),
        "batch_norm": (lambda t: normlab.batch_norm(t.reshape(3, 1, n), None, None, training=True),
                       lambda t: F.batch_norm(t.reshape(3, 1, n), None, None, training=True)),
    }
    with normlab.backend("reference"):
        for name, (ours, theirs) in cases.items():
            assert_tolerance_rule(ours(x), theirs(x), theirs(x.double()), name)


def _nan_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[2].view(-1)[5] = float("nan")
    x[4].view(-1)[0] = float("inf")
    return x


# The comparison run replaces the NaN/inf rows by clean ones (same row count: parameter gradients are
# sums over rows, whose rounding depends on the row positions) — a loss over the good rows must not see
# the difference, bitwise.
GOOD = [0, 1, 3, 5]


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("where", ["input", "residual"])
def test_fused_add_nan_row_does_not_leak(op, where):
    fn = normlab.add_layer_norm if op == "add_layer_norm" else normlab.add_rms_norm
    params = (W, B) if op == "add_layer_norm" else (W,)
    x, r = rand(6, N), rand(6, N, seed=3)

    def run(x, r):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in params]
        y, s = fn(xs, rs, N, *ps)
        (y[GOOD].square().sum() + s[GOOD].sum()).backward()
        return y, s, xs.grad, rs.grad, [p.grad for p in ps]

    y, s, dx, dr, dps = run(*((_nan_rows(x), r) if where == "input" else (x, _nan_rows(r))))
    y_ok, s_ok, dx_ok, dr_ok, dps_ok = run(x, r)
    assert not torch.isfinite(y[2]).any() and not torch.isfinite(s[4]).all()
    assert torch.equal(y[GOOD], y_ok[GOOD]) and torch.equal(s[GOOD], s_ok[GOOD])
    assert torch.equal(dx[GOOD], dx_ok[GOOD]) and torch.equal(dr[GOOD], dr_ok[GOOD])
    for p, q in zip(dps, dps_ok):
        assert torch.equal(p, q), f"{op}: a NaN/inf row leaked into a parameter gradient"


@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_batch_norm_eval_nan_sample_does_not_leak(layout):
    """In eval BatchNorm uses the running statistics: samples are independent."""
    x = rand(6, 4, 5) if layout == "NCL" else rand(6, 5, 4)
    rm, rv = rand(4, seed=5), rand(4, seed=6).abs() + 0.5

    def run(x):
        xs = x.clone().requires_grad_()
        w, b = W[:4].clone().requires_grad_(), B[:4].clone().requires_grad_()
        y = normlab.batch_norm(xs, rm, rv, w, b, False, layout=layout)
        y[GOOD].square().sum().backward()
        return y, xs.grad, w.grad, b.grad

    y, dx, dw, db = run(_nan_rows(x))
    y_ok, dx_ok, dw_ok, db_ok = run(x)
    assert torch.isnan(y[2]).any() and torch.equal(y[GOOD], y_ok[GOOD]) and torch.equal(dx[GOOD], dx_ok[GOOD])
    assert torch.equal(dw, dw_ok) and torch.equal(db, db_ok), "a NaN sample leaked into a parameter gradient"


def _grads_of(fn, *shapes_and_params):
    """Outputs and gradients of every input of ``fn`` for fixed random inputs (created inside)."""
    ins = [rand(*shape, seed=i, mean=0.5).requires_grad_() for i, shape in enumerate(shapes_and_params)]
    y = fn(*ins)
    return [y.detach(), *torch.autograd.grad(y, ins, rand(*y.shape, seed=99))]


# ops over more than torch's parallel grain (32768 elements) in one reduction: a channel of BatchNorm(1),
# DyT's alpha gradient (a sum over every element), LayerNorm's parameter gradients over many rows
THREAD_CASES = {
    "dyt": (lambda x, a, w: normlab.dyt(x, a, w), (600, 64), (1,), (64,)),
    "batch_norm_one_channel": (lambda x, w, b: normlab.batch_norm(x, None, None, w, b, True), (64, 1, 600), (1,), (1,)),
    "batch_norm": (lambda x, w: normlab.batch_norm(x, None, None, w, None, True, layout="NLC"), (40, 1000, 3), (3,)),
    "layer_norm": (lambda x, w, b: normlab.layer_norm(x, 64, w, b), (600, 64), (64,), (64,)),
    "rms_norm": (lambda x, w: normlab.rms_norm(x, 64, w), (600, 64), (64,)),
    "gated_rms_norm": (lambda x, z, w: normlab.gated_rms_norm(x, z, 64, w, group_size=16), (600, 64), (600, 64),
                       (64,)),
    "gated_rms_norm_after": (lambda x, z, w: normlab.gated_rms_norm(x, z, 64, w, norm_before_gate=True), (600, 64),
                             (600, 64), (64,)),
    "group_norm": (lambda x, w: normlab.group_norm(x, 1, w), (1, 4, 10000), (4,)),
}


@pytest.mark.parametrize("op", list(THREAD_CASES))
def test_one_and_two_threads_bitwise(op, monkeypatch):
    """Determinism (docs/architecture.md §4): forward and every gradient bitwise equal with 1 and 2 threads (torch's
    and with it the native kernels)."""
    fn, *shapes = THREAD_CASES[op]
    with threads(1, monkeypatch):
        one = _grads_of(fn, *shapes)
    with threads(2, monkeypatch):
        two = _grads_of(fn, *shapes)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"{op}: {'output' if i == 0 else f'gradient {i}'} differs between 1 and 2 threads"
