"""The benchmark's table (markdown) and bar chart (PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from normlab.bench.cases import ONE_ROUNDING


def _groups(results):
    groups = defaultdict(list)
    for r in results:
        groups[(r["op"], r["rows"], r["n"], r["dtype"], r["mode"])].append(r)
    return groups


def markdown(results: list[dict]) -> str:
    """One row per measurement: ms, GB/s, % of the same-run copy, normlab's speed-up over it, peak MB."""
    lines = [
        "| op | shape | dtype | mode | implementation | ms | GB/s | % of copy | normlab speed-up | peak MB (fwd+bwd) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (op, rows, n, dtype, mode), recs in _groups(results).items():
        ours = next((r for r in recs if r["impl"] == "normlab" and "ms" in r), None)
        for r in recs:
            if "error" in r:
                lines.append(f"| {op} | {rows}×{n} | {dtype} | {mode} | {r['impl']} | error: {r['error']} | | | | |")
                continue
            speed = "—" if ours is None or r is ours else f"{r['ms'] / ours['ms']:.2f}×"
            peak = f"{r['peak_mb']:.2f}" if "peak_mb" in r else ""
            name = f"**{r['impl']}**" if r is ours else r["impl"]
            lines.append(
                f"| {op} | {rows}×{n} | {dtype} | {mode} | {name} | {r['ms']:.4g} | {r['gbps']:.1f} | "
                f"{r['pct_copy']:.0f} % | {speed} | {peak} |"
            )
        c = recs[0]
        lines.append(f"| {op} | {rows}×{n} | {dtype} | {mode} | copy_ (same run) | {c['copy_ms']:.4g} | "
                     f"{c['copy_gbps']:.1f} | 100 % | | |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Bars of % of copy bandwidth: one panel per (op, mode), groups by shape and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(dict))
    impls = []
    for r in results:
        if "pct_copy" not in r:
            continue
        panels[(r["op"], r["mode"])][f"{r['rows']}×{r['n']}\n{r['dtype']}"][r["impl"]] = r["pct_copy"]
        if r["impl"] not in impls:
            impls.append(r["impl"])
    if not panels:
        return
    keys = sorted(panels)
    most_groups = max(len(v) for v in panels.values())
    figsize = (max(8, 1.6 * most_groups + 3), 3.2 * len(keys))
    fig, axes = plt.subplots(len(keys), 1, figsize=figsize, squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, key in zip(axes[:, 0], keys):
        groups = panels[key]
        labels = list(groups)
        for k, impl in enumerate(impls):
            xs = [g + k * width for g in range(len(labels))]
            ax.bar(xs, [groups[lab].get(impl, 0.0) for lab in labels], width, label=impl)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(labels))], labels, fontsize=8)
        ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel("% of copy_ bandwidth")
        ax.set_title(f"{key[0]} — {key[1]}")
    axes[0, 0].legend(fontsize=8, ncol=min(len(impls), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TORCH, COMPILED = "torch", "compiled reference"
#: the issue's target for RMSNorm against torch's own op, and the smallest call it applies to
RMS_TARGET, RMS_TARGET_FROM = 2.0, (768, 128)


def _ratio(by: dict, other: str, ours: dict) -> str:
    return f"{by[other]['ms'] / ours['ms']:.2f}×" if other in by else "—"


def summary(results: list[dict]) -> str:
    """One row per (op, shape, dtype, mode): normlab's ms next to torch eager's and the compiled
    reference's, its % of copy, its speed-up over each comparison and its peak memory against torch's
    (fwd+bwd). "torch" is ``F.rms_norm`` / ``F.layer_norm`` (after ``x + r`` for the fused ops) and,
    for DyT, the formula in eager mode. RMSNorm gets a second row for normlab with one rounding (the
    numerics of ``F.rms_norm`` and of the compiled reference in bf16/fp16)."""
    groups = _groups(results)
    mine = ("normlab", ONE_ROUNDING)
    others = []
    for recs in groups.values():
        for r in recs:
            if r["impl"] not in (*mine, TORCH, COMPILED) and r["impl"] not in others:
                others.append(r["impl"])
    head = ["op", "shape", "dtype", "mode", "normlab ms", "torch ms", "compiled ms", "% of copy", f"vs {TORCH}",
            f"vs {COMPILED}", *[f"vs {o}" for o in others], "peak MB normlab / torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for (op, rows, n, dtype, mode), recs in groups.items():
        by = {r["impl"]: r for r in recs if "ms" in r}
        for name in mine:
            ours = by.get(name)
            if ours is None:
                continue
            label = op if name == "normlab" else f"{op}, one rounding"
            ms = [f"{by[k]['ms']:.4g}" if k in by else "—" for k in (TORCH, COMPILED)]
            speed = [_ratio(by, o, ours) for o in (TORCH, COMPILED, *others)]
            peak = ""
            if "peak_mb" in ours and TORCH in by and "peak_mb" in by[TORCH]:
                peak = f"{ours['peak_mb']:.2f} / {by[TORCH]['peak_mb']:.2f}"
            lines.append(f"| {label} | {rows}×{n} | {dtype} | {mode} | {ours['ms']:.4g} | {' | '.join(ms)} | "
                         f"{ours['pct_copy']:.0f} % | " + " | ".join(speed) + f" | {peak} |")
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> str:
    """RMSNorm against ``F.rms_norm``, case by case, from :data:`RMS_TARGET_FROM` up (empty without such cases)."""
    smallest = RMS_TARGET_FROM[0] * RMS_TARGET_FROM[1]
    lines, met, total = [], 0, 0
    for (op, rows, n, dtype, mode), recs in _groups(results).items():
        by = {r["impl"]: r for r in recs if "ms" in r}
        if op != "rms_norm" or rows * n < smallest or TORCH not in by or "normlab" not in by:
            continue
        ratios = {name: by[TORCH]["ms"] / by[name]["ms"] for name in ("normlab", ONE_ROUNDING) if name in by}
        ok = ratios["normlab"] >= RMS_TARGET
        met, total = met + ok, total + 1
        shown = ", ".join(f"{name} {v:.2f}×" for name, v in ratios.items())
        lines.append(f"- {'ok' if ok else '**MISS**'} {rows}×{n} {dtype} {mode}: F.rms_norm ms / normlab ms = {shown}")
    if not total:
        return ""
    head = (f"rms_norm against F.rms_norm (target ≥ {RMS_TARGET:g}× from "
            f"{RMS_TARGET_FROM[0]}×{RMS_TARGET_FROM[1]} up): met in {met} of {total} cases")
    return head + "\n\n" + "\n".join(lines) + "\n"


def models_markdown(rows: list[dict]) -> str:
    """The ``--models`` table: one row per (model, dtype, shape); speed-up = torch ms / normlab ms;
    max |Δ logits| between the two on the same input (empty without rows)."""
    if not rows:
        return ""
    lines = [("Whole models (`--models`), torch and normlab sampled round-robin in one process; speed-up = torch ms / "
              "normlab ms; max abs logit diff = the two sides on the same input, before timing."), "",
             ("| model | step | dtype | shape | torch ms | normlab ms | speed-up | max abs logit diff "
              "| normlab modules |"),
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['step']} | {r['dtype']} | {r['shape']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | |")
            continue
        lines.append(f"{head} {r['torch_ms']:.2f} | {r['normlab_ms']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['max_logit_diff']:.3g} | {r['normlab_modules']} |")
    return "\n".join(lines) + "\n"
