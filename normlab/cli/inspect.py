"""``normlab inspect PATH``: the geometry report of :func:`normlab.study.inspect.inspect_path`, printed
(and written as JSON with ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys

from normlab.cli.argtypes import new_file, positive_int
from normlab.study.inspect import inspect_path


def text_file(path: str) -> str:
    """An argparse ``type=``: the UTF-8 text of the file ``path`` (its errors name the flag, not ``--data``)."""
    from normlab.study.data import read_text_file

    try:
        return read_text_file(path)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--data: ")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a normlab run directory (e.g. runs/default/grid/layernorm-pre), its saved model/ "
                                "directory, or a local Hugging Face model directory")
    p.add_argument("--text", default=None, help="text sample (default: a passage of CPython's help text)")
    p.add_argument("--text-file", type=text_file, default=None, metavar="FILE",
                   help="read the text sample from this UTF-8 file")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="tokens of the text sample, ≥ 1 (default: %(default)s)")
    p.add_argument("--json", type=new_file, default=None,
                   help="also write the report as JSON to this file (its directory must exist)")


def main(args: argparse.Namespace) -> int:
    try:
        rep = inspect_path(args.path, args.text_file if args.text_file is not None else args.text, args.max_tokens)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"normlab inspect: error: {e}", file=sys.stderr)
        return 2
    print(f"{rep.description}\nsource: {rep.source}\nplacement found: {rep.placement}; {rep.tokens} tokens of text; "
          f"random baseline √(2/π)/√d = {rep.rows[0]['baseline']:.4f} (d={rep.rows[0]['d']})\n")
    print(rep.table())
    if args.json:
        args.json.write_text(json.dumps(rep.__dict__, indent=2, default=str) + "\n")
    return 0
