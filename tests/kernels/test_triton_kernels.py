"""Every Triton kernel against the references with the tolerance rule (docs/architecture.md §7), every option and
dtype, rows longer than one chunk, parameter gradients, batch invariance and determinism (``torch.equal``).

By default on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by ``_triton.py`` before any
kernel is defined); ``NORMLAB_TEST_DEVICE=cuda`` runs the same tests compiled on a GPU.
triton is a test dependency: without it this module fails to import — it is never skipped.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab import dispatch
from normlab.ops.layer_norm import add_layer_norm_reference, layer_norm_bwd_ref, layer_norm_fwd_ref
from normlab.ops.rms_norm import (
    add_rms_norm_reference,
    rms_norm_apply_ref,
    rms_norm_bwd_ref,
    rms_norm_fwd_ref,
)
from tests import helpers
from tests.helpers import assert_close_same_dtype, assert_tolerance_rule, max_err
from tests.kernels._triton import DEVICE, backend_module  # first: sets TRITON_INTERPRET before triton loads

nt = backend_module()
from normlab.kernels.triton import _common


def rand(*shape, **kwargs):
    """tests.helpers.rand on the device under test."""
    return helpers.rand(*shape, **kwargs).to(DEVICE)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps
LONG = _common.MAX_BLOCK + 37  # rows longer than one chunk: the looped reduction


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 elements and 3 backward programs: the looped reductions and the multi-row partials
    on small, fast shapes."""
    monkeypatch.setattr(_common, "MAX_BLOCK", 16)
    monkeypatch.setattr(_common, "MAX_ROW_PROGRAMS", 3)
    monkeypatch.setattr(_common, "MIN_ROWS_PER_PROGRAM", 1)


def _param(n, dtype, seed, kind):
    """A parameter of the input dtype (``kind="dtype"``), fp32 master weights (``"fp32"``) or None;
    seed 1 gives a weight around 1, other seeds a bias around 0."""
    if kind == "none":
        return None
    return rand(n, dtype=torch.float32 if kind == "fp32" else dtype, seed=seed, mean=1.0 if seed == 1 else 0.0)


def _d(t):
    return None if t is None else t.double()


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------
def _check_rms_fwd(x, w, casting, offset, k, what):
    y, rstd = nt.rms_norm_fwd(x, w, EPS32, casting, offset, k)
    y_same, rstd_same = rms_norm_fwd_ref(x, w, EPS32, casting, offset, k)
    y64, rstd64 = rms_norm_fwd_ref(x.double(), _d(w), EPS32, casting, offset, k)
    assert y.dtype == x.dtype and rstd.dtype == torch.float32 and rstd.shape == (x.shape[0],)
    assert_close_same_dtype(y, y_same, y64, f"rms_norm y {what}")
    assert_tolerance_rule(rstd, rstd_same, rstd64, f"rms_norm rstd {what}")
    # the casting mode's roundings, exactly: given the kernel's rstd, the reference's second half
    # (accuracy alone cannot tell: a skipped intermediate rounding is more accurate, not less)
    assert torch.equal(y, rms_norm_apply_ref(x, w, rstd, casting, offset)), f"rms_norm roundings {what}"
    return rstd


def _check_rms_bwd(x, w, rstd, offset, k, dsum, what):
    dy = rand(*x.shape, dtype=x.dtype, seed=11)
    dx, dw = nt.rms_norm_bwd(dy, x, w, rstd, offset, k, dsum)
    dx_same, dw_same = rms_norm_bwd_ref(dy, x, w, rstd, offset, k, EPS32, dsum)
    _, rstd64 = rms_norm_fwd_ref(x.double(), None, EPS32, "gemma", 0.0, k)
    dx64, dw64 = rms_norm_bwd_ref(dy.double(), x.double(), _d(w), rstd64, offset, k, EPS32, _d(dsum))
    assert_close_same_dtype(dx, dx_same, dx64, f"rms_norm dx {what}")
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype
        assert_close_same_dtype(dw, dw_same, dw64, f"rms_norm dw {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("partial", [None, 0.4])
def test_rms_norm_options(dtype, casting, offset, partial):
    n = 37
    k = n if partial is None else 15
    x = rand(3, n, dtype=dtype)
    for kind in ("dtype", "fp32", "none"):
        w = _param(n, dtype, 1, kind)
        rstd = _check_rms_fwd(x, w, casting, offset, k, f"{dtype} {casting} o={offset} k={k} w={kind}")
        _check_rms_bwd(x, w, rstd, offset, k, None, f"{dtype} o={offset} k={k} w={kind}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype):
    """casting="gemma" is torch's F.rms_norm: the tolerance rule against it, odd sizes, n = 1."""
    for n in (1, 5, 127, 300):
        x, w = rand(3, n, dtype=dtype), rand(n, dtype=dtype, seed=1)
        y = normlab.rms_norm(x, n, w, casting="gemma", backend="triton")
        ref64 = rms_norm_fwd_ref(x.double(), w.double(), EPS32, "gemma", 0.0, n)[0]
        assert_tolerance_rule(y, F.rms_norm(x, (n,), w), ref64, f"F.rms_norm {dtype} n={n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_add_rms_norm(dtype, residual_dtype):
    n = 45
    x, r, w = rand(5, n, dtype=dtype), rand(5, n, dtype=dtype, seed=2), rand(n, dtype=dtype, seed=1)
    rd = residual_dtype or dtype
    for casting in ("llama", "gemma", "none"):
        y, s, rstd = nt.add_rms_norm_fwd(x, r, w, EPS32, casting, 0.5, 30, rd)
        y_same, s_same = add_rms_norm_reference(
            x, r, n, w, EPS32, casting=casting, offset=0.5, partial=30 / n, residual_dtype=rd
        )
        y64, _ = add_rms_norm_reference(x.double(), r.double(), n, w.double(), EPS32, offset=0.5, partial=30 / n)
        assert y.dtype == dtype and s.dtype == rd
        assert torch.equal(s, s_same), "the sum x + residual is exact up to one rounding"
        assert_close_same_dtype(y, y_same, y64, f"add_rms_norm {dtype} {casting} residual {rd}")
        assert torch.equal(rstd, nt.rms_norm_fwd(s, w, EPS32, casting, 0.5, 30)[1])


def test_add_rms_norm_autograd_through_the_op():
    """The fused op's backward is rms_norm_bwd on s with dsum; through the public API with backend="triton"."""
    n = 24
    x, r = rand(4, n).requires_grad_(), rand(4, n, seed=1).requires_grad_()
    w = rand(n, seed=2).requires_grad_()
    add_rms = dict(residual=r, weight=w, casting="llama", offset=0.0, k=n, residual_dtype=x.dtype)
    assert dispatch.select("add_rms_norm", x, "triton", **add_rms) == "triton"
    y, s = normlab.add_rms_norm(x, r, n, w, offset=1.0, backend="triton")
    (y.square().sum() + 0.5 * s.sum()).backward()  # dsum arrives as an expanded (stride-0) tensor
    grads = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    y2, s2 = normlab.add_rms_norm(x, r, n, w, offset=1.0, backend="reference")
    (y2.square().sum() + 0.5 * s2.sum()).backward()
    for a, b in zip(grads, (x.grad, r.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_long_rows():
    """n > MAX_BLOCK: the reduction loops over chunks (default block size)."""
    for dtype in (torch.bfloat16,):
        x, w = rand(2, LONG, dtype=dtype, scale=3.0), rand(LONG, dtype=dtype, seed=1)
        rstd = _check_rms_fwd(x, w, "llama", 0.0, LONG - 100, f"long {dtype}")
        _check_rms_bwd(x, w, rstd, 0.0, LONG - 100, rand(2, LONG, dtype=dtype, seed=5), f"long {dtype}")


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_chunked(dtype):
    """Chunks of 16: odd n over several chunks, partial k ending mid-chunk, 3 programs × several rows."""
    for n, k in ((53, 21), (17, 17)):
        x = rand(5, n, dtype=dtype)
        for w in (rand(n, dtype=dtype, seed=1), None):
            rstd = _check_rms_fwd(x, w, "llama", 1.0, k, f"chunked n={n} k={k}")
            _check_rms_bwd(x, w, rstd, 1.0, k, rand(5, n, dtype=dtype, seed=3), f"chunked n={n} k={k}")
        _y, s, _ = nt.add_rms_norm_fwd(x, rand(5, n, dtype=dtype, seed=2), None, EPS32, "none", 0.0, k, torch.float32)
        assert torch.equal(s, x.float() + rand(5, n, dtype=dtype, seed=2).float())


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def _check_ln(x, w, b, dsum, what, torch_op=True):
    y, mean, rstd = nt.layer_norm_fwd(x, w, b, 1e-5)
    y_same, mean_same, rstd_same = layer_norm_fwd_ref(x, w, b, 1e-5)
    y64, mean64, rstd64 = layer_norm_fwd_ref(x.double(), _d(w), _d(b), 1e-5)
    if torch_op and (w is None or w.dtype == x.dtype) and (b is None or b.dtype == x.dtype):
        y_same = F.layer_norm(x, (x.shape[1],), w, b, 1e-5)  # torch's own op in the same dtype
    assert_close_same_dtype(y, y_same, y64, f"layer_norm y {what}")
    assert_tolerance_rule(mean, mean_same, mean64, f"layer_norm mean {what}")
    assert_tolerance_rule(rstd, rstd_same, rstd64, f"layer_norm rstd {what}")
    dy = rand(*x.shape, dtype=x.dtype, seed=11)
    dx, dw, db = nt.layer_norm_bwd(dy, x, w, b, mean, rstd, dsum)
    same = layer_norm_bwd_ref(dy, x, w, b, mean, rstd, 1e-5, dsum)
    ref64 = layer_norm_bwd_ref(dy.double(), x.double(), _d(w), _d(b), mean64, rstd64, 1e-5, _d(dsum))
    for name, got, s, r, p in zip(("dx", "dw", "db"), (dx, dw, db), same, ref64, (x, w, b)):
        if p is None:
            assert got is None, name
        else:
            assert got.dtype == p.dtype
            assert_close_same_dtype(got, s, r, f"layer_norm {name} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grads_over_many_programs(dtype, monkeypatch):
    """More backward programs than :func:`sum_partials` adds per step: every partial row counts."""
    monkeypatch.setattr(_common, "MIN_ROWS_PER_PROGRAM", 1)
    rows, n = 100, 40
    assert _common.row_split(rows)[0] > 2 * _common.SUM_BLOCK_G
    x = rand(rows, n, dtype=dtype, mean=0.5)
    w, b = _param(n, dtype, 1, "dtype"), _param(n, dtype, 2, "dtype")
    rstd = _check_rms_fwd(x, w, "gemma", 0.0, n, f"{rows} programs")
    _check_rms_bwd(x, w, rstd, 0.0, n, None, f"{rows} programs")
    _check_ln(x, w, b, None, f"{rows} programs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", ["wb", "w", "b", "none", "fp32"])
def test_layer_norm(dtype, params):
    for n in (1, 37, 300):
        x = rand(3, n, dtype=dtype, scale=2.0, mean=3.0)
        kind = "fp32" if params == "fp32" else "dtype"
        w = _param(n, dtype, 1, kind) if params in ("wb", "w", "fp32") else None
        b = _param(n, dtype, 2, kind) if params in ("wb", "b", "fp32") else None
        _check_ln(x, w, b, None, f"{dtype} {params} n={n}")


@pytest.mark.parametrize("mean, spread", [(1e4, 1.0), (10.0, 1e-3)])
def test_layer_norm_large_mean_small_spread(mean, spread):
    """The corrected two-pass statistics: exact where E[x²] − E[x]² cancels (mean 1e4), and fp32 output
    within a few ulps of the fp64 result where ulp(mean) is comparable to the spread (as the reference)."""
    x, w, b = rand(4, 257, mean=mean, scale=spread), rand(257, seed=1), rand(257, seed=2)
    _check_ln(x, w, b, None, f"mean {mean} spread {spread}")
    y, _, _rstd = nt.layer_norm_fwd(x, w, b, 1e-5)
    y64 = layer_norm_fwd_ref(x.double(), w.double(), b.double(), 1e-5)[0]
    assert max_err(y, y64) <= 4 * EPS32 * y64.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_add_layer_norm(dtype, residual_dtype):
    n = 45
    x, r = rand(5, n, dtype=dtype), rand(5, n, dtype=dtype, seed=2)
    w, b = rand(n, dtype=dtype, seed=1), rand(n, dtype=dtype, seed=3)
    rd = residual_dtype or dtype
    y, s, mean, rstd = nt.add_layer_norm_fwd(x, r, w, b, 1e-5, rd)
    y_same, s_same = add_layer_norm_reference(x, r, n, w, b, 1e-5, residual_dtype=rd)
    y64, _ = add_layer_norm_reference(x.double(), r.double(), n, w.double(), b.double(), 1e-5)
    assert y.dtype == dtype and s.dtype == rd and torch.equal(s, s_same)
    assert_close_same_dtype(y, y_same, y64, f"add_layer_norm {dtype} residual {rd}")
    _, mean1, rstd1 = nt.layer_norm_fwd(s, w, b, 1e-5)
    assert torch.equal(mean, mean1) and torch.equal(rstd, rstd1)
    _check_ln(s, w, b, rand(5, n, dtype=rd, seed=7), f"with dsum {dtype}", torch_op=False)


def test_layer_norm_long_rows():
    for dtype in (torch.float32,):
        x = rand(2, LONG, dtype=dtype, scale=2.0, mean=-5.0)
        _check_ln(x, rand(LONG, dtype=dtype, seed=1), rand(LONG, dtype=dtype, seed=2), None, f"long {dtype}")


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_chunked(dtype):
    """Chunks of 16: Chan's merge of chunk statistics, odd n, 3 programs × several rows."""
    for n in (53, 17):
        x = rand(5, n, dtype=dtype, mean=100.0)
        _check_ln(x, rand(n, dtype=dtype, seed=1), rand(n, dtype=dtype, seed=2), None, f"chunked n={n}")
        dsum = rand(5, n, dtype=dtype, seed=4)
        _check_ln(x, None, rand(n, dtype=dtype, seed=2), dsum, f"chunked n={n}", torch_op=False)


def test_layer_norm_through_the_op():
    n = 40
    x, w, b = rand(3, 5, n).requires_grad_(), rand(n, seed=1).requires_grad_(), rand(n, seed=2).requires_grad_()
    assert dispatch.select("layer_norm", x.reshape(-1, n), "triton", weight=w, bias=b) == "triton"
    y = normlab.layer_norm(x, n, w, b, backend="triton")
    y.backward(rand(3, 5, n, seed=3))
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    y_ref = F.layer_norm(x, (n,), w, b)
    y_ref.backward(rand(3, 5, n, seed=3))
    torch.testing.assert_close(y, y_ref)
    for a, ref in zip(grads, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_out_argument_through_the_op():
    """``out=`` hands the kernels a preallocated output (inference), same values as a fresh one."""
    x, w, b = rand(2, 3, 40, dtype=torch.bfloat16), rand(40, seed=1), rand(40, seed=2)
    for fn in (lambda o=None: normlab.rms_norm(x, 40, w, casting="none", offset=0.5, backend="triton", out=o),
               lambda o=None: normlab.layer_norm(x, 40, w, b, backend="triton", out=o)):
        out = torch.empty_like(x)
        assert fn(out) is out and torch.equal(out, fn())


def test_out_buffers_of_the_kernels():
    """Every forward writes into the buffers it is given (the contract's out= / residual_out=) the values of a
    fresh call, and a buffer of the wrong dtype is refused before the launch."""
    x, r, w = rand(4, 24, dtype=torch.bfloat16), rand(4, 24, dtype=torch.bfloat16, seed=1), rand(24, seed=2)
    out, res = torch.empty_like(x), torch.empty_like(x, dtype=torch.float32)
    calls = (lambda **o: nt.rms_norm_fwd(x, w, EPS32, "llama", 0.5, 20, **o),
             lambda **o: nt.add_rms_norm_fwd(x, r, w, EPS32, "none", 0.0, 24, torch.float32, **o),
             lambda **o: nt.layer_norm_fwd(x, w, w, 1e-5, **o),
             lambda **o: nt.add_layer_norm_fwd(x, r, w, None, 1e-5, torch.float32, **o))
    for i, call in enumerate(calls):
        fused = i % 2 == 1
        got = call(out=out, residual_out=res) if fused else call(out=out)
        assert got[0] is out and (not fused or got[1] is res)
        for a, b in zip(got, call()):
            assert torch.equal(a, b)
    wrong = r"residual_out must be a contiguous tensor of shape \[4, 24\], dtype torch.float32"
    with pytest.raises(ValueError, match=wrong):
        nt.add_rms_norm_fwd(x, r, w, EPS32, "none", 0.0, 24, torch.float32, residual_out=torch.empty_like(x))


# ----------------------------------------------------------------------------------------------
# Batch invariance, determinism, parameter-gradient rule, dispatch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_batch_invariance(direction):
    """A row's outputs are bitwise the same alone, in a batch of 255 and of 300 rows (bf16; forward:
    the fused RMSNorm and the plain LayerNorm kernel; backward: both kernels, dsum included)."""
    n = 33 if DEVICE == "cpu" else 4099
    dt = torch.bfloat16
    x, r, dy = rand(300, n, dtype=dt), rand(300, n, dtype=dt, seed=1), rand(300, n, dtype=dt, seed=2)
    w, b = rand(n, dtype=dt, seed=3), rand(n, dtype=dt, seed=4)
    _, rstd = rms_norm_fwd_ref(x, w, EPS32, "gemma", 0.0, n)
    _, mean, rstd_l = layer_norm_fwd_ref(x, w, b, 1e-5)

    def outputs(rows):
        if direction == "forward":
            return (*nt.add_rms_norm_fwd(x[rows], r[rows], w, EPS32, "none", 1.0, 20, torch.float32),
                    *nt.layer_norm_fwd(x[rows], w, b, 1e-5))
        return (nt.rms_norm_bwd(dy[rows], x[rows], w, rstd[rows], 1.0, n, r[rows])[0],
                nt.layer_norm_bwd(dy[rows], x[rows], w, b, mean[rows], rstd_l[rows])[0])

    alone = outputs(slice(7, 8))
    for m in (255, 300):
        for a, big in zip(alone, outputs(slice(0, m))):
            assert torch.equal(big[7:8], a)


def test_backward_rows_do_not_depend_on_the_row_split(monkeypatch):
    """dx of a row is the same whether its program owns 1 row or many."""
    x, dy, w = rand(40, 29), rand(40, 29, seed=1), rand(29, seed=2)
    _, rstd = nt.rms_norm_fwd(x, w, EPS32, "gemma", 0.0, 29)
    _, mean, rstd3 = nt.layer_norm_fwd(x, w, w, 1e-5)
    results = []
    for programs, min_rows in ((64, 1), (3, 1), (1, 40)):
        monkeypatch.setattr(_common, "MAX_ROW_PROGRAMS", programs)
        monkeypatch.setattr(_common, "MIN_ROWS_PER_PROGRAM", min_rows)
        results.append((nt.rms_norm_bwd(dy, x, w, rstd, 0.0, 29)[0], nt.layer_norm_bwd(dy, x, w, w, mean, rstd3)[0]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("chunked", [False, True])
def test_determinism(chunked, monkeypatch):
    """Forward and backward, parameter gradients included, are bitwise the same on every run
    (backward programs owning several rows each, rows of one chunk and of several)."""
    monkeypatch.setattr(_common, "MAX_ROW_PROGRAMS", 4)
    monkeypatch.setattr(_common, "MIN_ROWS_PER_PROGRAM", 1)
    if chunked:
        monkeypatch.setattr(_common, "MAX_BLOCK", 16)
    n, rows = (41, 30) if DEVICE == "cpu" else (_common.MAX_BLOCK * 2 + 3 if chunked else 4096, 2000)

    def run():
        x, dy, w, b = rand(rows, n), rand(rows, n, seed=1), rand(n, seed=2), rand(n, seed=3)
        y, rstd = nt.rms_norm_fwd(x, w, EPS32, "llama", 0.0, n)
        yl, mean, rstd_l = nt.layer_norm_fwd(x, w, b, 1e-5)
        return (y, *nt.rms_norm_bwd(dy, x, w, rstd, 0.0, n), yl, *nt.layer_norm_bwd(dy, x, w, b, mean, rstd_l))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN row itself
@pytest.mark.parametrize("chunked", [False, True])
def test_nan_row_does_not_leak_into_parameter_gradients(chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(_common, "MAX_BLOCK", 16)
    n = 32
    x, dy, w = rand(6, n), rand(6, n, seed=1), rand(n, seed=2)
    x[2, 5], x[4, 0] = float("nan"), float("inf")
    dy[2], dy[4] = 0.0, 0.0
    good = [0, 1, 3, 5]
    _, rstd = nt.rms_norm_fwd(x, w, EPS32, "llama", 0.0, n)
    _, dw = nt.rms_norm_bwd(dy, x, w, rstd, 0.0, n)
    _, dw_ok = nt.rms_norm_bwd(dy[good], x[good], w, rstd[good], 0.0, n)
    assert torch.isfinite(dw).all()
    torch.testing.assert_close(dw, dw_ok, rtol=1e-6, atol=1e-6)
    _, mean, rstd = nt.layer_norm_fwd(x, w, w, 1e-5)
    _, dw, db = nt.layer_norm_bwd(dy, x, w, w, mean, rstd)
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()


def test_supports_and_dispatch():
    x = rand(4, 16)
    assert dispatch.select("rms_norm", x, "triton", weight=None, casting="llama", offset=0.0, k=16) == "triton"
    # fp64 is declined: the reference serves it
    x64 = x.double()
    assert dispatch.select("rms_norm", x64, "triton", weight=None, casting="llama", offset=0.0, k=16) == "reference"
    # chosen by default for CUDA tensors only — CPU tensors never, even under the interpreter
    assert (dispatch.select("layer_norm", x, weight=None, bias=None) == "triton") == (DEVICE == "cuda")
    assert nt.supports("add_layer_norm", x, residual=x, weight=None, bias=None, residual_dtype=torch.float32)
    assert not nt.supports("add_layer_norm", x, residual=x, weight=None, bias=None, residual_dtype=torch.float64)
    y = normlab.rms_norm(x64, 16, backend="triton")  # falls back, never a wrong answer
    assert y.dtype == torch.float64


def test_kernels_compile_for_a_gpu_without_spills():
    """Every kernel compiles for sm_90 (Triton's compiler and ptxas, no GPU needed) — the interpreter
    accepts code the GPU compiler rejects — and keeps its values in registers (no stack: no spills)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernels", "_compile_triton_kernels.py")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 13, run.stdout
    for line in lines:
        assert line.endswith("STACK:0"), line


def test_import_fails_cleanly_without_triton(monkeypatch):
    """No triton installed: importing the backend raises ImportError (the dispatch falls back)."""
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [m for m in sys.modules if m.startswith("normlab.kernels.triton")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError):
        importlib.import_module("normlab.kernels.triton")
