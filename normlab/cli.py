"""``normlab study | inspect | bench | convert`` — argument parsing only.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs. The argparse ``type=``
functions below check values before any work (``error:`` and exit status 2, naming the flag).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path


def positive_int(s: str) -> int:
    """An integer ≥ 1."""
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0 (a learning rate, a time)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def shape(s: str) -> tuple[int, int]:
    """``ROWSxN`` with positive integers, e.g. ``4096x768``."""
    rows, sep, n = s.strip().lower().partition("x")
    if not (sep and rows.isdigit() and n.isdigit() and int(rows) > 0 and int(n) > 0):
        raise argparse.ArgumentTypeError(f"expected ROWSxN with positive integers, e.g. 4096x768, got {s!r}")
    return int(rows), int(n)


def comma_list(item=str, choices=None):
    """A ``type=`` for ``"a,b,c"``: the list of ``item(x)``, each in ``choices`` when given."""

    def parse(s: str) -> list:
        parts = [x.strip() for x in s.split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
        try:
            values = [item(x) for x in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, got {s!r}") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"invalid choice {', '.join(map(repr, bad))} "
                                             f"(choose from {', '.join(map(str, choices))})")
        return values

    return parse


def device(s: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only where torch sees that device."""
    kind, sep, index = s.partition(":")
    if kind not in ("cpu", "cuda") or sep and (kind == "cpu" or not index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (int(index) if sep else 0):
            raise argparse.ArgumentTypeError(f"{s!r}: torch sees CUDA devices 0 to {count - 1} only" if count else
                                             f"{s!r}: no CUDA device is visible to torch on this machine")
    return s


def new_file(s: str) -> Path:
    """A file to write, whose directory exists."""
    p = Path(s)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file name, got a directory: {s}")
    if not p.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(p.parent)!r} does not exist")
    return p


SUBCOMMANDS = {
    "study": ("normlab.study.cli", "train a grid of norm variants and write a report"),
    "inspect": ("normlab.study.inspect", "geometry report of a saved normlab or Hugging Face model"),
    "bench": ("normlab.bench", "benchmark the kernels against torch and copy_ bandwidth"),
    "convert": ("normlab.models.convert", "convert a saved Pre-LN model to Pre-RMSNorm (exact)"),
}


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand ``wanted`` imports its module to add its arguments."""
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__.splitlines()[0])
    from normlab import __version__

    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
