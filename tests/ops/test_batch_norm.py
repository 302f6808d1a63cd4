"""batch_norm against torch, the textbook formula and the float64 reference; running statistics; sync."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
from normlab.ops.batch_norm import batch_norm_reference
from tests.helpers import DTYPES, assert_tolerance_rule, rand

# (shape in NCL, C)
SHAPES = [(6, 4), (3, 5, 7), (1, 2, 9), (1, 3, 1)]


def to_layout(x_ncl: torch.Tensor, layout: str) -> torch.Tensor:
    """An NCL tensor laid out as asked: NLC puts the features last, ``(N, L, C)``."""
    return x_ncl if layout == "NCL" or x_ncl.dim() == 2 else x_ncl.transpose(1, 2).contiguous()


def from_layout(y: torch.Tensor, layout: str) -> torch.Tensor:
    return y if layout == "NCL" or y.dim() == 2 else y.transpose(1, 2)


def params(c, dtype, affine):
    w = rand(c, dtype=dtype, seed=1) if affine in ("both", "weight") else None
    b = rand(c, dtype=dtype, seed=2) if affine in ("both", "bias") else None
    return w, b


def running(c, dtype, seed=3):
    return rand(c, dtype=dtype, seed=seed, scale=0.1), rand(c, dtype=dtype, seed=seed + 1).abs() + 0.5


def textbook(x_ncl, w, b, eps):
    """BatchNorm1d written out: biased batch variance over every dim but dim 1."""
    dims = [0] + list(range(2, x_ncl.dim()))
    shape = [1, -1] + [1] * (x_ncl.dim() - 2)
    mean, var = x_ncl.mean(dims, keepdim=True), x_ncl.var(dims, unbiased=False, keepdim=True)
    y = (x_ncl - mean) / torch.sqrt(var + eps)
    return y * (1 if w is None else w.reshape(shape)) + (0 if b is None else b.reshape(shape))


# dtype × shape × layout × training × affine × fp32 params (fp32 params exist for half inputs only; a
# single value per channel in training raises: test_single_value_per_channel_raises_like_torch)
CASES = [
    (dtype, shape, layout, training, affine, fp32_params)
    for dtype in DTYPES for shape in SHAPES for layout in ("NCL", "NLC") for training in (True, False)
    for affine in ("both", "none") for fp32_params in (False, True)
    if not (training and shape[0] * math.prod(shape[2:]) == 1)
    and not (fp32_params and dtype not in (torch.bfloat16, torch.float16))
]


@pytest.mark.parametrize("dtype, shape, layout, training, affine, fp32_params", CASES)
def test_matches_torch(dtype, shape, layout, training, affine, fp32_params):
    c = shape[1]
    x_ncl = rand(*shape, dtype=dtype, scale=2.0, mean=0.5)
    param_dtype = torch.float32 if fp32_params else dtype  # torch's mixed rule: all params fp32 or all as the input
    w, b = params(c, param_dtype, affine)
    rm, rv = running(c, param_dtype)
    rm_t, rv_t = rm.clone(), rv.clone()
    ref64 = batch_norm_reference(
        x_ncl.double(), rm.double().clone(), rv.double().clone(),
        None if w is None else w.double(), None if b is None else b.double(), training,
    )
    y = normlab.batch_norm(to_layout(x_ncl, layout), rm, rv, w, b, training, 0.1, 1e-5, layout=layout)
    t = F.batch_norm(x_ncl, rm_t, rv_t, w, b, training, 0.1, 1e-5)
    assert y.dtype == dtype and y.shape == to_layout(x_ncl, layout).shape
    assert_tolerance_rule(from_layout(y, layout), t, ref64, f"batch_norm {layout} train={training}")
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_textbook_and_half_params(dtype):
    x, w, b = rand(8, 6, 5, dtype=dtype), rand(6, seed=1), rand(6, seed=2)
    w, b = w.to(dtype), b.to(dtype)
    eps = 1e-3
    ref64 = textbook(x.double(), w.double(), b.double(), eps)
    y = normlab.batch_norm(x, None, None, w, b, True, eps=eps)
    assert_tolerance_rule(y, textbook(x, w, b, eps), ref64, "textbook")
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref64, rtol=0, atol=1e-13)
    if dtype in (torch.bfloat16, torch.float16):  # fp32 master weights and fp32 running stats
        rm, rv = running(6, torch.float32)
        y32 = normlab.batch_norm(x, rm, rv, w.float(), b.float(), True, eps=eps)
        assert y32.dtype == dtype
        y_torch = F.batch_norm(x, *running(6, torch.float32), w.float(), b.float(), True, eps=eps)
        assert_tolerance_rule(y32, y_torch, ref64, "fp32 params")


def test_large_mean_two_pass():
    """mean 1e4 and 1e5, std 1 in fp32: the corrected two-pass statistics are within 2× torch's error
    (torch's CPU kernel accumulates in double); a plain two-pass is off by ulp(mean) ≈ 1e-3 and the
    one-pass E[x²] - E[x]² formula loses every digit of the variance."""
    for mean in (1e4, 1e5):
        x = rand(64, 3, 16, mean=mean)
        ref64 = textbook(x.double(), None, None, 1e-5)
        y = normlab.batch_norm(x, None, None, training=True)
        assert_tolerance_rule(y, F.batch_norm(x, None, None, training=True), ref64, f"mean {mean}")
        rm, rv = torch.zeros(3), torch.ones(3)
        normlab.batch_norm(x, rm, rv, training=True, momentum=1.0)
        torch.testing.assert_close(rm.double(), x.double().mean(dim=(0, 2)), rtol=1e-7, atol=0)
        torch.testing.assert_close(rv.double(), x.double().transpose(0, 1).reshape(3, -1).var(dim=1), rtol=1e-4, atol=0)
    x = rand(64, 3, 16, mean=1e4)
    ref64 = textbook(x.double(), None, None, 1e-5)
    mean = x.mean(dim=(0, 2), keepdim=True)
    one_pass_var = (x * x).mean(dim=(0, 2), keepdim=True) - mean * mean
    one_pass = (x - mean) / torch.sqrt(one_pass_var.clamp_min(0) + 1e-5)
    assert (one_pass.double() - ref64).abs().max() > 0.1


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_running_stats_five_steps_functional(momentum, layout):
    c = 5
    rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.tensor(0)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(5):
        x = rand(4, c, 6, seed=10 + step, scale=1 + step, mean=step)
        normlab.batch_norm(
            to_layout(x, layout), rm, rv, training=True, momentum=momentum, layout=layout, num_batches_tracked=nbt
        )
        factor = 1.0 / (step + 1) if momentum is None else momentum
        F.batch_norm(x, rm_t, rv_t, training=True, momentum=factor)
        torch.testing.assert_close(rm, rm_t, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rv, rv_t, rtol=1e-6, atol=1e-7)
    assert nbt.item() == 5
    # the unbiased variance goes into running_var: one step from (0, 1) with momentum 1 is x.var()
    x = rand(3, 2, 4, seed=7)
    rm1, rv1 = torch.zeros(2), torch.ones(2)
    normlab.batch_norm(x, rm1, rv1, training=True, momentum=1.0)
    torch.testing.assert_close(rv1, x.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True))
    torch.testing.assert_close(rm1, x.mean(dim=(0, 2)))


def test_eval_uses_running_stats():
    x = rand(5, 3, 4, dtype=torch.float64)
    w, b = rand(3, dtype=torch.float64, seed=1), rand(3, dtype=torch.float64, seed=2)
    rm, rv = running(3, torch.float64)
    y = normlab.batch_norm(x, rm, rv, w, b, False, eps=1e-4)
    expected = (x - rm[:, None]) / torch.sqrt(rv[:, None] + 1e-4) * w[:, None] + b[:, None]
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-14)
    # and eval leaves the running statistics alone
    rm0, rv0 = rm.clone(), rv.clone()
    normlab.batch_norm(x, rm, rv, w, b, False)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_nlc_equals_ncl_on_permuted_input():
    x_nlc = rand(3, 7, 5)
    w, b = rand(5, seed=1), rand(5, seed=2)
    rm1, rv1, rm2, rv2 = torch.zeros(5), torch.ones(5), torch.zeros(5), torch.ones(5)
    y1 = normlab.batch_norm(x_nlc, rm1, rv1, w, b, True, layout="NLC")
    y2 = normlab.batch_norm(x_nlc.permute(0, 2, 1), rm2, rv2, w, b, True, layout="NCL").permute(0, 2, 1)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)


def test_single_value_per_channel_raises_like_torch():
    for shape, layout in [((1, 4), "NCL"), ((1, 4, 1), "NCL"), ((1, 1, 4), "NLC")]:
        x = torch.randn(*shape)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            normlab.batch_norm(x, torch.zeros(4), torch.ones(4), training=True, layout=layout)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(torch.randn(1, 4), torch.zeros(4), torch.ones(4), training=True)
    # one sample with L > 1 is a batch of L values; eval with one sample is fine
    normlab.batch_norm(torch.randn(1, 4, 2), None, None, training=True)
    normlab.batch_norm(torch.randn(1, 4), torch.zeros(4), torch.ones(4), training=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_gradcheck(training, affine, layout):
    x = rand(4, 3, 5, dtype=torch.float64, scale=2.0).requires_grad_()
    w, b = params(3 if layout == "NCL" else 5, torch.float64, affine)
    ins = [x] + [p.requires_grad_() for p in (w, b) if p is not None]
    rm, rv = running(3 if layout == "NCL" else 5, torch.float64)

    def f(x, *p):
        it = iter(p)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return normlab.batch_norm(x, rm.clone(), rv.clone(), ww, bb, training, eps=1e-3, layout=layout)

    assert torch.autograd.gradcheck(f, tuple(ins))
    if affine == "both":
        assert torch.autograd.gradgradcheck(f, tuple(ins))


def test_grads_match_torch():
    x, w, b = rand(6, 4, 3).requires_grad_(), rand(4, seed=1).requires_grad_(), rand(4, seed=2).requires_grad_()
    dy = rand(6, 4, 3, seed=9)
    for training in (True, False):
        rm, rv = running(4, torch.float32)
        g1 = torch.autograd.grad(normlab.batch_norm(x, rm.clone(), rv.clone(), w, b, training), (x, w, b), dy)
        g2 = torch.autograd.grad(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training), (x, w, b), dy)
        for a, t in zip(g1, g2):
            torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)


def test_zero_size():
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(0)
    for shape, layout in [((0, 4), "NCL"), ((0, 4, 3), "NCL"), ((2, 0, 4), "NLC"), ((2, 4, 0), "NCL")]:
        x = torch.randn(*shape, requires_grad=True)
        y = normlab.batch_norm(x, rm, rv, torch.ones(4), torch.zeros(4), True, layout=layout, num_batches_tracked=nbt)
        assert y.shape == x.shape
        y.sum().backward()
        assert normlab.batch_norm(x, rm, rv, layout=layout).shape == x.shape
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)) and nbt.item() == 4


@pytest.mark.parametrize("layout, shape", [("NCL", (0, 4)), ("NCL", (0, 4, 3)), ("NLC", (2, 0, 4))])
def test_empty_batch_keeps_parameter_gradients(layout, shape):
    """An empty batch: empty output, the counter counts it (as torch), and weight and bias get zero
    gradients instead of being cut off from the loss."""
    x = torch.randn(*shape, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    count = torch.zeros((), dtype=torch.long)
    y = normlab.batch_norm(x, None, None, w, b, training=True, layout=layout, num_batches_tracked=count)
    assert y.shape == x.shape and y.requires_grad and int(count) == 1
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(b.grad, torch.zeros(4))


def test_bad_input_messages():
    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"expected weight of shape \[3\]"):
        normlab.batch_norm(x, rm, rv, torch.ones(5))
    with pytest.raises(ValueError, match=r"expected running_mean of shape \[5\]"):
        normlab.batch_norm(x, rm, rv, layout="NLC")
    with pytest.raises(TypeError, match="expected bias of dtype torch.float32"):
        normlab.batch_norm(x, rm, rv, None, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected running_var of dtype torch.float64"):
        normlab.batch_norm(x.double(), rm.double(), rv)
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.batch_norm(torch.ones(4, 3, dtype=torch.int64), rm, rv)
    with pytest.raises(TypeError, match="floating dtype"):
        normlab.batch_norm(torch.ones(4, 3, dtype=torch.complex64), rm, rv)
    for eps in (0.0, -1e-5, float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            normlab.batch_norm(x, rm, rv, eps=eps)
    with pytest.raises(ValueError, match=r"unknown layout 'NHWC'; expected one of \['NCL', 'NLC'\]"):
        normlab.batch_norm(x, rm, rv, layout="NHWC")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C\)"):
        normlab.batch_norm(torch.randn(3), rm, rv)
    with pytest.raises(ValueError, match="expected running_mean and running_var tensors when training=False"):
        normlab.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None"):
        normlab.batch_norm(x, rm, rv, training=True, momentum=1.5)
    with pytest.raises(ValueError, match="momentum=None .* expects a num_batches_tracked tensor"):
        normlab.batch_norm(x, rm, rv, training=True, momentum=None)
    for pair in ((None, rv), (rm, None)):
        with pytest.raises(ValueError, match="must either both be None or neither"):
            normlab.batch_norm(x, *pair, training=True, momentum=None)
    with pytest.raises(ValueError, match="running_mean is a statistics buffer.*must not require grad"):
        normlab.batch_norm(x, rm.clone().requires_grad_(), rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)), "a failed call changed the running stats"


# ----------------------------------------------------------------------------------------------
# Synchronized statistics: 2 processes on gloo equal one process on the concatenated batch
# ----------------------------------------------------------------------------------------------
def _sync_data():
    x = rand(7, 3, 5, seed=21, scale=3.0, mean=2.0)  # uneven split: rank 0 gets 4 samples, rank 1 gets 3
    w, b, dy = rand(3, seed=22), rand(3, seed=23), rand(7, 3, 5, seed=24)
    return x, w, b, dy, [slice(0, 4), slice(4, 7)]


def _sync_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from normlab.nn import BatchNorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, w, b, dy, parts = _sync_data()
        xs = x[parts[rank]].clone().requires_grad_()
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        m = BatchNorm(3, momentum=None, process_group=dist.group.WORLD)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        y = m(xs)
        y.backward(dy[parts[rank]])
        rm, rv = torch.zeros(3), torch.ones(3)
        yf = normlab.batch_norm(xs.detach(), rm, rv, w, b, True, momentum=0.1, process_group=dist.group.WORLD)
        torch.save(
            {"y": y.detach(), "dx": xs.grad, "dw": m.weight.grad, "db": m.bias.grad, "rm": m.running_mean,
             "rv": m.running_var, "nbt": m.num_batches_tracked, "yf": yf.detach(), "rm_f": rm, "rv_f": rv},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_two_processes_gloo(tmp_path):
    # fork, not spawn: the children inherit the imported torch (spawn re-imports it: ~10 s more on 2 cores)
    torch.multiprocessing.start_processes(
        _sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    x, w, b, dy, parts = _sync_data()
    x, w, b = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = torch.zeros(3), torch.ones(3)
    y = normlab.batch_norm(x, rm, rv, w, b, True, momentum=1.0)  # momentum None, first step: factor 1
    y.backward(dy)
    # the margins of these bounds: docs/benchmarks.md, "Test margins"
    for i in range(2):
        torch.testing.assert_close(r[i]["y"], y.detach()[parts[i]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[i]["yf"], y.detach()[parts[i]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[i]["dx"], x.grad[parts[i]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[i]["rm"], rm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r[i]["rv"], rv, rtol=1e-6, atol=1e-6)  # unbiased over all 35 values per channel
        torch.testing.assert_close(r[i]["rm_f"], 0.1 * rm)
        torch.testing.assert_close(r[i]["rv_f"], 0.9 + 0.1 * rv)
        assert r[i]["nbt"].item() == 1
    # parameter gradients stay local (a data-parallel wrapper sums/averages them): they add up to the full ones
    torch.testing.assert_close(r[0]["dw"] + r[1]["dw"], w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r[0]["db"] + r[1]["db"], b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, x.detach().transpose(0, 1).reshape(3, -1).var(dim=1))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 5),
    c=st.integers(1, 9),
    length=st.one_of(st.integers(1, 40), st.sampled_from([1700, 2000])),  # up to 10⁴ values per channel
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    mean=st.sampled_from([0.0, 10.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(["NCL", "NLC"]),
    strided=st.booleans(),
)
def test_property_shapes_values_strides(n, c, length, scale, mean, dtype, layout, strided):
    base = rand(n, c, 2 * length if strided else length, scale=scale, mean=mean, dtype=torch.float64)
    x_ncl = (base[:, :, ::2] if strided else base).to(dtype)
    if not torch.isfinite(x_ncl).all():
        return
    x = x_ncl if layout == "NCL" else x_ncl.transpose(1, 2)  # non-contiguous (N, L, C) view
    w, b = rand(c, dtype=dtype, seed=1), rand(c, dtype=dtype, seed=2)
    y = normlab.batch_norm(x, None, None, w, b, training=True, layout=layout)
    ref64 = batch_norm_reference(x_ncl.double(), None, None, w.double(), b.double(), True)
    assert_tolerance_rule(from_layout(y, layout), F.batch_norm(x_ncl, None, None, w, b, True), ref64, "property")


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    """torch.library's own check of the custom op: schema, fake impl vs real outputs, autograd registration."""
    x = rand(4, 3, 5).requires_grad_()
    w, b = rand(3, seed=1).requires_grad_(), rand(3, seed=2).requires_grad_()
    rm, rv = running(3, torch.float32)
    stats = (None, None) if training else (rm, rv)
    torch.library.opcheck(torch.ops.normlab.batch_norm, (x, w, b, *stats, training, 1e-5))
    xh = rand(6, 3, 1, dtype=torch.bfloat16).requires_grad_()  # bf16 input, fp32 master weights
    torch.library.opcheck(torch.ops.normlab.batch_norm, (xh, w, None, *stats, training, 1e-5))


def test_functional_torch_compile_fullgraph():
    """The functional op traces without a graph break, running-statistics update included."""
    torch._dynamo.reset()
    x = rand(4, 3, 5, mean=1.0).requires_grad_()
    w, b = rand(3, seed=1).requires_grad_(), rand(3, seed=2).requires_grad_()

    def f(x, w, b, rm, rv, nbt):
        y = normlab.batch_norm(x, rm, rv, w, b, True, None, 1e-5, num_batches_tracked=nbt)
        z = normlab.batch_norm(y.transpose(1, 2), rm, rv, None, None, False, layout="NLC")
        return z.square().mean()

    state_e, state_c = [(torch.zeros(3), torch.ones(3), torch.tensor(0)) for _ in range(2)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        le, lc = f(x, w, b, *state_e), compiled(x, w, b, *state_c)
        torch.testing.assert_close(lc, le)
        for a, e in zip(torch.autograd.grad(lc, (x, w, b)), torch.autograd.grad(le, (x, w, b))):
            torch.testing.assert_close(a, e)
    for a, e in zip(state_c, state_e):
        torch.testing.assert_close(a, e)
    assert state_c[2].item() == 2


def test_non_numeric_momentum_names_the_expected_value():
    with pytest.raises(TypeError, match=r"momentum must be None or a number in \[0, 1\], got 'fast'"):
        normlab.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum="fast")
