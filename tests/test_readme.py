"""The README's library example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## The library in ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no python block under 'The library in ten lines'"
    return match.group(1)


def test_readme_example_runs_as_written():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12, "the ten-line example grew"
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 — our own README
    x, w = ns["x"], ns["w"]
    for name in ("y", "g", "p", "h", "s", "y_ref"):
        assert ns[name].shape == x.shape and ns[name].dtype == x.dtype, name
    assert torch.equal(ns["s"], x + x)
    torch.testing.assert_close(ns["y_ref"], ns["y"])  # the spec and whichever backend served y
    # the comments' claims: Llama's fp32 upcast, Gemma's (1 + w), pRMSNorm over the first 6.25 %
    h32 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ns["y"], h32.to(x.dtype) * w)
    torch.testing.assert_close(ns["g"], (h32 * (1 + w.float())).to(x.dtype))
    k = x.shape[-1] // 16
    rms_p = x.float()[..., :k].pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).rsqrt()
    torch.testing.assert_close(ns["p"], (x.float() * rms_p).to(x.dtype) * w)
