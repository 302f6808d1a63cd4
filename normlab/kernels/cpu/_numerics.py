"""Scalar and row helpers for the numba kernels: bf16/fp16 bit patterns, row loads/stores, reductions.

Half-precision tensors reach numba as bit patterns (numba has no float16/bfloat16 arrays): bf16 as
``uint16``, fp16 as ``int16`` arrays, so the array type alone selects the conversion at compile time.

- bf16 → fp32: the 16 bits shifted left by 16 (exact).
- fp32 → bf16: round to nearest, ties to even (``(u + 0x7fff + lsb) >> 16``); NaN stays a quiet NaN,
  values past the largest bf16 round to ±inf.
- fp16 ↔ fp32: exact decode (subnormals, inf, NaN); encode rounds to nearest even, overflow → ±inf,
  fp16 subnormals rounded by one fp32 addition of a magic constant (the hardware rounds to even).
- bf16 → bf16 rows on AVX512-BF16 CPUs: 16-lane blocks rounded by ``vcvtneps2bf16`` (last section),
  with the exact rounding wherever a NaN or a subnormal occurs; bitwise the same values.

Row reductions (``row_sum``, ``row_sumsq``, …) may re-associate (``fastmath={"reassoc"}``) so LLVM
vectorizes them: their order is a function of the loop and the row length only — never of the batch or
of the thread count — so results stay batch invariant and deterministic.
"""

from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

FP32, BF16, FP16 = 0, 1, 2
_REASSOC = {"reassoc"}
_ZERO = np.float32(0.0)

_U = np.uint64
_SIGN32, _ABS32, _INF32 = _U(0x80000000), _U(0x7FFFFFFF), _U(0x7F800000)
_SH13, _SH16, _SH23 = _U(13), _U(16), _U(23)
_ONE = _U(1)
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


_I32 = ir.IntType(32)


def _i32(v):
    return ir.Constant(_I32, v)


def _rne_upper_half(builder, u):
    """IR: the upper 16 bits of the fp32 bits ``u`` (i32) rounded to nearest even:
    ``(u + 0x7fff + lsb) >> 16``; a finite value past the largest bf16 rounds to ±inf (NaN: see callers)."""
    lsb = builder.and_(builder.lshr(u, _i32(16)), _i32(1))
    return builder.lshr(builder.add(builder.add(u, _i32(0x7FFF)), lsb), _i32(16))


def _bf16_bits_ir(builder, f):
    """IR: the bf16 bits of the fp32 ``f`` as i32 (nearest even; NaN kept, made quiet)."""
    u = builder.bitcast(f, _I32)
    quiet_nan = builder.or_(builder.lshr(u, _i32(16)), _i32(0x40))
    return builder.select(builder.fcmp_unordered("uno", f, f), quiet_nan, _rne_upper_half(builder, u))


# bf16 conversions are written as LLVM IR on 32-bit integers (numba's integer promotion would widen
# them to 64 bits and halve the vector width): every loop over a row stays one vectorized pass.
@intrinsic
def _bf16_to_f32(typingctx, h):
    """The fp32 value of the bf16 bit pattern ``h`` (uint16): the bits shifted left by 16 (exact)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(builder.zext(args[0], _I32), _i32(16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_bf16(typingctx, f):
    """The bf16 bit pattern (uint16) of the fp32 ``f``: ``(u + 0x7fff + lsb) >> 16``, ties to even,
    overflow to ±inf; a NaN stays a NaN (sign and top payload bits kept, made quiet)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.trunc(_bf16_bits_ir(builder, args[0]), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _round_bf16(typingctx, f):
    """``f`` rounded to bf16 (nearest even) and back to fp32; NaN stays NaN."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        f = args[0]
        rounded = builder.shl(_rne_upper_half(builder, builder.bitcast(f, _I32)), _i32(16))
        return builder.select(builder.fcmp_unordered("uno", f, f), f, builder.bitcast(rounded, ir.FloatType()))

    return types.float32(types.float32), codegen


@njit(cache=True)
def bf16_to_f32(h):
    return _bf16_to_f32(h)


@njit(cache=True)
def f32_to_bf16(f):
    return _f32_to_bf16(f)


@njit(cache=True)
def round_bf16(f):
    return _round_bf16(f)


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
    """fp32 values of the uint16 bit patterns ``src`` (``kind`` BF16 or FP16) into ``dst`` (for tests)."""
    for j in range(src.shape[0]):
        dst[j] = bf16_to_f32(src[j]) if kind == BF16 else f16_to_f32(src[j])


@njit(cache=True)
def encode(src, dst, kind):
    """The fp32 values ``src`` rounded (nearest even) into uint16 bit patterns ``dst`` (for tests)."""
    for j in range(src.shape[0]):
        dst[j] = f32_to_bf16(src[j]) if kind == BF16 else f32_to_f16(src[j])


# ---- dtype-generic element access, resolved at compile time from the array type -----------------
# The kernels see fp32 as float32 arrays, bf16 as uint16 and fp16 as int16 bit patterns: the array type
# alone says how to read and write, so every loop is one fused pass with no runtime dtype branch.
def _dtype_of(t):
    return t.dtype if isinstance(t, types.Array) else t


def load(v):
    """An element as fp32."""


def store(v, like):
    """The fp32 value ``v`` as an element of the array ``like`` (rounded to nearest even)."""


def rnd(v, like):
    """``v`` rounded to the dtype of the array ``like`` and back to fp32."""


def store_via(v, via, like):
    """``v`` rounded to ``via``'s dtype, then stored as an element of ``like`` (one rounding if they agree)."""


@overload(load, jit_options={"cache": True})
def _load(v):
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:
        return lambda v: bf16_to_f32(v)
    if v == types.int16:
        return lambda v: f16_to_f32(np.uint16(v))
    return None


@overload(store, jit_options={"cache": True})
def _store(v, like):
    dt = _dtype_of(like)
    if dt == types.float32:
        return lambda v, like: v
    if dt == types.uint16:
        return lambda v, like: f32_to_bf16(v)
    if dt == types.int16:
        return lambda v, like: np.int16(f32_to_f16(v))
    return None


@overload(rnd, jit_options={"cache": True})
def _rnd(v, like):
    dt = _dtype_of(like)
    if dt == types.float32:
        return lambda v, like: v
    if dt == types.uint16:
        return lambda v, like: round_bf16(v)
    if dt == types.int16:
        return lambda v, like: f16_to_f32(f32_to_f16(v))
    return None


@overload(store_via, jit_options={"cache": True})
def _store_via(v, via, like):
    if _dtype_of(via) == _dtype_of(like) or _dtype_of(via) == types.float32:
        return lambda v, via, like: store(v, like)
    return lambda v, via, like: store(rnd(v, via), like)


# ---- reductions over row i (fp32 accumulation, vectorized) ----------------------------------------
# A row's sums go block by block: the values of a block of ``SUM_BLOCK`` are summed vectorized (each
# of LLVM's 64 accumulator lanes adds SUM_BLOCK/64 of them), the block sums of a group of
# ``SUM_GROUP`` blocks one after another, then the group sums. One running sum over the row would add
# n/64 values per lane: when the terms share their sign (every sum of squares; a row far from zero)
# the rounding errors pile up, ≈ n/64 half-ulps — 4e-6 relative at n = 8193, above torch's own
# cascade sums. Blocked, the worst case is ≈ SUM_BLOCK/64 + 6 + SUM_GROUP + n/(SUM_BLOCK·SUM_GROUP).
SUM_BLOCK, SUM_GROUP = 1024, 16


@njit(cache=True, inline="always")
def _block(b, n):
    """Columns ``[lo, hi)`` of block ``b`` of a row of ``n``, unsigned (numba then emits no negative-index
    wraparound, and the loops vectorize)."""
    lo = b * SUM_BLOCK
    return _U(lo), _U(min(n, lo + SUM_BLOCK))


@njit(cache=True, inline="always")
def _fold(total, group, s, b, n):
    """``(total, group)`` after block ``b``'s sum ``s``: into its group's sum, which goes into the total
    when the group (or the row) ends."""
    group += s
    if (b + 1) % SUM_GROUP == 0 or (b + 1) * SUM_BLOCK >= n:
        return total + group, _ZERO
    return total, group


@njit(cache=True, fastmath=_REASSOC)
def row_sum(a, i):
    total = group = _ZERO
    for b in range((a.shape[1] + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block(b, a.shape[1])
        s = _ZERO
        for j in range(lo, hi):
            s += load(a[i, j])
        total, group = _fold(total, group, s, b, a.shape[1])
    return total


@njit(cache=True, fastmath=_REASSOC)
def row_sumsq(a, i, k):
    """Σ_{j<k} a_ij²."""
    total = group = _ZERO
    for b in range((k + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block(b, k)
        s = _ZERO
        for j in range(lo, hi):
            v = load(a[i, j])
            s += v * v
        total, group = _fold(total, group, s, b, k)
    return total


@njit(cache=True, fastmath=_REASSOC)
def row_dev_sums(a, i, m):
    """``(Σ_j d_j, Σ_j d_j²)`` with ``d = a_ij − m``: the first is n times the rounding error of the
    mean ``m`` (the two-pass correction c), and ``Σ (d − c)² = Σ d² − n·c²``."""
    n = a.shape[1]
    t1 = g1 = t2 = g2 = _ZERO
    for b in range((n + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block(b, n)
        s = _ZERO
        s2 = _ZERO
        for j in range(lo, hi):
            d = load(a[i, j]) - m
            s += d
            s2 += d * d
        t1, g1 = _fold(t1, g1, s, b, n)
        t2, g2 = _fold(t2, g2, s2, b, n)
    return t1, t2


@njit(cache=True, fastmath=_REASSOC)
def row_grad_dot(dy, w, x, i):
    """``Σ_j g_j·x_j`` on row i with ``g = dy·w``: all the RMSNorm backward needs (over the whole row,
    partial RMSNorm included: every output depends on rstd)."""
    n = x.shape[1]
    total = group = _ZERO
    for b in range((n + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block(b, n)
        s = _ZERO
        for j in range(lo, hi):
            s += (load(dy[i, j]) * w[j]) * load(x[i, j])
        total, group = _fold(total, group, s, b, n)
    return total


@njit(cache=True, fastmath=_REASSOC)
def row_grad_sums(dy, w, x, i, m):
    """``(Σ_j g_j, Σ_j g_j·(x_j − m), Σ_j (x_j − m))`` on row i with ``g = dy·w``."""
    n = x.shape[1]
    t1 = g1 = t2 = g2 = t3 = g3 = _ZERO
    for b in range((n + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block(b, n)
        sg = _ZERO
        sgd = _ZERO
        sd = _ZERO
        for j in range(lo, hi):
            g = load(dy[i, j]) * w[j]
            d = load(x[i, j]) - m
            sg += g
            sgd += g * d
            sd += d
        t1, g1 = _fold(t1, g1, sg, b, n)
        t2, g2 = _fold(t2, g2, sgd, b, n)
        t3, g3 = _fold(t3, g3, sd, b, n)
    return t1, t2, t3


# ---- non-temporal row stores ----------------------------------------------------------------------
# A norm's output is usually larger than the cache when it is large at all. Ordinary stores first read
# each destination line into the cache (read-for-ownership) and evict the input the next call would
# find there; non-temporal stores write whole lines straight to memory. The kernels compute a row in
# blocks into a small buffer (in L1) and stream each block out, when the call moves more data than the
# cache could keep (``STREAM_ABOVE`` in the backend).
LINE = 64


@intrinsic
def _stream_line(typingctx, dst, i, j, src, si, sj):
    """The 64 bytes at ``src[si, sj]`` (any alignment) to ``&dst[i, j]`` (64-byte aligned), non-temporal."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype):
        return None
    sig = types.void(dst, i, j, src, si, sj)

    def codegen(context, builder, signature, args):
        dty, ity, jty, sty, sity, sjty = signature.args

        def pointer(aty, a, idx):
            arr = context.make_array(aty)(context, builder, a)
            inds = [context.cast(builder, v, t, types.intp) for v, t in idx]
            return cgutils.get_item_pointer(context, builder, aty, arr, inds)

        vec = ir.VectorType(_I32, LINE // 4).as_pointer()
        d = pointer(dty, args[0], [(args[1], ity), (args[2], jty)])
        s = pointer(sty, args[3], [(args[4], sity), (args[5], sjty)])
        store = builder.store(builder.load(builder.bitcast(s, vec), align=1), builder.bitcast(d, vec), align=LINE)
        store.set_metadata("nontemporal", builder.module.add_metadata([_i32(1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """Order this thread's non-temporal stores before anything it does next (``fence``: ``mfence``)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, inline="always")
def aligned_from(dst, i):
    """The first column of row ``i`` of ``dst`` at a 64-byte boundary (``n`` if there is none)."""
    n = dst.shape[1]
    size = dst.itemsize
    addr = dst.ctypes.data + i * dst.strides[0]
    if addr % size:
        return n
    return min(n, ((LINE - addr % LINE) % LINE) // size)


@njit(cache=True, inline="always")
def stream_cols(dst, i, j, src, sj, count):
    """``src[0, sj:sj + count]`` into ``dst[i, j:j + count]`` with non-temporal stores; ``&dst[i, j]``
    is 64-byte aligned and ``count`` a whole number of lines. Call :func:`store_fence` before the
    thread's work is handed back."""
    per = LINE // dst.itemsize
    for t in range(0, count, per):
        _stream_line(dst, i, j + t, src, 0, sj + t)


# ---- ordering between the threads of one kernel (the in-order fold of weight-gradient partials) ----
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_POSIX = os.name == "posix"


def _counter_operands(context, builder, signature, args):
    """IR: ``&arr[i]`` and ``value`` (as int64) from the arguments ``(arr, i, value)`` of a counter
    intrinsic."""
    aty, ity, vty = signature.args
    ary = context.make_array(aty)(context, builder, args[0])
    ptr = cgutils.get_item_pointer(context, builder, aty, ary, [context.cast(builder, args[1], ity, types.intp)])
    return ptr, context.cast(builder, args[2], vty, types.int64)


def _is_counter_array(arr):
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64


@intrinsic
def fetch_add(typingctx, arr, i, value):
    """``arr[i] += value`` atomically (sequentially consistent); returns the value before the add."""
    if not _is_counter_array(arr):
        return None
    sig = types.int64(arr, i, value)

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", *_counter_operands(context, builder, signature, args), "seq_cst")

    return sig, codegen


#: Polls of :func:`wait_until` before it starts giving its core away between polls.
SPIN_POLLS = 2000


@intrinsic
def wait_until(typingctx, arr, i, value):
    """Wait until ``arr[i] >= value`` (acquire loads: what the thread that stored it wrote before its
    :func:`publish` is visible after). Polls with ``pause`` (x86), then, after :data:`SPIN_POLLS`,
    calls ``sched_yield`` between polls (POSIX): with more threads than cores, the thread waited for may
    need this core to finish."""
    if not _is_counter_array(arr):
        return None
    sig = types.void(arr, i, value)

    def codegen(context, builder, signature, args):
        ptr, target = _counter_operands(context, builder, signature, args)
        i64, void = ir.IntType(64), ir.FunctionType(ir.VoidType(), [])
        entry = builder.block
        poll = builder.append_basic_block("wait.poll")
        spin = builder.append_basic_block("wait.spin")
        done = builder.append_basic_block("wait.done")
        builder.branch(poll)
        builder.position_at_end(poll)
        polls = builder.phi(i64)
        ready = builder.icmp_signed(">=", builder.load_atomic(ptr, "acquire", 8), target)
        builder.cbranch(ready, done, spin)
        builder.position_at_end(spin)
        if _X86:
            builder.call(cgutils.get_or_insert_function(builder.module, void, "llvm.x86.sse2.pause"), [])
        if _POSIX:
            with builder.if_then(builder.icmp_signed(">=", polls, ir.Constant(i64, SPIN_POLLS)), likely=False):
                yield_ = ir.FunctionType(ir.IntType(32), [])
                builder.call(cgutils.get_or_insert_function(builder.module, yield_, "sched_yield"), [])
        polls.add_incoming(ir.Constant(i64, 0), entry)
        polls.add_incoming(builder.add(polls, ir.Constant(i64, 1)), builder.block)
        builder.branch(poll)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def publish(typingctx, arr, i, value):
    """``arr[i] = value`` with release ordering: everything this thread wrote before is visible to a
    thread whose :func:`wait_until` sees it."""
    if not _is_counter_array(arr):
        return None
    sig = types.void(arr, i, value)

    def codegen(context, builder, signature, args):
        ptr, value = _counter_operands(context, builder, signature, args)
        builder.store_atomic(value, ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


# ---- bf16 rows through the hardware rounding (AVX512-BF16) ----------------------------------------
# ``vcvtneps2bf16`` rounds 16 fp32 values to bf16 (nearest even) in one instruction, against ≈ 7 for
# the integer formula above, but it flushes subnormal inputs and results to zero and writes its own NaN.
# The block functions below form bf16 → bf16 rows 16 values at a time with it and classify every value
# they round (``vfpclassps``: NaN or subnormal); a block that met one reports it and the caller forms
# it again with the exact formula. Same formula, same operation order, no contraction: the values
# written are those of the scalar path (tested bitwise, both paths).
def _hardware_bf16() -> bool:
    import llvmlite.binding as llvm
    from numba.core import config

    if os.environ.get("NORMLAB_BF16_HARDWARE", "1") == "0":
        return False  # the exact integer rounding everywhere (for comparisons)
    if config.CPU_NAME not in (None, "host") or config.CPU_FEATURES:
        return False  # a portable or cross-compiled cache: no host-only instructions
    if llvm.llvm_version_info[0] < 18:
        return False  # bfloat-typed x86 intrinsics (LLVM 17) and their fptrunc lowering: 18 to be safe
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512dq", "avx512bf16"))


def _bfloat_type():
    """LLVM's ``bfloat`` type. llvmlite names none: built on its (private) float-type base class, and
    ``None`` where that differs — the hardware rounding is then simply not used."""
    try:

        class BFloat(ir.types._BaseFloatType):
            null = "0.0"
            intrinsic_name = "bf16"

            def __str__(self):
                return "bfloat"

        BFloat._create_instance()
        return BFloat()
    except (AttributeError, TypeError):
        return None


_BFLOAT = _bfloat_type()
#: Whether bf16 rows use the hardware rounding (this CPU has AVX512-BF16; part of the kernels' cache key).
HARDWARE_BF16 = _BFLOAT is not None and _hardware_bf16()
#: Values per hardware block (one 512-bit vector of fp32).
LANES = 16
_V16 = {t: ir.VectorType(t, LANES) for t in (_I32, ir.IntType(16), ir.FloatType(), ir.IntType(1))}
_NAN_OR_SUBNORMAL = 0x01 | 0x20 | 0x80  # vfpclassps: quiet NaN, denormal, signalling NaN
#: Block formulas: RMSNorm, one rounding (``x·rs·w``); RMSNorm, x·rs rounded first; LayerNorm.
BLOCK_RMS, BLOCK_RMS_ROUNDED, BLOCK_LN = 0, 1, 2


def _splat(builder, value, vty):
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, _i32(0))
    return builder.shuffle_vector(one, undef, ir.Constant(_V16[_I32], [0] * LANES))


def _bf16_block_intrinsic(formula, checked):
    """The block function of one formula (see :data:`BLOCK_RMS`), classifying what it rounds or not."""

    def typer(typingctx, a, ai, lo, count, y, yi, ylo, w, b, m, c, rs):
        sig = types.uint8(a, ai, lo, count, y, yi, ylo, w, b, m, c, rs)
        return sig, lambda *cg: _bf16_block_ir(formula, checked, *cg)

    typer.__name__ = f"_bf16_block_{formula}_{'checked' if checked else 'proven'}"
    return intrinsic(typer)


def _vector_ptr(context, builder, arty, arr, idx, elem, lanes=LANES):
    """IR: ``&arr[idx]`` (``idx`` already intp values) as a pointer to vectors of ``lanes`` ``elem``."""
    ary = context.make_array(arty)(context, builder, arr)
    ptr = cgutils.get_item_pointer(context, builder, arty, ary, idx)
    return builder.bitcast(ptr, ir.VectorType(elem, lanes).as_pointer())


def _load_bf16(builder, ptr, k):
    """IR: the ``k``-th 16 bf16 values at ``ptr`` as fp32 (bits shifted left by 16)."""
    h = builder.zext(builder.load(builder.gep(ptr, [k]), align=2), _V16[_I32])
    return builder.bitcast(builder.shl(h, _splat(builder, _i32(16), _V16[_I32])), _V16[ir.FloatType()])


def _store_bf16(builder, v, ptr, k):
    """IR: 16 fp32 values rounded by ``vcvtneps2bf16``, stored as the ``k``-th 16 bf16 at ``ptr``."""
    bits = builder.bitcast(builder.fptrunc(v, ir.VectorType(_BFLOAT, LANES)), _V16[ir.IntType(16)])
    builder.store(bits, builder.gep(ptr, [k]), align=2)


def _special(builder, v):
    """IR: which of 16 fp32 values are NaN or subnormal (``vfpclassps``), as a 16-lane mask."""
    classify = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16[ir.IntType(1)], [_V16[ir.FloatType()], _I32]),
        "llvm.x86.avx512.fpclass.ps.512",
    )
    return builder.call(classify, [v, _i32(_NAN_OR_SUBNORMAL)])


def _vector_loop(builder, nvec, body):
    """IR: ``body(k)`` for ``k`` in ``range(nvec)``; ``body`` returns a 16-lane mask of values that need
    the exact path (or None); returns an i8, 1 when some lane of some block was set."""
    i1 = ir.IntType(1)
    none = ir.Constant(_V16[i1], [0] * LANES)
    entry = builder.block
    loop = builder.append_basic_block("bf16.block")
    done = builder.append_basic_block("bf16.done")
    builder.cbranch(builder.icmp_unsigned("!=", nvec, ir.Constant(nvec.type, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(nvec.type)
    bad = builder.phi(_V16[i1])
    seen = body(k)
    bad_next = bad if seen is None else builder.or_(bad, seen)
    k_next = builder.add(k, ir.Constant(nvec.type, 1))
    k.add_incoming(ir.Constant(nvec.type, 0), entry)
    k.add_incoming(k_next, loop)
    bad.add_incoming(none, entry)
    bad.add_incoming(bad_next, loop)
    builder.cbranch(builder.icmp_unsigned("<", k_next, nvec), loop, done)
    builder.position_at_end(done)
    result = builder.phi(_V16[i1])
    result.add_incoming(none, entry)
    result.add_incoming(bad_next, loop)
    flagged = builder.icmp_unsigned("!=", builder.bitcast(result, ir.IntType(LANES)), ir.Constant(ir.IntType(LANES), 0))
    return builder.zext(flagged, ir.IntType(8))


def _param_loader(context, builder, pty, p, lo):
    """IR: a function giving the ``k``-th 16 values of ``p[lo:]`` as fp32; ``p`` is an fp32 row, or the
    bf16 bit patterns (``uint16``) of the same values (half the bytes in cache)."""
    if pty.dtype == types.uint16:
        ptr = _vector_ptr(context, builder, pty, p, [lo], ir.IntType(16))
        return lambda k: _load_bf16(builder, ptr, k)
    ptr = _vector_ptr(context, builder, pty, p, [lo], ir.FloatType())
    return lambda k: builder.load(builder.gep(ptr, [k]), align=4)


def _bf16_block_ir(formula, checked, context, builder, signature, args):
    """IR of a block function: columns ``lo : lo + count`` (``count`` a multiple of 16) of the bf16 row
    ``a[ai]``, normalized by ``formula`` and rounded by ``vcvtneps2bf16``, into ``y[yi, ylo:]``; returns
    1 when a rounded value was NaN or subnormal (the block must then be formed again exactly), else 0.
    Unchecked (``checked`` false: the caller proved that no such value can occur), it returns 0."""
    a, ai, lo, count, y, yi, ylo, w, b, m, c, rs = args
    aty, aity, loty, cty, yty, yity, ylty, wty, bty = signature.args[:9]
    f32, i16 = ir.FloatType(), ir.IntType(16)

    def index(v, t):
        return context.cast(builder, v, t, types.intp)

    lo_ = index(lo, loty)
    xp = _vector_ptr(context, builder, aty, a, [index(ai, aity), lo_], i16)
    yp = _vector_ptr(context, builder, yty, y, [index(yi, yity), index(ylo, ylty)], i16)
    load_w, load_b = _param_loader(context, builder, wty, w, lo_), _param_loader(context, builder, bty, b, lo_)
    mv, cv, rsv = (_splat(builder, v, _V16[f32]) for v in (m, c, rs))

    def special(v):
        return _special(builder, v) if checked else None

    def body(k):
        xv = _load_bf16(builder, xp, k)
        weight = load_w(k)
        seen = None
        if formula == BLOCK_LN:  # ((x − m) − c)·rs·w + b
            v = builder.fmul(builder.fmul(builder.fsub(builder.fsub(xv, mv), cv), rsv), weight)
            v = builder.fadd(v, load_b(k))
        elif formula == BLOCK_RMS:  # x·rs·w
            v = builder.fmul(builder.fmul(xv, rsv), weight)
        else:  # x·rs rounded to bf16, then times the weight
            t = builder.fmul(xv, rsv)
            rounded = builder.fpext(builder.fptrunc(t, ir.VectorType(_BFLOAT, LANES)), _V16[f32])
            v = builder.fmul(rounded, weight)
            seen = special(t)
        _store_bf16(builder, v, yp, k)
        last = special(v)
        return last if seen is None else builder.or_(seen, last)

    nvec = builder.udiv(index(count, cty), ir.Constant(context.get_value_type(types.intp), LANES))
    return _vector_loop(builder, nvec, body)


@intrinsic
def _bf16_add_block(typingctx, x, r, i, count, s):
    """``s[i, :count] = x[i, :count] + r[i, :count]`` (bf16, fp32 add, ``count`` a multiple of 16)
    rounded by ``vcvtneps2bf16``; returns 1 when a sum was NaN or subnormal (form the row again exactly)."""
    if not all(isinstance(t, types.Array) and t.dtype == types.uint16 for t in (x, r, s)):
        return None
    sig = types.uint8(x, r, i, count, s)

    def codegen(context, builder, signature, args):
        xty, rty, ity, cty, sty = signature.args
        row = [context.cast(builder, args[2], ity, types.intp), context.get_constant(types.intp, 0)]
        i16 = ir.IntType(16)
        xp, rp, sp = (
            _vector_ptr(context, builder, t, v, row, i16) for t, v in ((xty, args[0]), (rty, args[1]), (sty, args[4]))
        )

        def body(k):
            v = builder.fadd(_load_bf16(builder, xp, k), _load_bf16(builder, rp, k))
            _store_bf16(builder, v, sp, k)
            return _special(builder, v)

        count = context.cast(builder, args[3], cty, types.intp)
        return _vector_loop(builder, builder.udiv(count, context.get_constant(types.intp, LANES)), body)

    return sig, codegen


def hardware_add(x, r, s, i):
    """``s[i] = x[i] + r[i]`` for whole 16-value blocks with the hardware bf16 rounding; returns the
    first column left to the exact loop (0 when nothing applies: not all bf16, no AVX512-BF16, or a NaN
    or subnormal sum met)."""


@overload(hardware_add, jit_options={"cache": True}, inline="always")
def _hardware_add(x, r, s, i):
    if not (HARDWARE_BF16 and all(_dtype_of(t) == types.uint16 for t in (x, r, s))):
        return lambda x, r, s, i: 0

    def impl(x, r, s, i):
        count = x.shape[1] // LANES * LANES
        if count == 0 or _bf16_add_block(x, r, i, count, s):
            return 0
        return count

    return impl


_BF16_BLOCKS = {(f, checked): _bf16_block_intrinsic(f, checked) for f in (BLOCK_RMS, BLOCK_RMS_ROUNDED, BLOCK_LN)
                for checked in (True, False)}


def hardware_block(kind, checked, a, ai, lo, hi, y, yi, off, w, b, m, c, rs):
    """Form what it can of columns ``lo:hi`` of row ``ai`` of ``a`` (formula ``kind``) into
    ``y[yi, lo − off : hi − off]`` with the hardware bf16 rounding, and return the first column left to
    the exact loop: ``lo`` when nothing applies (not bf16 → bf16, no AVX512-BF16, or a NaN / subnormal
    met), else ``lo`` plus a whole number of 16-value blocks. ``checked`` false: the caller proved that
    no rounded value is NaN or subnormal (:func:`proven_normal`), so none is classified."""


@overload(hardware_block, jit_options={"cache": True}, inline="always")
def _hardware_block(kind, checked, a, ai, lo, hi, y, yi, off, w, b, m, c, rs):
    if not (HARDWARE_BF16 and _dtype_of(a) == types.uint16 and _dtype_of(y) == types.uint16):
        return lambda kind, checked, a, ai, lo, hi, y, yi, off, w, b, m, c, rs: lo
    if not isinstance(kind, types.IntegerLiteral):
        raise errors.TypingError("hardware_block: the formula must be a compile-time constant")
    with_check, without = _BF16_BLOCKS[kind.literal_value, True], _BF16_BLOCKS[kind.literal_value, False]

    def impl(kind, checked, a, ai, lo, hi, y, yi, off, w, b, m, c, rs):
        count = (hi - lo) // LANES * LANES
        if count == 0:
            return lo
        if not checked:
            without(a, ai, lo, count, y, yi, lo - off, w, b, m, c, rs)
            return lo + count
        if with_check(a, ai, lo, count, y, yi, lo - off, w, b, m, c, rs):
            return lo
        return lo + count

    return impl


# ---- the bf16 sum of squares, in a fixed order (AVX512-BF16: vdpbf16ps) -----------------------------
#: bf16 values per iteration of the bf16 sum of squares: 4 independent vectors of 32.
SUMSQ_STEP = 4 * 2 * LANES
#: ``vdpbf16ps`` forms exactly the emulated sums when every nonzero |x| lies in [2⁻⁶³, 2⁶⁴): each
#: square is then a normal fp32 number (the instruction flushes subnormals) and finite.
_DP_LEAST, _DP_MOST = 0x2000 - 1, 0x5F80  # bf16 bits of 2⁻⁶³ (less one, as ``least`` counts) and 2⁶⁴


def _tree_sum(builder, v, lanes):
    """IR: the lanes of ``v`` summed halves first (16 → 8 → 4 → 2 → 1): a fixed order."""
    while lanes > 1:
        half = lanes // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, lanes))))
        v, lanes = builder.fadd(lo, hi), half
    return builder.extract_element(v, _i32(0))


def _bf16_sumsq_intrinsic(hardware):
    """``(Σ x², least, most)`` over the first ``count`` (a multiple of :data:`SUMSQ_STEP`) values of the
    bf16 row ``ai``, in one pass. Order: vector u (32 values, 16 pairs) of every step of 128 adds, in
    lane j, the square of its value 2j + 1 and then that of its value 2j into accumulator u
    (``(acc + x₂ⱼ₊₁²) + x₂ⱼ²``, every operation rounded); then ``(acc₀ + acc₁) + (acc₂ + acc₃)`` and the
    16 lanes halves first. ``hardware``: the pair step is one ``vdpbf16ps`` (the same roundings, exact
    where :data:`_DP_LEAST` / :data:`_DP_MOST` hold: the caller checks); else the squares are formed
    from the pair's bits (odd value: the high half as is, even value: shifted up). ``least`` = min
    (|h| − 1) over the bit patterns (a zero wraps to 0xFFFF), ``most`` = max |h|, 16-bit unsigned."""

    def typer(typingctx, a, ai, count):
        if not (isinstance(a, types.Array) and a.dtype == types.uint16):
            return None
        sig = types.Tuple((types.float32, types.uint16, types.uint16))(a, ai, count)
        return sig, lambda *cg: _bf16_sumsq_ir(hardware, *cg)

    typer.__name__ = f"_bf16_sumsq_{'hardware' if hardware else 'exact'}"
    return intrinsic(typer)


def _bf16_sumsq_ir(hardware, context, builder, signature, args):
    aty, ity, cty = signature.args
    intp = context.get_value_type(types.intp)
    f32, i16, unroll = ir.FloatType(), ir.IntType(16), SUMSQ_STEP // (2 * LANES)
    hty, fty, pty = ir.VectorType(i16, 2 * LANES), _V16[f32], _V16[_I32]
    row = [context.cast(builder, args[1], ity, types.intp), context.get_constant(types.intp, 0)]
    base = _vector_ptr(context, builder, aty, args[0], row, i16, 2 * LANES)
    steps = builder.udiv(context.cast(builder, args[2], cty, types.intp), ir.Constant(intp, SUMSQ_STEP))
    magnitude, one = ir.Constant(hty, [0x7FFF] * 2 * LANES), ir.Constant(hty, [1] * 2 * LANES)
    zero, none, low = ir.Constant(fty, [0.0] * LANES), ir.Constant(hty, [0xFFFF] * 2 * LANES), ir.Constant(hty, None)
    umin, umax = (cgutils.get_or_insert_function(builder.module, ir.FunctionType(hty, [hty, hty]), f"llvm.{op}.v32i16")
                  for op in ("umin", "umax"))
    bty = ir.VectorType(_BFLOAT, 2 * LANES)
    dot = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(fty, [fty, bty, bty]), "llvm.x86.avx512bf16.dpbf16ps.512"
    ) if hardware else None
    high, sixteen = ir.Constant(pty, [0xFFFF0000] * LANES), ir.Constant(pty, [16] * LANES)

    def pair_step(acc, h):
        if hardware:
            b = builder.bitcast(h, bty)
            return builder.call(dot, [acc, b, b])
        pairs = builder.bitcast(h, pty)
        odd = builder.bitcast(builder.and_(pairs, high), fty)
        even = builder.bitcast(builder.shl(pairs, sixteen), fty)
        return builder.fadd(builder.fadd(acc, builder.fmul(odd, odd)), builder.fmul(even, even))

    entry = builder.block
    loop, combine = builder.append_basic_block("sumsq.loop"), builder.append_basic_block("sumsq.combine")
    done = builder.append_basic_block("sumsq.done")
    builder.cbranch(builder.icmp_unsigned("!=", steps, ir.Constant(intp, 0)), loop, done)
    builder.position_at_end(loop)
    t = builder.phi(intp)
    accs, mins, maxs = ([builder.phi(ty) for _ in range(unroll)] for ty in (fty, hty, hty))
    acc_next, min_next, max_next = [], [], []
    first = builder.mul(t, ir.Constant(intp, unroll))
    for u in range(unroll):
        h = builder.load(builder.gep(base, [builder.add(first, ir.Constant(intp, u))]), align=2)
        mag = builder.and_(h, magnitude)
        acc_next.append(pair_step(accs[u], h))
        min_next.append(builder.call(umin, [mins[u], builder.sub(mag, one)]))
        max_next.append(builder.call(umax, [maxs[u], mag]))
    t_next = builder.add(t, ir.Constant(intp, 1))
    t.add_incoming(ir.Constant(intp, 0), entry)
    t.add_incoming(t_next, loop)
    for phis, nexts, start in ((accs, acc_next, zero), (mins, min_next, none), (maxs, max_next, low)):
        for phi, nxt in zip(phis, nexts):
            phi.add_incoming(start, entry)
            phi.add_incoming(nxt, loop)
    builder.cbranch(builder.icmp_unsigned("<", t_next, steps), loop, combine)
    builder.position_at_end(combine)
    total = builder.fadd(builder.fadd(acc_next[0], acc_next[1]), builder.fadd(acc_next[2], acc_next[3]))

    def fold(fn, vs):
        return builder.call(fn, [builder.call(fn, [vs[0], vs[1]]), builder.call(fn, [vs[2], vs[3]])])

    least, most = fold(umin, min_next), fold(umax, max_next)
    builder.branch(done)
    builder.position_at_end(done)
    results = []
    for start, value in ((zero, total), (none, least), (low, most)):
        phi = builder.phi(value.type)
        phi.add_incoming(start, entry)
        phi.add_incoming(value, combine)
        results.append(phi)
    reduce_min, reduce_max = (
        cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [hty]), f"llvm.vector.reduce.{op}.v32i16")
        for op in ("umin", "umax")
    )
    total = _tree_sum(builder, results[0], LANES)
    out = [total, builder.call(reduce_min, [results[1]]), builder.call(reduce_max, [results[2]])]
    return context.make_tuple(builder, signature.return_type, out)


_bf16_sumsq_exact = _bf16_sumsq_intrinsic(False)
_bf16_sumsq_hardware = _bf16_sumsq_intrinsic(True)


def row_sumsq_min(a, ai, k):
    """``(Σ_{j<k} a_ij², least)``. bf16 rows: the sum in the fixed order of :func:`_bf16_sumsq_intrinsic`
    (``vdpbf16ps`` where the CPU has it and the row's magnitudes allow, the same roundings otherwise),
    then the last ``k mod 128`` squares one by one; ``least`` = min(|h| − 1) over the whole row's bit
    patterns when ``k = n`` (what :func:`proven_normal` needs; 0xFFFF otherwise). Other dtypes:
    :func:`row_sumsq` and 0xFFFF."""


@overload(row_sumsq_min, jit_options={"cache": True}, inline="always")
def _row_sumsq_min(a, ai, k):
    if _dtype_of(a) != types.uint16:
        return lambda a, ai, k: (row_sumsq(a, ai, k), np.int64(0xFFFF))
    if HARDWARE_BF16:

        def pass_over(a, ai, body):
            fast = _bf16_sumsq_hardware(a, ai, body)
            # exact unless a square could be subnormal (flushed) or infinite: then the emulation
            return fast if fast[1] >= _DP_LEAST and fast[2] < _DP_MOST else _bf16_sumsq_exact(a, ai, body)
    else:

        def pass_over(a, ai, body):
            return _bf16_sumsq_exact(a, ai, body)

    # pass_over and the tails are calls, not inlined: numba's inliner warns about names rebound in branches
    pass_over = njit(cache=True)(pass_over)

    def impl(a, ai, k):
        body = k // SUMSQ_STEP * SUMSQ_STEP
        total, least, _ = pass_over(a, ai, body)
        return _sumsq_tail(a, ai, body, k, total), _min_abs_tail(a, ai, body, np.int64(least), k)

    return impl


@njit(cache=True)
def _sumsq_tail(a, ai, lo, k, total):
    """``total`` plus the squares of columns ``lo:k`` of row ``ai``, one at a time, in order."""
    for j in range(lo, k):
        v = load(a[ai, j])
        total += v * v
    return total


# ---- proving a bf16 RMSNorm row free of NaN and subnormals -----------------------------------------
@njit(cache=True)
def _min_abs_tail(a, ai, lo, least, k):
    """The smallest ``|h| − 1`` of :func:`row_sumsq_min`, continued over columns ``lo:`` of row ``ai``
    one value at a time — when the statistic covers the whole row (``k = n``; else ``least`` as it is:
    the proof does not apply)."""
    if k != a.shape[1]:
        return least
    for j in range(lo, a.shape[1]):
        magnitude = np.int64(a[ai, j]) & 0x7FFF
        if magnitude != 0 and magnitude - 1 < least:
            least = magnitude - 1
    return least


_SMALLEST_SAFE = 2.0**-124  # see proven_normal
_INF64 = np.inf


@njit(cache=True)
def _weight_bounds(w):
    least, most = _U(0xFFFFFFFF), _U(0)
    for j in range(w.shape[0]):
        magnitude = _U(_f32_bits(w[j])) & _ABS32
        least = min(least, (magnitude - _ONE) & _MASK32)  # a zero wraps to the largest value
        most = max(most, magnitude)
    smallest = np.inf if least == _MASK32 else np.float64(_bits_f32(np.uint32(least + _ONE)))
    return smallest, most < _INF32


def weight_bounds(x, w):
    """``(smallest nonzero |w|, all finite)`` of an fp32 weight row (inf when all are zero), wanted by
    :func:`proven_normal` for bf16 rows only (elsewhere ``(1.0, False)`` without a look at ``w``)."""


@overload(weight_bounds, jit_options={"cache": True})
def _weight_bounds_overload(x, w):
    if not (HARDWARE_BF16 and _dtype_of(x) == types.uint16):
        return lambda x, w: (1.0, False)
    return lambda x, w: _weight_bounds(w)


def proven_normal(a, ai, k, rs, w_min, w_finite, least):
    """Whether RMSNorm can round every value of bf16 row ``ai`` with no NaN and no subnormal, rounded
    ``x·rs`` and ``x·rs·w`` alike (then the hardware blocks need not classify). Holds when the row's
    statistic covers the whole row (``k = n``) and ``0 < rs < ∞`` (so every x is finite and
    ``|x·rs| ≤ √n``), the weights are finite, and ``min|x|·rs·min(1, min|w|) ≥ 2⁻¹²⁴`` over nonzero x
    and w: every product is then 0 or above 2⁻¹²⁵ after its roundings (each loses less than 2⁻⁸).
    ``least``: the row's smallest nonzero magnitude − 1, in bits (from :func:`row_sumsq_min`)."""


@overload(proven_normal, jit_options={"cache": True}, inline="always")
def _proven_normal(a, ai, k, rs, w_min, w_finite, least):
    if not (HARDWARE_BF16 and _dtype_of(a) == types.uint16):
        return lambda a, ai, k, rs, w_min, w_finite, least: False

    def impl(a, ai, k, rs, w_min, w_finite, least):
        r = np.float64(rs)
        if not (k == a.shape[1] and w_finite and 0.0 < r < _INF64):
            return False
        if least == 0xFFFF:
            return True  # an all-zero row: every product is ±0
        x_min = np.float64(bf16_to_f32(np.uint16(least + 1)))
        return x_min * r * min(1.0, w_min) >= _SMALLEST_SAFE

    return impl
