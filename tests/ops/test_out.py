"""``out=`` of the row-wise ops: refused when it shares memory with what the op reads."""

from __future__ import annotations

import pytest
import torch

import normlab
from tests.helpers import rand

OPS = {
    "rms_norm": lambda x, w, out: normlab.rms_norm(x, 32, w, out=out),
    "layer_norm": lambda x, w, out: normlab.layer_norm(x, 32, w, rand(32, seed=2), out=out),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_sharing_memory_with_an_input_is_refused(op, backend):
    """A kernel writes part of a row before it has read all of it (and re-reads a bf16 block it must
    form again exactly): an ``out`` overlapping the input would give wrong rows, so it is refused before
    anything is written. Cases: shifted by a row, the input itself, the weight inside ``out``."""
    f = OPS[op]
    buf, holder = rand(9, 32), rand(8, 32, seed=3)
    cases = [(buf[:-1], rand(32, seed=1), buf[1:]), (buf[:-1], rand(32, seed=1), buf[:-1]),
             (rand(8, 32, seed=4), holder[5], holder)]
    with normlab.backend(backend):
        for x, w, out in cases:
            before, held = buf.clone(), holder.clone()
            with pytest.raises(ValueError, match="out shares memory with the (input|weight)"):
                f(x, w, out)
            assert torch.equal(buf, before) and torch.equal(holder, held)
        with pytest.raises(TypeError, match="out must be a tensor"):
            f(rand(8, 32), rand(32, seed=1), [0.0])
