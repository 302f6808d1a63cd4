"""Builds normlab's native CPU operators (normlab.kernels.cpu._C) with torch.utils.cpp_extension.

The kernels (kernels.h) are compiled once per ISA level with that level's flags and linked into one
library, the lowest level first; ops.cpp picks one at load time from the CPU. Install with
``pip install --no-build-isolation .`` after torch, so the build uses the installed torch.
``NORMLAB_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import os
import platform
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # an isolated build environment has no torch
    raise SystemExit(
        "normlab builds its C++ extension against the installed torch: install torch first, then "
        "`pip install --no-build-isolation normlab` (an isolated build would pull a CUDA torch)"
    ) from exc

CSRC = "normlab/kernels/cpu/csrc"
# -ffp-contract=off: no FMA is fused in, so every ISA build computes the same IEEE operations.
COMMON = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
ISA_BUILDS = [
    (f"{CSRC}/kernels_avx2.cpp", AVX2),
    (f"{CSRC}/kernels_avx512.cpp", AVX512),
    (f"{CSRC}/kernels_avx512bf16.cpp", AVX512 + ["-mavx512bf16"]),  # bf16 conversions in one instruction
]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
sanitize = os.environ.get("NORMLAB_SANITIZE") == "1"


class BuildWithIsaLevels(BuildExtension):
    """Compiles each ISA build of the kernels with its own flags, side by side (each in its own folder, where
    torch's ninja writes its build file), then links them after ops.cpp."""

    def build_extension(self, ext):
        base = ext.extra_compile_args["cxx"]

        def compile_isa(build):
            source, flags = build
            return self.compiler.compile(
                [source], output_dir=os.path.join(self.build_temp, os.path.basename(source)[:-4]),
                macros=ext.define_macros, include_dirs=ext.include_dirs, extra_postargs={"cxx": base + flags},
            )

        with ThreadPoolExecutor(len(ISA_BUILDS)) as pool:
            objects = [obj for objs in pool.map(compile_isa, ISA_BUILDS) for obj in objs]
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64"):
    ext_modules.append(CppExtension(
        "normlab.kernels.cpu._C",
        [f"{CSRC}/ops.cpp", f"{CSRC}/front.cpp"],
        extra_compile_args={"cxx": COMMON + (SANITIZE + ["-O1", "-DNORMLAB_SANITIZE"] if sanitize else [])},
        extra_link_args=["-fopenmp"] + (SANITIZE if sanitize else []),
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildWithIsaLevels})
