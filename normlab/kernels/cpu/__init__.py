"""The ``cpu`` backend: numba kernels for RMSNorm, LayerNorm and their fused residual-add variants.

Serves contiguous CPU inputs in float32, bfloat16 and float16 (bf16 / fp16 as uint16 / int16 bit patterns,
fp32 accumulation, round-to-nearest-even stores); float64 is left to the reference. Weights may be in the
input dtype or fp32. The casting rules of the reference are applied to the (tiny) weight vector here in
torch, so the kernels only see fp32 ``offset + w`` and a casting ``mode`` (and, for large bf16 RMSNorm
calls, the same weights as bf16 bit patterns: :data:`HALF_WEIGHT_ROW`).

Kernel contract: see ``normlab.dispatch`` and the op files; every function takes ``(rows, n)`` tensors.
"""

from __future__ import annotations

import contextlib
import glob
from pathlib import Path
from typing import Optional

import numpy as np
import numba
import torch

from normlab import dispatch
from normlab.kernels.cpu._kernels import CHUNK, MODE_FP32, MODE_LLAMA, MODE_NONE, norm_bwd, norm_fwd
from normlab.kernels.cpu._numerics import HARDWARE_BF16

__all__ = [
    "CHUNK",
    "add_layer_norm_fwd",
    "add_rms_norm_fwd",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "supports",
]

#: How each dtype reaches numba: fp32 as is, bf16 / fp16 as uint16 / int16 bit patterns.
KINDS = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.int16}
_STAT = torch.float32


def _np(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view: fp32 as is, bf16 / fp16 as uint16 / int16 bit patterns."""
    t = t.detach()
    if t.dtype == torch.float32:
        return t.numpy()
    return t.view(torch.int16).numpy().view(KINDS[t.dtype])


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).contiguous()


def _vec(p: torch.Tensor | None, n: int, fill: float) -> np.ndarray:
    if p is None:
        return np.full(n, fill, np.float32)
    p = p.detach()
    if p.dtype != torch.float32 or not p.is_contiguous():
        p = p.to(torch.float32).contiguous()
    return p.numpy()


def _output(like: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=dtype)
    if out.shape != like.shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"{name} must be a contiguous CPU tensor of shape {list(like.shape)} and dtype {dtype}, "
            f"got {list(out.shape)}, {out.dtype}, contiguous={out.is_contiguous()}, {out.device}"
        )
    return out


def _rms_weight(weight: torch.Tensor | None, offset: float, casting: str, in_dtype: torch.dtype, n: int):
    """``offset + w`` exactly as the reference forms it, as fp32 values, the kernel's mode, and (bf16
    input, when those values are bf16 ones) the same values as a bf16 tensor, else None.

    llama: ``w.to(in) + offset`` in the input dtype; none: ``(w + offset).to(in)``; gemma (and any fp32
    input, where the modes coincide): ``w.float() + offset`` in fp32."""
    if in_dtype == torch.float32 or casting == "gemma":
        mode = MODE_FP32
        w = weight if weight is None or not offset else weight.float() + offset
    elif casting == "llama":
        mode = MODE_LLAMA
        w = None if weight is None else weight.to(in_dtype) + offset
    else:
        mode = MODE_NONE
        w = None if weight is None else (weight + offset).to(in_dtype)
    exact = w is not None and in_dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    return _vec(w, n, 1.0), mode, w if exact else None


#: Below this many elements a call runs on one thread: waking the other threads costs more than the
#: work (tens of µs idle, milliseconds when another process keeps a core busy). Results do not change:
#: every row and every chunk partial is computed the same way whatever the thread count.
SERIAL_BELOW = 1 << 18


def _caches() -> list[tuple[int, str, int]]:
    """``(level, type, bytes)`` of each cache of CPU 0 from sysfs (Linux; empty elsewhere)."""
    caches = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(index, "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            level = int(Path(index, "level").read_text())
            caches.append((level, Path(index, "type").read_text().strip(), int(text.rstrip("KM")) * scale))
    return caches


def _last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest cache of CPU 0, else ``default``."""
    return max((size for _, _, size in _caches()), default=default)


def _l1_data_bytes(default: int = 32 << 10) -> int:
    """The level-1 data cache of CPU 0, else ``default``."""
    return min((size for level, kind, size in _caches() if level == 1 and kind != "Instruction"), default=default)


#: fp32 calls that move more bytes than this (twice the last-level cache) write their outputs with
#: non-temporal stores: the data cannot stay cached anyway, and ordinary stores would first read every
#: output line. Below it, part of the data stays in cache from call to call (measured: streaming a
#: 4096×768 fused add + LayerNorm, 50 MB moved, took 2.4 ms instead of 1.8). 16-bit outputs never
#: stream: their rows are compute-bound here, and the staging buffer costs more than the saved reads.
#: The values written are the same either way.
_LLC = _last_level_cache_bytes()
STREAM_ABOVE = 2 * _LLC


def _moved(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _streams(out: torch.Tensor, *others: torch.Tensor) -> bool:
    return out.dtype == torch.float32 and _moved(out, *others) > STREAM_ABOVE


#: bf16 RMSNorm rows read bf16 weights (the same values, half the bytes) in their elementwise pass when
#: that pass's rows and fp32 weights fill the L1 data cache (``n · (bytes per column of the rows + 4) ≥
#: L1``: 8 KB in + 8 KB out + 16 KB of weights at n = 4096) and the call moves at least the last-level
#: cache (its rows come from memory). Time against fp32 weights, paired in one process (docs/benchmarks.md):
#: 8192×4096 0.72–0.89×, 2048×4096 0.80–0.89×, 2048×8192 0.84–1.02×, fused add 0.93–1.01×; with the
#: data in cache the extra widening costs 8–19 % (1024×4096 1.13×, 4096×2048 1.19×), so not there.
HALF_WEIGHT_ROW = _l1_data_bytes()
HALF_WEIGHT_MOVED = _LLC


def _half_weight(w_bf16: torch.Tensor | None, rows: list[torch.Tensor]) -> np.ndarray | None:
    """The bit patterns of ``w_bf16`` when the call qualifies (above), else None. ``rows``: the
    ``(rows, n)`` tensors the call reads or writes."""
    if w_bf16 is None or not HARDWARE_BF16 or any(t.dtype != torch.bfloat16 for t in rows):
        return None
    fills_l1 = rows[0].shape[1] * (sum(t.element_size() for t in rows) + 4) >= HALF_WEIGHT_ROW
    return _np(w_bf16.contiguous()) if fills_l1 and _moved(*rows) >= HALF_WEIGHT_MOVED else None


def _thread_controls():
    """numba's get/set of the thread count and of the parallel chunk size. The C entry points when this
    numba exposes them (≈ 0.5 µs a call; the public Python wrappers cost several µs, which is the whole
    kernel time of a small call), else the public functions."""
    numba.get_num_threads()  # starts the threading layer, which loads the C entry points
    try:
        from numba.np.ufunc.parallel import (
            _get_num_threads, _get_parallel_chunksize, _set_num_threads, _set_parallel_chunksize,
        )
        return _get_num_threads, _set_num_threads, _get_parallel_chunksize, _set_parallel_chunksize
    except ImportError:  # pragma: no cover - other numba versions
        return numba.get_num_threads, numba.set_num_threads, numba.get_parallel_chunksize, numba.set_parallel_chunksize


_get_threads, _set_threads, _get_chunksize, _set_chunksize = _thread_controls()


def _launch(kernel, elements: int, *args) -> None:
    """Run a parallel kernel with its chunks of rows handed out one at a time (a busy core cannot hold
    back the other), on one thread below :data:`SERIAL_BELOW` elements."""
    threads, chunksize = _get_threads(), _get_chunksize()
    if elements < SERIAL_BELOW:
        _set_threads(1)
    _set_chunksize(1)
    try:
        kernel(*args)
    finally:
        _set_chunksize(chunksize)
        _set_threads(threads)


_NO_MEAN = np.empty(0, np.float32)  # RMSNorm has no mean: the kernel never touches it


def _fwd(x, residual, residual_dtype, weight_f32, bias_f32, eps, k, layer, mode, out, residual_out, weight_bf16=None):
    rows_, n = x.shape
    x = x.detach().contiguous()
    y = _output(x, x.dtype, out, "out")
    mean = torch.empty(rows_, dtype=_STAT) if layer else None
    rstd = torch.empty(rows_, dtype=_STAT)
    xn = _np(x)
    if residual is None:
        s, rn, sn, rows = x, xn, xn, [y, x]
    else:
        r = residual.detach().contiguous()
        s = _output(x, residual_dtype, residual_out, "residual_out")
        rn, sn, rows = _np(r), _np(s), [y, x, r, s]
    _launch(
        norm_fwd, x.numel(), xn, rn, sn, residual is not None, _np(y), weight_f32, bias_f32, float(eps), int(k),
        layer, mode, _NO_MEAN if mean is None else mean.numpy(), rstd.numpy(), _streams(*rows),
        _half_weight(weight_bf16, rows),
    )
    return y, s, mean, rstd


def _norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, k: int,
    layer: bool, dsum: Optional[torch.Tensor], want_dw: bool, want_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel on ``(rows, n)`` rows (a custom op for ``torch.compile``: ``_norm_bwd_op``).
    ``weight`` is fp32 ``offset + w``; gradients not wanted come back empty."""
    rows_, n = x.shape
    x = x.contiguous()
    dy = _rows(dy, x.dtype)
    dsum_t = x if dsum is None else _rows(dsum, x.dtype)
    dx = torch.empty_like(x)
    # one partial slot per thread (as torch's per-thread buffers); the kernel folds them in chunk order
    workers = 1 if x.numel() < SERIAL_BELOW else max(1, min(_get_threads(), (rows_ + CHUNK - 1) // CHUNK))
    slot_w = torch.empty(workers, n, dtype=torch.float32)  # accumulated whether wanted or not
    slot_b = torch.empty(workers, n if layer else 0, dtype=torch.float32)
    dw = torch.zeros(n if want_dw else 0, dtype=torch.float32)
    db = torch.zeros(n if want_db else 0, dtype=torch.float32)
    _launch(  # each chunk's partial is the same whichever thread computes it
        norm_bwd, x.numel(), _np(dy), _np(x), weight.contiguous().numpy(), mean.contiguous().numpy(),
        rstd.to(_STAT).contiguous().numpy(), k, layer, _np(dsum_t), dsum is not None, _np(dx),
        slot_w.numpy(), slot_b.numpy(), want_dw, want_db, dw.numpy(), db.numpy(),
        dsum is None and _streams(dx, dy, x),  # with the fused add's gradient, measured slower streamed
    )
    return dx, dw, db


_norm_bwd_op = torch.library.custom_op("normlab::cpu_norm_bwd", _norm_bwd, mutates_args=())


def _backward(*args):
    """The backward kernel: through its custom op while ``torch.compile`` traces, directly in eager mode
    (the custom-op dispatcher costs tens of µs per call)."""
    return _norm_bwd_op(*args) if torch.compiler.is_compiling() else _norm_bwd(*args)


@_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, k, layer, dsum, want_dw, want_db):
    n = x.shape[1]
    return torch.empty_like(x), x.new_empty(n if want_dw else 0, dtype=torch.float32), x.new_empty(n if want_db else 0, dtype=torch.float32)


def _wvec(p: torch.Tensor | None, n: int, x: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """fp32 ``offset + w`` (ones without a weight) as a tensor (traceable; an fp32 weight without offset
    as it is, no copy)."""
    if p is None:
        return x.new_ones(n, dtype=torch.float32)
    w = p.detach().to(torch.float32)
    return w + offset if offset else w


# ---- the kernel contract -----------------------------------------------------------------------
def rms_norm_fwd(x, weight, eps, casting, offset, k, out=None):
    """``(y, rstd)``: RMSNorm of the ``(rows, n)`` input with the reference's casting rules."""
    w, mode, w_bf16 = _rms_weight(weight, float(offset), casting, x.dtype, x.shape[1])
    y, _, _, rstd = _fwd(x, None, None, w, w, eps, k, False, mode, out, None, w_bf16)
    return y, rstd


def rms_norm_bwd(dy, x, weight, rstd, offset, k, dsum=None):
    """``(dx, dw | None)`` from the saved ``rstd``; ``dsum`` (the fused add's gradient) is added to dx."""
    w = _wvec(weight, x.shape[1], x, float(offset))
    dx, dw, _ = _backward(dy, x, w, rstd.new_empty(0), rstd, int(k), False, dsum, weight is not None, False)
    return dx, None if weight is None else dw.to(weight.dtype)


def add_rms_norm_fwd(x, residual, weight, eps, casting, offset, k, residual_dtype, out=None, residual_out=None):
    """``(y, s, rstd)`` with ``s = x + residual`` (fp32 add, stored in ``residual_dtype``) and
    ``y = rms_norm(s)`` in ``x``'s dtype."""
    w, mode, w_bf16 = _rms_weight(weight, float(offset), casting, residual_dtype, x.shape[1])
    y, s, _, rstd = _fwd(x, residual, residual_dtype, w, w, eps, k, False, mode, out, residual_out, w_bf16)
    return y, s, rstd


def layer_norm_fwd(x, weight, bias, eps, out=None):
    """``(y, mean, rstd)``: LayerNorm (biased two-pass variance) of the ``(rows, n)`` input."""
    n = x.shape[1]
    y, _, mean, rstd = _fwd(x, None, None, _vec(weight, n, 1.0), _vec(bias, n, 0.0), eps, n, True, MODE_FP32, out, None)
    return y, mean, rstd


def layer_norm_bwd(dy, x, weight, bias, mean, rstd, dsum=None):
    """``(dx, dw | None, db | None)`` from the saved ``mean``/``rstd``."""
    n = x.shape[1]
    dx, dw, db = _backward(dy, x, _wvec(weight, n, x), mean, rstd, n, True, dsum, weight is not None, bias is not None)
    return dx, None if weight is None else dw.to(weight.dtype), None if bias is None else db.to(bias.dtype)


def add_layer_norm_fwd(x, residual, weight, bias, eps, residual_dtype, out=None, residual_out=None):
    """``(y, s, mean, rstd)`` with ``s = x + residual`` in ``residual_dtype`` and ``y = layer_norm(s)``."""
    n = x.shape[1]
    return _fwd(x, residual, residual_dtype, _vec(weight, n, 1.0), _vec(bias, n, 0.0), eps, n, True, MODE_FP32, out, residual_out)


# ---- what this backend serves --------------------------------------------------------------------
def _ok(t: torch.Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype in KINDS)


def supports(op: str, x: torch.Tensor, *, residual=None, weight=None, bias=None, residual_dtype=None, **_) -> bool:
    """CPU tensors in fp32/bf16/fp16 (weights in any of them too); fp64 anywhere → reference.
    Never looks at the number of rows."""
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] == 0:
        return False
    return all(_ok(t) for t in (x, residual, weight, bias)) and (residual_dtype is None or residual_dtype in KINDS)


for _name, _fn in [
    ("rms_norm_fwd", rms_norm_fwd),
    ("rms_norm_bwd", rms_norm_bwd),
    ("add_rms_norm_fwd", add_rms_norm_fwd),
    ("layer_norm_fwd", layer_norm_fwd),
    ("layer_norm_bwd", layer_norm_bwd),
    ("add_layer_norm_fwd", add_layer_norm_fwd),
]:
    dispatch.register("cpu", _name, _fn, supports=supports)
