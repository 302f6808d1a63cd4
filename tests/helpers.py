"""Shared test helpers: the tolerance rule of docs/architecture.md §7 and common inputs."""

from __future__ import annotations

import contextlib

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# atol per dtype (docs/architecture.md §7). fp64: the reference itself, so only rounding noise is allowed.
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-12}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_tolerance_rule(fast: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    """``max|f - r| ≤ 2 · max|t - r| + atol(dtype)``: the fast path is at most twice as far from the
    float64 reference as torch's own op in the same dtype."""
    assert fast.dtype == torch_out.dtype, (fast.dtype, torch_out.dtype)
    assert fast.shape == ref64.shape, (fast.shape, ref64.shape)
    e_fast, e_torch = max_err(fast, ref64), max_err(torch_out, ref64)
    bound = 2 * e_torch + ATOL[fast.dtype]
    assert e_fast <= bound, f"{what}: max|f-r| = {e_fast:.3g} > 2·max|t-r| + atol = {bound:.3g} (dtype {fast.dtype})"


def assert_close_same_dtype(fast: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    """Where torch has no op: the reference computed in the same dtype takes torch's place in the rule."""
    assert_tolerance_rule(fast, ref, ref64, what)


def rand(*shape: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + mean).to(dtype)


def assert_compiled_matches_eager(f, args, wrt, **compile_options) -> None:
    """``torch.compile(f, fullgraph=True)`` gives the eager value of ``f(*args)`` and the eager gradients
    with respect to ``wrt``."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = f(*args)
    grads_eager = torch.autograd.grad(eager, wrt)
    compiled = torch.compile(f, fullgraph=True, **compile_options)(*args)
    grads_compiled = torch.autograd.grad(compiled, wrt)
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(c, e)


@contextlib.contextmanager
def threads(count: int, monkeypatch=None):
    """Run torch, and with it normlab's native kernels (torch's intra-op pool), on ``count`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_bits_on_every_isa(outputs) -> None:
    """``outputs()`` (a list of tensors) is bitwise the same under every ISA build of the cpu backend this CPU
    runs; NaNs agree in place, not in payload (x86 keeps the first operand's, and the compiler orders
    commutative operands per build)."""
    from normlab.kernels import cpu as K

    before = K.isa()
    try:
        results = {}
        for isa in K.isas():
            K.set_isa(isa)
            results[isa] = outputs()
    finally:
        K.set_isa(before)
    first, *others = results.values()
    for isa, got in zip(list(results)[1:], others):
        for i, (a, b) in enumerate(zip(first, got)):
            bits = torch.int16 if a.element_size() == 2 else torch.int32
            same = (a.view(bits) == b.view(bits)) | (torch.isnan(a) & torch.isnan(b))
            assert same.all(), f"{isa} differs from {K.isa()} in output {i}"
