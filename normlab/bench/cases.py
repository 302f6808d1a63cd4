"""What the benchmark runs: for each op, normlab and the implementations it is compared with.

Every implementation is a forward function of the op's inputs returning its outputs; the runner times it
alone (``fwd``) or followed by ``torch.autograd.grad`` of every output (``fwd+bwd``). Other backends
(e.g. a GPU comparison library) add entries to :data:`EXTRA_IMPLS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import normlab

NORM_OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
OPS = (*NORM_OPS, "dyt")
FUSED = {"add_rms_norm", "add_layer_norm"}
EPS = 1e-6
DYT_ALPHA = 0.5  # the DyT module's initial alpha


@dataclass
class Inputs:
    x: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    alpha: torch.Tensor | None = None  # DyT's learnable scalar (a one-element tensor)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.residual, self.weight, self.bias, self.alpha) if t is not None]


def make_inputs(op: str, rows: int, n: int, dtype: torch.dtype, device: str, requires_grad: bool) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    with_bias = op in ("layer_norm", "add_layer_norm", "dyt")
    return Inputs(
        x=randn(rows, n),
        residual=randn(rows, n) if op in FUSED else None,
        weight=randn(n, scale=0.1, shift=1.0),
        bias=randn(n, scale=0.1) if with_bias else None,
        # in the input dtype, as a DyT module of a model in that dtype holds it
        alpha=(torch.full((1,), DYT_ALPHA, dtype=dtype, device=device).requires_grad_(requires_grad)
               if op == "dyt" else None),
    )


# ---- the seeds' reference formulas (what a model file would write) --------------------------------
def llama_rms_norm(x, w):
    """Hugging Face ``LlamaRMSNorm.forward``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def textbook_layer_norm(x, w, b):
    """``(x − mean) / sqrt(var + eps) · w + b`` in fp32, biased variance, cast back."""
    h = x.to(torch.float32)
    mu = h.mean(-1, keepdim=True)
    var = (h - mu).pow(2).mean(-1, keepdim=True)
    return ((h - mu) * torch.rsqrt(var + EPS) * w.float() + b.float()).to(x.dtype)


def dyt_formula(x, alpha, w, b):
    """DyT as a model file writes it, in the input dtype: ``w · tanh(α · x) + b``."""
    return w * torch.tanh(alpha * x) + b


#: normlab with one rounding (``x·rstd·w`` in fp32, rounded once): in bf16/fp16 what ``F.rms_norm``
#: computes, and what inductor compiles the Llama formula to (it drops the ``.to(dtype)`` round trip of
#: ``x·rstd``). The ``normlab`` row rounds twice, as the Llama formula does in eager mode.
ONE_ROUNDING = "normlab, one rounding"


def _impls_rms(n, backend):
    return {
        "normlab": lambda i: (normlab.rms_norm(i.x, n, i.weight, EPS, backend=backend),),
        ONE_ROUNDING: lambda i: (normlab.rms_norm(i.x, n, i.weight, EPS, casting="gemma", backend=backend),),
        "torch": lambda i: (F.rms_norm(i.x, (n,), i.weight, EPS),),
        "reference": lambda i: (llama_rms_norm(i.x, i.weight),),
    }


def _impls_ln(n, backend):
    return {
        "normlab": lambda i: (normlab.layer_norm(i.x, (n,), i.weight, i.bias, EPS, backend=backend),),
        "torch": lambda i: (F.layer_norm(i.x, (n,), i.weight, i.bias, EPS),),
        "reference": lambda i: (textbook_layer_norm(i.x, i.weight, i.bias),),
    }


def _impls_add_rms(n, backend):
    def unfused(i):
        s = i.x + i.residual
        return normlab.rms_norm(s, n, i.weight, EPS, backend=backend), s

    def torch_eager(i):
        s = i.x + i.residual
        return F.rms_norm(s, (n,), i.weight, EPS), s

    def reference(i):
        s = i.x + i.residual
        return llama_rms_norm(s, i.weight), s

    return {
        "normlab": lambda i: normlab.add_rms_norm(i.x, i.residual, n, i.weight, EPS, backend=backend),
        "normlab add, then norm": unfused,
        "torch": torch_eager,
        "reference": reference,
    }


def _impls_add_ln(n, backend):
    def unfused(i):
        s = i.x + i.residual
        return normlab.layer_norm(s, (n,), i.weight, i.bias, EPS, backend=backend), s

    def torch_eager(i):
        s = i.x + i.residual
        return F.layer_norm(s, (n,), i.weight, i.bias, EPS), s

    def reference(i):
        s = i.x + i.residual
        return textbook_layer_norm(s, i.weight, i.bias), s

    return {
        "normlab": lambda i: normlab.add_layer_norm(i.x, i.residual, (n,), i.weight, i.bias, EPS, backend=backend),
        "normlab add, then norm": unfused,
        "torch": torch_eager,
        "reference": reference,
    }


def _impls_dyt(n, backend):
    # torch has no DyT op: its eager baseline is the formula itself, which is also what torch.compile gets
    return {
        "normlab": lambda i: (normlab.dyt(i.x, i.alpha, i.weight, i.bias, backend=backend),),
        "torch": lambda i: (dyt_formula(i.x, i.alpha, i.weight, i.bias),),
    }


_BUILDERS = {"rms_norm": _impls_rms, "layer_norm": _impls_ln, "add_rms_norm": _impls_add_rms,
             "add_layer_norm": _impls_add_ln, "dyt": _impls_dyt}

#: Extra implementations by op: ``EXTRA_IMPLS[op][name] = (n, device) -> forward function or None``.
EXTRA_IMPLS: dict[str, dict[str, Callable]] = {op: {} for op in OPS}


#: the comparisons ``--quick`` leaves out: the eager reference formula, normlab's add-then-norm
SECONDARY = ("reference", "normlab add, then norm")


def implementations(op: str, n: int, device: str, compile_reference: bool, secondary: bool = True,
                    backend: str | None = None) -> dict[str, Callable]:
    """Name → forward function for ``op`` on rows of size ``n``; ``"compiled reference"`` is
    ``torch.compile`` of the reference formula, specialised to each shape and dtype (the strongest
    baseline torch offers: one compilation per shape, dtype and grad mode). DyT has no separate
    reference: its ``"torch"`` entry is the formula, and that is what is compiled. ``secondary=False``
    drops the :data:`SECONDARY` entries; ``backend`` is passed to normlab's calls (None: the dispatch's choice)."""
    impls = _BUILDERS[op](n, backend)
    if compile_reference:
        # every (op, shape, dtype, grad mode) compiles its own graph of the same reference function: lift
        # dynamo's per-function recompilation limit, or it would silently fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 8192)
        impls["compiled reference"] = torch.compile(impls.get("reference", impls["torch"]), dynamic=False)
    if not secondary:
        impls = {name: fn for name, fn in impls.items() if name not in SECONDARY}
    for name, build in EXTRA_IMPLS[op].items():
        fn = build(n, device)
        if fn is not None:
            impls[name] = fn
    return impls


def bytes_moved(op: str, mode: str, inputs: Inputs) -> int:
    """Bytes counted (docs/architecture.md §8): fwd = read x + write y; fused add + norm = 4N; fwd+bwd = 5N
    (fused: 8N — the forward's 4N, then read dy, d(sum), s and write dx); parameters counted once per pass
    read, once per gradient written.
    DyT counts as a norm: 2N forward, 5N fwd+bwd, its alpha among the parameters."""
    x = inputs.x
    big = x.numel() * x.element_size()
    params = sum(p.numel() * p.element_size() for p in (inputs.weight, inputs.bias, inputs.alpha) if p is not None)
    if mode == "fwd":
        return (4 if op in FUSED else 2) * big + params
    return (8 if op in FUSED else 5) * big + 3 * params


def upstream_grads(rows: int, n: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Fixed random gradients of the (at most two) outputs, for ``fwd+bwd``."""
    return [torch.randn(rows, n, generator=torch.Generator().manual_seed(i)).to(dtype=dtype, device=device)
            for i in (1, 2)]


def runner(impl: Callable, inputs: Inputs, mode: str, grads: list[torch.Tensor]) -> Callable[[], object]:
    """The call that is timed: the forward (``fwd``), or the forward then ``torch.autograd.grad`` of every
    output with respect to every input (``fwd+bwd``, ``inputs`` requiring grad)."""
    if mode == "fwd":  # run under no_grad by the caller: a context per call would be timed with a µs op
        return lambda: impl(inputs)
    wrt = inputs.tensors()

    def fwd_bwd():
        outs = impl(inputs)
        return torch.autograd.grad(outs, wrt, grads[: len(outs)])

    return fwd_bwd
