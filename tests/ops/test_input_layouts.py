"""Every op gives the same result, bitwise, for a strided input (channels-last, transposed, expanded) as
for its contiguous copy — values, gradients and output shape — and the fused adds take fp32 master
weights with half inputs."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab.ops.layer_norm import add_layer_norm_reference
from normlab.ops.rms_norm import add_rms_norm_reference
from tests.helpers import assert_close_same_dtype, rand

C = 8
W, B = rand(C, seed=1), rand(C, seed=2)

# name → f(x) for x of shape (2, C, 3, C): every op normalizes something of that 4-D tensor
OPS = {
    "layer_norm": lambda x: normlab.layer_norm(x, (3, C), None, None),
    "rms_norm": lambda x: normlab.rms_norm(x, C, W, partial=0.5),
    "add_layer_norm": lambda x: sum(normlab.add_layer_norm(x, x * 0.5, C, W, B)),
    "add_rms_norm": lambda x: sum(normlab.add_rms_norm(x, x * 0.5, C, W)),
    "batch_norm_train": lambda x: normlab.batch_norm(x, None, None, W, B, True),
    "batch_norm_nlc": lambda x: normlab.batch_norm(x, None, None, W, B, True, layout="NLC"),
    "batch_norm_eval": lambda x: normlab.batch_norm(x, W, B.abs() + 0.1, W, B, False),
    "group_norm": lambda x: normlab.group_norm(x, 4, W, B),
    "dyt": lambda x: normlab.dyt(x, torch.tensor([0.5]), W, B),
}


def layouts():
    base = rand(2, C, 3, C, mean=1.0)
    yield "channels_last", base.to(memory_format=torch.channels_last)
    yield "transposed", rand(2, C, C, 3, mean=1.0, seed=3).transpose(2, 3)
    yield "expanded", rand(1, C, 3, C, mean=1.0, seed=4).expand(2, C, 3, C)
    yield "sliced", rand(2, C, 3, 2 * C, mean=1.0, seed=5)[..., ::2]


@pytest.mark.parametrize("op", list(OPS))
def test_strided_inputs_equal_contiguous(op):
    f = OPS[op]
    for name, x in layouts():
        assert not x.is_contiguous()
        xs, xc = x.detach().requires_grad_(), x.contiguous().requires_grad_()
        ys, yc = f(xs), f(xc)
        assert ys.shape == yc.shape == x.shape, name
        dy = rand(*x.shape, seed=9)
        (gs,), (gc,) = torch.autograd.grad(ys, xs, dy), torch.autograd.grad(yc, xc, dy)
        assert torch.equal(ys, yc), f"{op}: {name} input differs from its contiguous copy"
        assert torch.equal(gs, gc), f"{op}: gradient of a {name} input differs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_adds_take_fp32_master_weights(dtype):
    x, r = rand(4, 24, dtype=dtype), rand(4, 24, dtype=dtype, seed=3)
    w, b = rand(24, seed=1).requires_grad_(), rand(24, seed=2).requires_grad_()
    cases = (
        (normlab.add_layer_norm, add_layer_norm_reference, (w, b)),
        (normlab.add_rms_norm, add_rms_norm_reference, (w,)),
    )
    for fn, ref, params in cases:
        y, s = fn(x, r, 24, *params)
        assert y.dtype == s.dtype == dtype
        y_ref, s_ref = ref(x, r, 24, *params)
        y64, _ = ref(x.double(), r.double(), 24, *(p.double() for p in params))
        assert torch.equal(s, s_ref)
        assert_close_same_dtype(y, y_ref, y64, f"{fn.__name__} {dtype} with fp32 weights")
        grads = torch.autograd.grad(y.float().square().sum(), params)
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
