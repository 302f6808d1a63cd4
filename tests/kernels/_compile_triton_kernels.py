"""Compile every Triton kernel for a Hopper GPU (sm_90) without one — Triton's compiler and ptxas only —
and report each kernel's registers and stack (spills). Run in a process without ``TRITON_INTERPRET``
by ``test_triton_kernels.py``: the interpreter accepts code the GPU compiler rejects.

Prints one line per kernel: ``name constexprs REG:<n> STACK:<bytes>``; exits non-zero on a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normlab.kernels.triton import _common, layer_norm, rms_norm

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, num_warps: int) -> str:
    """Compile as a launch with 16-divisible pointers and sizes would; return the resource line."""
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if signature[a].startswith("*") or a in ("n", "k")
    }
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                            target=TARGET, options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(s for s in usage.splitlines() if "REG:" in s)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return f"{fn.__name__} {constexprs} REG:{fields['REG']} STACK:{fields['STACK']}"


def main() -> int:
    p, io = "*fp32", "*bf16"
    for block, chunks in ((4096, 1), (1024, 3)):
        warps = _common.num_warps(block)
        for casting in (0, 1, 2):
            print(compile_kernel(rms_norm._rms_norm_fwd_kernel,
                                 dict(X=io, R=io, W=p, Y=io, S=p, RSTD=p, n="i32", k="i32", eps="fp32", offset="fp32"),
                                 dict(HAS_RES=True, HAS_W=True, CASTING=casting, BLOCK=block, NUM_CHUNKS=chunks),
                                 warps))
        print(compile_kernel(rms_norm._rms_norm_bwd_kernel,
                             dict(DY=io, X=io, W=io, RSTD=p, DSUM=io, DX=io, DW_PART=p, rows="i32",
                                  rows_per_program="i32", n="i32", k="i32", offset="fp32"),
                             dict(HAS_W=True, HAS_DSUM=True, BLOCK=block, NUM_CHUNKS=chunks), warps))
        print(compile_kernel(layer_norm._layer_norm_fwd_kernel,
                             dict(X=io, R=io, W=io, B=io, Y=io, S=io, MEAN=p, RSTD=p, n="i32", eps="fp32"),
                             dict(HAS_RES=True, HAS_W=True, HAS_B=True, BLOCK=block, NUM_CHUNKS=chunks), warps))
        print(compile_kernel(layer_norm._layer_norm_bwd_kernel,
                             dict(DY=io, X=io, W=p, MEAN=p, RSTD=p, DSUM=io, DX=io, DW_PART=p, DB_PART=p, rows="i32",
                                  rows_per_program="i32", n="i32"),
                             dict(HAS_W=True, HAS_B=True, HAS_DSUM=True, BLOCK=block, NUM_CHUNKS=chunks), warps))
    print(compile_kernel(_common._sum_partials_kernel, dict(P=p, OUT=io, G="i32", n="i32"),
                         dict(BLOCK_G=_common.SUM_BLOCK_G, BLOCK_N=_common.SUM_BLOCK_N), 4))
    return 0


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "compile without TRITON_INTERPRET"
    sys.exit(main())
