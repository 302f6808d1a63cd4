"""``normlab study | inspect | bench | convert`` — argument parsing only.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "study": ("normlab.study.cli", "train a grid of norm variants and write a report"),
    "inspect": ("normlab.study.inspect", "geometry report of a saved normlab or Hugging Face model"),
    "bench": ("normlab.bench", "benchmark the kernels against torch and copy_ bandwidth"),
    "convert": ("normlab.models.convert", "convert a saved Pre-LN model to Pre-RMSNorm (exact)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__.splitlines()[0])
    from normlab import __version__

    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == wanted:  # import only the module of the subcommand that runs
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args(sys.argv[1:])
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
