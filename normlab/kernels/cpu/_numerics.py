"""Scalar and row helpers for the numba kernels: bf16/fp16 bit patterns, row loads/stores, reductions.

Half-precision tensors reach numba as their ``uint16`` bit patterns (numba has no float16/bfloat16 arrays);
``kind`` says which: 0 = float32 (a real fp32 array), 1 = bfloat16, 2 = float16.

- bf16 → fp32: the 16 bits shifted left by 16 (exact).
- fp32 → bf16: round to nearest, ties to even (``(u + 0x7fff + lsb) >> 16``); NaN stays a quiet NaN,
  values past the largest bf16 round to ±inf.
- fp16 ↔ fp32: exact decode (subnormals, inf, NaN); encode rounds to nearest even, overflow → ±inf,
  fp16 subnormals rounded by one fp32 addition of a magic constant (the hardware rounds to even).

Row reductions (`row_sum`, `row_sumsq`, …) may re-associate (``fastmath={"reassoc"}``) so LLVM
vectorizes them: their order is a function of the loop and the row length only — never of the batch or
of the thread count — so results stay batch invariant and deterministic.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

FP32, BF16, FP16 = 0, 1, 2
_REASSOC = {"reassoc"}
_ZERO = np.float32(0.0)

_U = np.uint64
_SIGN32, _ABS32, _INF32 = _U(0x80000000), _U(0x7FFFFFFF), _U(0x7F800000)
_SH13, _SH16, _SH23 = _U(13), _U(16), _U(23)
_ONE, _BF16_ROUND, _BF16_QUIET = _U(1), _U(0x7FFF), _U(0x40)
_F16_ABS, _F16_SIGN, _F16_EXP_SHIFTED = _U(0x7FFF), _U(0x8000), _U(0x0F800000)
_F16_REBIAS = _U((127 - 15) << 23)
_F16_MAX_AS_F32 = _U((127 + 16) << 23)  # 65536.0: at or above it the result is inf
_F16_MIN_NORMAL_AS_F32 = _U(113 << 23)  # 2**-14
_F16_DENORM_MAGIC = _U(((127 - 15) + (23 - 10) + 1) << 23)  # 0.5
_F16_NORMAL_BIAS = _U(((15 - 127) << 23) % 2**32 + 0xFFF)
_F16_INF, _F16_NAN = _U(0x7C00), _U(0x7E00)
_MASK32 = _U(0xFFFFFFFF)
_F16_SUBNORMAL_SCALE = np.float32(2.0**-14)


@intrinsic
def _f32_bits(typingctx, value):
    """The IEEE bits of a float32 as uint32 (a bitcast)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, value):
    """The float32 whose IEEE bits are the uint32 ``value`` (a bitcast)."""
    if value != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(cache=True)
def bf16_to_f32(h):
    return _bits_f32(np.uint32(_U(h) << _SH16))


@njit(cache=True)
def f32_to_bf16(f):
    u = _U(_f32_bits(f))
    if (u & _ABS32) > _INF32:  # NaN: keep sign and payload top bits, force quiet
        return np.uint16((u >> _SH16) | _BF16_QUIET)
    return np.uint16(((u + _BF16_ROUND + ((u >> _SH16) & _ONE)) & _MASK32) >> _SH16)


@njit(cache=True)
def f16_to_f32(h):
    h = _U(h)
    o = (h & _F16_ABS) << _SH13
    e = o & _F16_EXP_SHIFTED
    o += _F16_REBIAS
    if e == _F16_EXP_SHIFTED:  # inf / NaN
        o += _F16_REBIAS
    elif e == _U(0):  # zero / subnormal: renormalize with one exact float subtraction
        o += _ONE << _SH23
        o = _U(_f32_bits(_bits_f32(np.uint32(o)) - _F16_SUBNORMAL_SCALE))
    o |= (h & _F16_SIGN) << _SH16
    return _bits_f32(np.uint32(o))


@njit(cache=True)
def f32_to_f16(f):
    u = _U(_f32_bits(f))
    sign = u & _SIGN32
    u ^= sign
    if u >= _F16_MAX_AS_F32:
        o = _F16_NAN if u > _INF32 else _F16_INF
    elif u < _F16_MIN_NORMAL_AS_F32:  # fp16 subnormal or zero: let the fp32 adder round to even
        o = _U(_f32_bits(_bits_f32(np.uint32(u)) + _bits_f32(np.uint32(_F16_DENORM_MAGIC)))) - _F16_DENORM_MAGIC
    else:
        odd = (u >> _SH13) & _ONE
        o = ((u + _F16_NORMAL_BIAS + odd) & _MASK32) >> _SH13
    return np.uint16(o | (sign >> _SH16))


@njit(cache=True)
def decode(src, dst, kind):
    """fp32 values of the uint16 row ``src`` into ``dst``."""
    if kind == BF16:
        for j in range(src.shape[0]):
            dst[j] = bf16_to_f32(src[j])
    else:
        for j in range(src.shape[0]):
            dst[j] = f16_to_f32(src[j])


@njit(cache=True)
def encode(src, dst, kind):
    """The fp32 row ``src`` rounded (nearest even) into the uint16 row ``dst``."""
    if kind == BF16:
        for j in range(src.shape[0]):
            dst[j] = f32_to_bf16(src[j])
    else:
        for j in range(src.shape[0]):
            dst[j] = f32_to_f16(src[j])


@njit(cache=True)
def round_scalar(v, kind):
    """``v`` rounded to the dtype ``kind`` and back to fp32."""
    if kind == BF16:
        return bf16_to_f32(f32_to_bf16(v))
    if kind == FP16:
        return f16_to_f32(f32_to_f16(v))
    return v


@njit(cache=True)
def round_row(buf, kind):
    """Round an fp32 row in place to the dtype ``kind`` (no-op for fp32)."""
    if kind == BF16:
        for j in range(buf.shape[0]):
            buf[j] = bf16_to_f32(f32_to_bf16(buf[j]))
    elif kind == FP16:
        for j in range(buf.shape[0]):
            buf[j] = f16_to_f32(f32_to_f16(buf[j]))


# ---- row access, specialised on the array type (fp32 rows are used in place, no copy) ----------
def load_row(a, i, kind, buf):
    """Row ``i`` of ``a`` as fp32: the row itself for fp32, else decoded into ``buf``."""


def out_row(a, i, buf):
    """Where to compute row ``i`` of the output ``a`` in fp32: the row itself for fp32, else ``buf``."""


def store_row(a, i, buf, kind):
    """Write the fp32 row ``buf`` to row ``i`` of ``a`` (rounding to half; no-op for fp32)."""


def _is_f32(a):
    return isinstance(a, types.Array) and a.dtype == types.float32


@overload(load_row, jit_options={"cache": True})
def _load_row(a, i, kind, buf):
    if _is_f32(a):
        return lambda a, i, kind, buf: a[i]

    def impl(a, i, kind, buf):
        decode(a[i], buf, kind)
        return buf

    return impl


@overload(out_row, jit_options={"cache": True})
def _out_row(a, i, buf):
    if _is_f32(a):
        return lambda a, i, buf: a[i]
    return lambda a, i, buf: buf


@overload(store_row, jit_options={"cache": True})
def _store_row(a, i, buf, kind):
    if _is_f32(a):
        return lambda a, i, buf, kind: None

    def impl(a, i, buf, kind):
        encode(buf, a[i], kind)

    return impl


# ---- reductions over one row (fp32 accumulation, vectorized) ---------------------------------
@njit(cache=True, fastmath=_REASSOC)
def row_sum(a):
    s = _ZERO
    for j in range(a.shape[0]):
        s += a[j]
    return s


@njit(cache=True, fastmath=_REASSOC)
def row_sumsq(a, k):
    """Σ_{j<k} a_j²."""
    s = _ZERO
    for j in range(k):
        s += a[j] * a[j]
    return s


@njit(cache=True, fastmath=_REASSOC)
def row_sqdev(a, m):
    """Σ_j (a_j − m)²."""
    s = _ZERO
    for j in range(a.shape[0]):
        d = a[j] - m
        s += d * d
    return s


@njit(cache=True, fastmath=_REASSOC)
def row_grad_sums(dy, w, x, m, rstd):
    """``(Σ_j g_j, Σ_j g_j·x̂_j)`` with ``g = dy·w`` and ``x̂ = (x − m)·rstd``."""
    sg = _ZERO
    sgx = _ZERO
    for j in range(x.shape[0]):
        g = dy[j] * w[j]
        sg += g
        sgx += g * ((x[j] - m) * rstd)
    return sg, sgx
