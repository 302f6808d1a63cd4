"""The modules' forward reads each parameter as ``getattr`` would: a registered parameter, a parametrization's
value, ``torch.func.functional_call``'s stand-ins and a plain tensor set in its place all reach the op."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab.nn import AddLayerNorm, AddRMSNorm, DyT, LayerNorm, RMSNorm
from tests.helpers import rand

N = 16
X, R = rand(3, N, mean=0.5), rand(3, N, seed=1)

# module class → (its parameters, f(x, r, params) → the functional op's outputs, as a tuple)
MODULES = {
    LayerNorm: (("weight", "bias"), lambda x, r, p: (normlab.layer_norm(x, N, p["weight"], p["bias"]),)),
    AddLayerNorm: (("weight", "bias"), lambda x, r, p: normlab.add_layer_norm(x, r, N, p["weight"], p["bias"])),
    RMSNorm: (("weight",), lambda x, r, p: (normlab.rms_norm(x, N, p["weight"]),)),
    AddRMSNorm: (("weight",), lambda x, r, p: normlab.add_rms_norm(x, r, N, p["weight"])),
    DyT: (("alpha", "weight", "bias"), lambda x, r, p: (normlab.dyt(x, p["alpha"], p["weight"], p["bias"]),)),
}


def forward(module, x, r):
    out = module(x, r) if isinstance(module, (AddLayerNorm, AddRMSNorm)) else module(x)
    return out if isinstance(out, tuple) else (out,)


def assert_outputs_equal(got, expected):
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


class Doubled(nn.Module):
    def forward(self, p):
        return 2 * p


def values(names, seed=2):
    return {name: rand(1 if name == "alpha" else N, seed=seed + i) for i, name in enumerate(names)}


@pytest.mark.parametrize("cls", list(MODULES))
def test_parametrized_parameter(cls):
    names, f = MODULES[cls]
    m = cls(N)
    with torch.no_grad():
        for name, value in values(names).items():
            getattr(m, name).copy_(value)
    parametrize.register_parametrization(m, "weight", Doubled())
    expected = {name: getattr(m, name) for name in names}
    assert torch.equal(expected["weight"], 2 * m.parametrizations.weight.original)
    assert_outputs_equal(forward(m, X, R), f(X, R, expected))


@pytest.mark.parametrize("cls", list(MODULES))
def test_functional_call_stand_ins(cls):
    names, f = MODULES[cls]
    m = cls(N)
    stand_ins = values(names, seed=7)
    args = (X, R) if cls in (AddLayerNorm, AddRMSNorm) else (X,)
    got = torch.func.functional_call(m, stand_ins, args)
    assert_outputs_equal(got if isinstance(got, tuple) else (got,), f(X, R, stand_ins))
    assert_outputs_equal(forward(m, X, R), f(X, R, dict(m.named_parameters())))  # its own parameters again


@pytest.mark.parametrize("cls", list(MODULES))
def test_plain_tensor_in_a_parameters_place(cls):
    """As the old ``weight_norm`` hooks do: the parameter deleted, a plain tensor set under its name."""
    names, f = MODULES[cls]
    m = cls(N)
    weight = rand(N, seed=11)
    del m.weight
    m.weight = weight
    assert "weight" not in m._parameters
    params = {name: getattr(m, name) for name in names}
    assert params["weight"] is weight
    assert_outputs_equal(forward(m, X, R), f(X, R, params))
