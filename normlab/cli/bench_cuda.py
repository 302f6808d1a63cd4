"""``python -m normlab.cli.bench_cuda``: the GPU benchmark alone (:func:`normlab.bench.cuda.benchmark`), with
its own defaults (``normlab bench --device cuda`` runs the same benchmark)."""

from __future__ import annotations

import argparse
import sys

from normlab.bench import MODES, QUICK_SHAPES, BenchArgumentError
from normlab.bench.cuda import DTYPES, OPS, benchmark
from normlab.cli.argtypes import comma_list, cuda_device, positive_float, positive_int, shape

PROG = "python -m normlab.cli.bench_cuda"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {', '.join(f'{r}x{n}' for r, n in QUICK_SHAPES)} only, no torch.compile")
    parser.add_argument("--ops", type=comma_list(str, OPS), default=list(OPS),
                        help=f"comma-separated, of {', '.join(OPS)} (default: all)")
    parser.add_argument("--shapes", type=comma_list(shape), default=None,
                        help="comma-separated ROWSxN, positive integers (default: the standard shapes)")
    parser.add_argument("--dtypes", type=comma_list(str, tuple(DTYPES)), default=["float32", "bfloat16"],
                        help=f"comma-separated, of {', '.join(DTYPES)} (default: float32,bfloat16)")
    parser.add_argument("--modes", type=comma_list(str, MODES), default=list(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default: both)")
    parser.add_argument("--device", type=cuda_device, default="cuda", help="a CUDA device: cuda or cuda:N")
    parser.add_argument("--samples", type=positive_int, default=7,
                        help="samples per measurement (median taken; at least 7)")
    parser.add_argument("--min-time", type=positive_float, default=0.03, help="seconds per sample (at least 0.03)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile of the reference (default: on unless --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", default="runs/bench-cuda", help="directory for results.json and results.md")


def main(args: argparse.Namespace) -> int:
    try:
        return benchmark(ops=args.ops, shapes=args.shapes, dtypes=args.dtypes, modes=args.modes, device=args.device,
                         samples=args.samples, min_time=args.min_time, compile_reference=args.compile,
                         quick=args.quick, out=args.out, command=" ".join(sys.orig_argv))
    except BenchArgumentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
