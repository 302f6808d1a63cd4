"""Packaging facts the README and issue promise: one version, torch pinned for every later install."""

from __future__ import annotations

import tomllib
from pathlib import Path

import normlab

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_python_requirement():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == normlab.__version__
    assert project["requires-python"] == ">=3.11"
    assert any(dep.replace(" ", "").startswith("torch>=2.4") for dep in project["dependencies"])


def test_constraints_pin_the_cpu_torch_the_makefile_installs():
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()]
    assert "torch==2.13.0" in pins
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text(encoding="utf-8")
