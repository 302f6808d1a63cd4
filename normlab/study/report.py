"""Experiment results → Markdown tables, PNG plots (matplotlib, Agg) and ``report.md``."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normlab._machine import cpu_model
from normlab.study.config import atomic_write_text


@dataclass
class Experiment:
    """One experiment of the report: the paper's claim beside what was measured, and a verdict."""

    number: int
    title: str
    claim: str
    measured: str
    verdict: str  # "holds" | "does not hold here" | "partly holds"
    headers: list[str]
    rows: list[list]
    plot: str | None = None
    notes: list[str] = field(default_factory=list)
    extra_tables: list[tuple[str, list[str], list[list]]] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    below_paper: str | None = None  # what ran below the paper's scale, if anything: flagged beside the verdict


def fmt(v, digits: int = 4) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def _cell(v) -> str:
    return fmt(v).replace("|", "\\|")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def environment() -> dict:
    import normlab

    return {
        "normlab": normlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
    }


def write_report(out_dir: Path, title: str, setup: list[str], experiments: list[Experiment]) -> Path:
    """``out_dir/report.md``: setup, a summary of the verdicts, then one section per experiment."""
    lines = [f"# {title}", "", *setup, "", "## Verdicts", ""]
    verdicts = [[e.number, f"[{e.title}](#{e.number})", f"**{e.verdict}**" + (" ⚠ below paper scale" if e.below_paper
                 else ""), e.measured] for e in experiments]
    lines.append(markdown_table(["#", "experiment", "verdict", "measured"], verdicts))
    for e in experiments:
        lines += ["", f'<a id="{e.number}"></a>', "", f"## {e.number}. {e.title}", "",
                  f"**Claim.** {e.claim}", "", f"**Measured.** {e.measured}", "",
                  f"**Verdict: {e.verdict}.**" + (f" ⚠ {e.below_paper}" if e.below_paper else ""), "",
                  markdown_table(e.headers, e.rows)]
        for caption, headers, rows in e.extra_tables:
            lines += ["", caption, "", markdown_table(headers, rows)]
        if e.plot:
            lines += ["", f"![{e.title}]({e.plot})"]
        if e.notes:
            lines += [""] + [f"- {n}" for n in e.notes]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
