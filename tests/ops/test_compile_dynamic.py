"""``torch.compile(fullgraph=True, dynamic=True)``: every functional op traces with symbolic shapes (and
symbolic float arguments such as eps) — the input checks must not break the graph."""

from __future__ import annotations

import torch

import normlab
from tests.helpers import rand

OPS = {
    "layer_norm": lambda x: normlab.layer_norm(x, 16, eps=1e-6),
    "rms_norm": lambda x: normlab.rms_norm(x, 16, None, 1e-6, offset=1.0, partial=0.5),
    "add_layer_norm": lambda x: normlab.add_layer_norm(x, x, 16)[0],
    "add_rms_norm": lambda x: normlab.add_rms_norm(x, x, 16)[1],
    "group_norm": lambda x: normlab.group_norm(x.transpose(1, 2), 4),
    "batch_norm": lambda x: normlab.batch_norm(x, None, None, training=True, layout="NLC"),
    "dyt": lambda x: normlab.dyt(x, torch.tensor([0.5])),
}


def test_dynamic_shapes_fullgraph():
    """One graph with every op, compiled once for symbolic shapes, run at two shapes; eager gradients."""
    torch._dynamo.reset()

    def f(x):
        return sum(op(x).square().mean() for op in OPS.values())

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 5, 16), (3, 7, 16)]:
        x = rand(*shape, mean=0.5).requires_grad_()
        xe = x.detach().clone().requires_grad_()
        y, ye = compiled(x), f(xe)
        torch.testing.assert_close(y, ye)
        torch.testing.assert_close(torch.autograd.grad(y, x)[0], torch.autograd.grad(ye, xe)[0])
