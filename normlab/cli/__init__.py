"""``normlab study | inspect | bench | convert`` — argument parsing only.

Each subcommand has its own module here, ``normlab.cli.<name>``, which defines ``add_arguments(parser)`` and
``main(args) -> int`` and calls the library; a module is imported only when its subcommand runs. The
argparse ``type=`` functions, which check values before any work, are in :mod:`normlab.cli.argtypes`.
No library module imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "study": ("normlab.cli.study", "train a grid of norm variants and write a report"),
    "inspect": ("normlab.cli.inspect", "geometry report of a saved normlab or Hugging Face model"),
    "bench": ("normlab.cli.bench", "benchmark the kernels against torch and copy_ bandwidth"),
    "convert": ("normlab.cli.convert", "convert a saved Pre-LN model to Pre-RMSNorm (exact)"),
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
