"""The Triton gated RMSNorm kernels against the reference with the tolerance rule (docs/architecture.md §7):
every option and dtype, groups longer than one chunk, the weight gradient's partials, batch invariance and determinism.

On CPU tensors through Triton's interpreter by default (``tests/kernels/_triton.py``); ``NORMLAB_TEST_DEVICE=cuda``
runs the same tests compiled on a GPU."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab.ops.gated_rms_norm import gated_rms_norm_bwd_ref, gated_rms_norm_fwd_ref
from tests import helpers
from tests.helpers import assert_close_same_dtype
from tests.kernels._triton import DEVICE, backend_module  # first: sets TRITON_INTERPRET before triton loads

nt = backend_module()
from normlab.kernels.triton import _common

EPS = 1e-5


def rand(*shape, **kwargs):
    return helpers.rand(*shape, **kwargs).to(DEVICE)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 elements and 3 backward programs: looped group sums and multi-row partials on small shapes."""
    monkeypatch.setattr(_common, "MAX_BLOCK", 16)
    monkeypatch.setattr(_common, "MAX_ROW_PROGRAMS", 3)
    monkeypatch.setattr(_common, "MIN_ROWS_PER_PROGRAM", 1)


def _d(t):
    return None if t is None else t.double()


def _check(x, z, w, group_size, before, casting, offset, what):
    y, rstd = nt.gated_rms_norm_fwd(x, z, w, EPS, group_size, before, casting, offset)
    y_same, rstd_same = gated_rms_norm_fwd_ref(x, z, w, EPS, group_size, before, casting, offset)
    y64, rstd64 = gated_rms_norm_fwd_ref(x.double(), _d(z), _d(w), EPS, group_size, before, casting, offset)
    assert y.dtype == x.dtype and rstd.shape == (x.shape[0], x.shape[1] // group_size)
    assert_close_same_dtype(y, y_same, y64, f"y {what}")
    assert_close_same_dtype(rstd, rstd_same, rstd64, f"rstd {what}")
    # dy of scale 1/4 keeps dx (≈ rstd·dy·w, rstd up to ≈ 3 here) near unit scale, where the rule's atol is meant
    dy = rand(*x.shape, dtype=x.dtype, seed=7, scale=0.25)
    dx, dz, dw = nt.gated_rms_norm_bwd(dy, x, z, w, rstd, group_size, before, offset)
    with torch.no_grad():
        same = gated_rms_norm_bwd_ref(dy, x, z, w, rstd_same, EPS, group_size, before, offset)
        ref = gated_rms_norm_bwd_ref(dy.double(), x.double(), _d(z), _d(w), rstd64, EPS, group_size, before, offset)
    assert (dz is None) == (z is None) and (dw is None) == (w is None)
    for name, got, s, r in zip(("dx", "dz", "dw"), (dx, dz, dw), same, ref):
        if got is not None:
            assert_close_same_dtype(got, s, r, f"{name} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("casting, offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("gated, affine", [(True, True), (False, True), (True, False)])
def test_options_vs_reference(dtype, before, casting, offset, gated, affine):
    x, z = rand(5, 48, dtype=dtype, mean=0.3), rand(5, 48, dtype=dtype, seed=1, scale=2.0)
    w = rand(48, dtype=dtype, seed=2, mean=0.5)
    _check(x, z if gated else None, w if affine else None, 12, before, casting, offset, f"{dtype}")


@pytest.mark.parametrize("n, group_size", [(1, 1), (33, 11), (40, 40), (96, 1), (100, 25)])
def test_odd_sizes_long_groups_and_partials(n, group_size, small_chunks):
    x, z, w = rand(7, n, mean=0.3), rand(7, n, seed=1, scale=2.0), rand(n, seed=2, mean=0.5)
    for before in (False, True):
        _check(x, z, w, group_size, before, "llama", 0.0, f"n={n} g={group_size}")
    _check(x.bfloat16(), z.bfloat16(), w, group_size, True, "gemma", 0.0, f"fp32 weight n={n}")


def test_through_the_op_and_batch_invariance():
    x, z, w = rand(40, 64, mean=0.3).requires_grad_(), rand(40, 64, seed=1).requires_grad_(), rand(64, seed=2)
    w.requires_grad_()
    y = normlab.gated_rms_norm(x, z, 64, w, group_size=16, backend="triton")
    alone = normlab.gated_rms_norm(x[7:8], z[7:8], 64, w, group_size=16, backend="triton")
    assert torch.equal(y[7:8], alone)
    grads = torch.autograd.grad(y.square().sum(), (x, z, w))
    y_again = normlab.gated_rms_norm(x, z, 64, w, group_size=16, backend="triton")
    again = torch.autograd.grad(y_again.square().sum(), (x, z, w))
    for a, b in zip(grads, again):
        assert torch.equal(a, b)
    with normlab.backend("reference"):
        want = torch.autograd.grad(normlab.gated_rms_norm(x, z, 64, w, group_size=16).square().sum(), (x, z, w))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
