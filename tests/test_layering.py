"""The layering of docs/architecture.md, checked on the source: a lower layer never imports a higher one,
and ``import normlab`` loads neither argparse nor the command line.

Layers, bottom to top: dispatch (with leaf utilities that import nothing of normlab); ops and kernels;
nn; models; analysis; study and bench; cli. Ops and kernels share a layer but never import each other:
kernels are plug-ins that dispatch loads by name and that register themselves with it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normlab"

LAYERS = ("dispatch", "ops and kernels", "nn", "models", "analysis", "study and bench", "cli")

#: module (or package) name → layer; the longest matching prefix wins
PLACES = {
    "normlab.dispatch": "dispatch",
    "normlab._machine": "dispatch",  # a leaf utility: imports nothing of normlab
    "normlab.ops": "ops and kernels",
    "normlab.functional": "ops and kernels",  # re-exports normlab.ops
    "normlab.kernels": "ops and kernels",
    "normlab.nn": "nn",
    "normlab.models": "models",
    # the package's own __init__ re-exports ops and models (patch, convert): it sits with its highest import
    "normlab": "models",
    "normlab.analysis": "analysis",
    "normlab.study": "study and bench",
    "normlab.bench": "study and bench",
    "normlab.cli": "cli",
    "normlab.__main__": "cli",  # entry points (python -m …) are command line, whatever package they sit in
    "normlab.bench.__main__": "cli",
}

#: pairs of one layer that must not import each other: (importer prefix, imported prefix)
SAME_LAYER_FORBIDDEN = [("normlab.ops", "normlab.kernels"), ("normlab.functional", "normlab.kernels"),
                        ("normlab.kernels", "normlab.ops"), ("normlab.kernels", "normlab.functional")]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> str:
    """The layer of a normlab module; a module placed nowhere is an error (place new packages above)."""
    best = max((p for p in PLACES if _within(module, p) and (p != "normlab" or module == "normlab")), key=len,
               default=None)
    if best is None:
        raise LookupError(f"{module} is in no layer of tests/test_layering.py's PLACES")
    return PLACES[best]


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted name, is a package) of a file under normlab/."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports_of(module: str, is_package: bool, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported normlab module) for every import in ``source``, top-level or inside functions:
    ``import a.b``, ``from a import b`` (``a.b`` when that is a module), relative imports and
    ``importlib.import_module("literal")``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def resolve(level: int, target: str | None) -> str:
        if not level:
            return target or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)] if level > 1 else base
        return ".".join([*base, *([target] if target else [])])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.level, node.module)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in known else base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id == "import_module")):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = resolve(level, name.lstrip(".") or None)
            found.append((node.lineno, name))
    return sorted({(line, name) for line, name in found if _within(name, "normlab")})


def violations(module: str, is_package: bool, source: str, known: set[str], where: str = "") -> list[str]:
    """Every import of ``source`` that goes from ``module``'s layer into a higher one, or across a
    forbidden pair of one layer; each message names the module, the line and both layers."""
    here = layer_of(module)
    out = []
    for line, target in imports_of(module, is_package, source, known):
        there = layer_of(target)
        if LAYERS.index(there) > LAYERS.index(here):
            out.append(f"{where or module}:{line}: {module} ({here}) imports {target} ({there}), a higher layer")
        elif any(_within(module, a) and _within(target, b) for a, b in SAME_LAYER_FORBIDDEN):
            out.append(f"{where or module}:{line}: {module} imports {target}: ops and kernels meet only through "
                       "normlab.dispatch")
    return out


def _modules() -> dict[str, tuple[Path, bool]]:
    return {name: (path, is_package) for path in sorted(PACKAGE.rglob("*.py"))
            for name, is_package in [module_name(path)]}


def test_no_import_from_a_lower_layer_into_a_higher_one():
    modules = _modules()
    assert {"normlab.dispatch", "normlab.ops", "normlab.cli", "normlab.study.inspect"} <= set(modules)
    found = []
    for name, (path, is_package) in modules.items():
        found += violations(name, is_package, path.read_text(encoding="utf-8"), set(modules),
                            where=str(path.relative_to(PACKAGE.parent)))
    assert not found, "\n".join(found)



def test_argument_types_import_nothing_of_normlab():
    """The argparse types stand alone: importing them loads no other part of normlab."""
    modules = _modules()
    path, is_package = modules["normlab.cli.argtypes"]
    assert imports_of("normlab.cli.argtypes", is_package, path.read_text(encoding="utf-8"), set(modules)) == []

@pytest.mark.parametrize("module, is_package, source, expected", [
    ("normlab.models.gpt", False, "def f():\n    from normlab.study import run_study\n",
     "normlab.models.gpt:2: normlab.models.gpt (models) imports normlab.study (study and bench), a higher layer"),
    ("normlab.models.convert", False, "from ..cli import argtypes\n",
     "imports normlab.cli.argtypes (cli), a higher layer"),
    ("normlab.study", True, "from . import inspect\nfrom .. import cli\n", "imports normlab.cli (cli)"),
    ("normlab.nn", True, "import importlib\nimportlib.import_module('normlab.models.gpt')\n",
     "normlab.nn:2: normlab.nn (nn) imports normlab.models.gpt (models)"),
    ("normlab.ops.rms_norm", False, "from normlab import __version__\n", "imports normlab (models)"),
    ("normlab.ops.rms_norm", False, "from normlab.kernels import cpu\n", "meet only through normlab.dispatch"),
    ("normlab.dispatch", False, "import normlab.kernels.cpu\n", "(dispatch) imports normlab.kernels.cpu"),
])
def test_the_checker_reports_a_bad_import(module, is_package, source, expected):
    found = violations(module, is_package, source, set(_modules()))
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_imports_downwards_and_by_name():
    known = set(_modules())
    source = ("from normlab import dispatch\nfrom . import gpt\nimport normlab.nn\n"
              "def f(m):\n    import importlib\n    importlib.import_module(m)\n")
    assert violations("normlab.models.convert", False, source, known) == []
    assert imports_of("normlab.models.convert", False, source, known) == [
        (1, "normlab.dispatch"), (2, "normlab.models.gpt"), (3, "normlab.nn")]
    with pytest.raises(LookupError, match="normlab.newpkg is in no layer"):
        violations("normlab.newpkg", False, "", known)


# Run in a fresh interpreter: torch itself imports argparse (through unittest), so the check starts after
# torch, removes argparse and refuses any later import of it or of the command line.
_LIBRARY_ONLY = r"""
import sys
import torch

for name in [m for m in sys.modules if m == "argparse" or m.startswith("argparse.")]:
    del sys.modules[name]


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "argparse" or name == "normlab.cli" or name.startswith("normlab.cli."):
            raise ImportError(f"importing normlab as a library imported {name}")
        return None


sys.meta_path.insert(0, Refuse())

import normlab
import normlab.analysis
import normlab.bench
import normlab.bench.cases
import normlab.models
import normlab.models.convert
import normlab.nn
import normlab.study
import normlab.study.inspect

x = torch.randn(3, 8)
y = normlab.rms_norm(x, (8,), torch.ones(8))
assert torch.allclose(normlab.nn.RMSNorm(8)(x), y)
gpt = normlab.models.GPT(normlab.models.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, d_model=8))
rep = normlab.study.inspect.inspect_model(gpt, lambda: gpt(torch.zeros(1, 8, dtype=torch.long)))
assert rep.placement == "pre-norm", rep.placement
assert normlab.analysis.cos_uniform(x).shape == (3,)
assert normlab.study.StudyConfig(steps=3).steps == 3
try:
    normlab.bench.benchmark(run_ops=False)
except normlab.bench.BenchArgumentError:
    pass
else:
    raise AssertionError("benchmark(run_ops=False) ran")
loaded = sorted(m for m in sys.modules if m == "argparse" or m.startswith("normlab.cli"))
assert not loaded, loaded
print("library only")
"""


def test_import_normlab_loads_no_command_line():
    done = subprocess.run([sys.executable, "-c", _LIBRARY_ONLY], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "library only", done.stderr[-3000:]
