"""``torch.compile(fullgraph=True)`` (inductor) of a stack using every normlab module matches eager."""

import torch

import normlab.nn as nnl
from tests.helpers import rand


class Stack(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln, self.rms = nnl.LayerNorm(d), nnl.RMSNorm(d, partial=0.5)
        self.add_ln, self.add_rms = nnl.AddLayerNorm(d), nnl.AddRMSNorm(d, offset=1.0, casting="gemma")
        self.ada = nnl.AdaLayerNorm(d, cond_dim=8)
        self.bn, self.gn, self.dyt = nnl.BatchNorm(d, layout="NLC"), nnl.GroupNorm(4, d), nnl.DyT(d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, c):
        h = self.ln(x)
        h, s = self.add_ln(self.proj(h), x)
        h = self.rms(h)
        h, s = self.add_rms(h, s)
        h = self.ada(h, c)
        h = self.bn(h)
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        return self.dyt(h) + s


def test_compiled_stack_matches_eager():
    torch.manual_seed(0)
    eager, compiled_mod = Stack(), Stack()
    compiled_mod.load_state_dict(eager.state_dict())
    torch.nn.init.normal_(eager.ada.scale_shift.weight)  # non-trivial conditioning path
    compiled_mod.ada.scale_shift.weight.data.copy_(eager.ada.scale_shift.weight)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    x, c = rand(3, 5, 32), rand(3, 8, seed=1)
    for _ in range(2):  # training steps: running statistics must update identically
        ye, yc = eager(x, c), compiled(x, c)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().mean().backward()
        yc.square().mean().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled_mod.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(compiled_mod.bn.running_var, eager.bn.running_var)
    eager.eval(), compiled_mod.eval()
    torch.testing.assert_close(compiled(x, c), eager(x, c), rtol=1e-5, atol=1e-5)
