"""The argparse ``type=`` functions of every subcommand: each checks one value before any work, and a bad one
is argparse's ``error:`` with exit status 2, naming the flag. Nothing of normlab is imported here (torch only
inside :func:`device`), so the library's modules never need the command line.
"""

from __future__ import annotations

import argparse
import math
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


def number_in(lo: float, hi: float, *, hi_open: bool = False):
    """A ``type=`` for a finite number in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``; ``hi`` may be ``inf``)."""
    interval = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and lo <= v and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {s!r}")
        return v

    return parse


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


def cuda_device(s: str) -> str:
    """``cuda`` or ``cuda:N``, visible to torch (:func:`device` without ``cpu``)."""
    if not device(s).startswith("cuda"):
        raise argparse.ArgumentTypeError(f"expected cuda or cuda:N, got {s!r}")
    return s


def dir_name(s: str) -> str:
    """A plain directory name: no path separator, not ``.`` or ``..`` (the study stays inside ``--out``)."""
    if s in ("", ".", "..") or Path(s).name != s:
        raise argparse.ArgumentTypeError(f"expected a directory name without path separators or '..', got {s!r}")
    return s
