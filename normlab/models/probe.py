"""Which normlab module reproduces a norm-like module, decided by its behaviour, not its class name.

A class is read once: its attributes (1-D ``weight`` / ``bias``, an eps attribute, a forward that takes
the input alone, or the input and a ``gate``), then a probe runs a randomised copy of it and each candidate
normlab module on the same inputs, in float32, bfloat16 and float16. A class whose
forward takes ``(hidden_states, gate)`` is probed with a gate (and without, where the gate is optional)
against GatedRMSNorm; one with a ``group_size`` (or ``n_groups``) that splits its width also against
grouped RMSNorm (GatedRMSNorm without a gate). The first candidate that agrees
bitwise on the most probe dtypes, of those within the tolerance rule, wins:
``max|c − r| ≤ 2·max|o − r| + atol`` with the original ``o`` itself within a few ulps of the candidate's
float64 result ``r`` (so a module with another formula cannot pass on its own error). The decision,
or the one-line reason there is none, is cached per class.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re

import torch
from torch import nn

from normlab.nn import GatedRMSNorm, LayerNorm, RMSNorm

EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps", "norm_eps", "rms_norm_eps")
WIDTH_ATTRIBUTES = ("hidden_size", "normalized_shape", "dim", "d_model", "num_features", "embed_dim")
PROBE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}
ULPS = {torch.float32: 64, torch.float64: 64, torch.bfloat16: 2, torch.float16: 2}
GATE_ARGUMENT = "gate"
_NORM_NAME = re.compile(r"RMSNorm|RmsNorm|LayerNorm|Norm$|Norm\d?d$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A normlab module that reproduces a class: ``op`` ``rms_norm`` (with ``casting``, ``offset``),
    ``gated_rms_norm`` (also ``norm_before_gate``; the group size is read from each instance) or
    ``layer_norm``; ``exact``: the 16-bit probe dtypes in which it agreed bitwise (in fp32 another summation
    order decides the last bit, so equality there depends on the input and is not claimed)."""

    op: str
    casting: str = "llama"
    offset: float = 0.0
    exact: tuple[str, ...] = ()
    norm_before_gate: bool = False

    @property
    def family(self) -> str:
        return "layernorm" if self.op == "layer_norm" else "rmsnorm"

    def describe(self) -> str:
        if self.op == "layer_norm":
            return "layer_norm"
        what = f"{self.op}(casting={self.casting!r}, offset={self.offset:g}"
        return what + (f", norm_before_gate={self.norm_before_gate})" if self.op == "gated_rms_norm" else ")")

    def __str__(self) -> str:
        what = self.describe()
        return f"{what}, {'bitwise equal in ' + '/'.join(self.exact) if self.exact else 'within the tolerance rule'}"


@dataclasses.dataclass(frozen=True)
class Decision:
    """``recipe`` and the attribute holding eps (or, for a class that hard-codes it, ``eps``), or
    ``None`` and the reason no normlab module fits."""

    recipe: Recipe | None
    eps_attribute: str | None = None
    eps: float | None = None
    reason: str = ""

    def eps_of(self, m: nn.Module) -> float | None:
        return float(getattr(m, self.eps_attribute)) if self.eps_attribute else self.eps


RMS_CANDIDATES = (Recipe("rms_norm", "llama", 0.0), Recipe("rms_norm", "gemma", 1.0), Recipe("rms_norm", "gemma", 0.0),
                  Recipe("rms_norm", "none", 0.0))
GATED_CANDIDATES = tuple(Recipe("gated_rms_norm", casting, offset, norm_before_gate=before) for before in (False, True)
                         for casting, offset in (("llama", 0.0), ("gemma", 0.0), ("gemma", 1.0)))
#: grouped RMSNorm: a gated norm called without a gate
GROUPED_CANDIDATES = tuple(c for c in GATED_CANDIDATES if not c.norm_before_gate)
#: eps values tried, with the probe's small row telling them apart, for a class with no eps attribute
HARD_CODED_EPS = (1e-5, 1e-6, 1e-8, 1e-12, None)
PROBE_WIDTH = 48  # for a weightless class with no width: it normalizes whatever last dim it gets
_cache: dict[tuple, Decision] = {}


def is_norm_like(m: nn.Module) -> bool:
    """A module whose class name says it normalizes (``*RMSNorm*``, ``*LayerNorm*``, ``…Norm``), normlab's excepted."""
    return _NORM_NAME.search(type(m).__name__) is not None and not type(m).__module__.startswith("normlab.")


def decide(m: nn.Module) -> Decision:
    """The cached decision for ``m``'s class (and which of weight and bias it has)."""
    key = (type(m), getattr(m, "weight", None) is None, getattr(m, "bias", None) is None, _groups_split(m))
    if key not in _cache:
        _cache[key] = _decide(m)
    return _cache[key]


def build(m: nn.Module, decision: Decision) -> nn.Module:
    """The normlab module of ``decision`` for ``m``, sharing its Parameter objects, in its train/eval mode."""
    recipe, eps = decision.recipe, decision.eps_of(m)
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    width = _width(m)
    if recipe.op == "layer_norm" and eps is None:
        eps = 1e-5  # torch's default
    factory = {} if weight is None else dict(device=weight.device, dtype=weight.dtype)
    if recipe.op == "gated_rms_norm":
        new = GatedRMSNorm(width, eps=eps, group_size=group_size(m), norm_before_gate=recipe.norm_before_gate,
                           casting=recipe.casting, offset=recipe.offset, **factory)
    elif recipe.op == "rms_norm":
        new = RMSNorm(width, eps=eps, elementwise_affine=weight is not None, casting=recipe.casting,
                      offset=recipe.offset, **factory)
    else:
        new = LayerNorm(width, eps=eps, elementwise_affine=weight is not None, bias=bias is not None, **factory)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            setattr(new, name, p)
    return new.train(m.training)


def _decide(m: nn.Module) -> Decision:
    params = dict(m.named_parameters(recurse=False))
    if any(True for _ in m.children()):
        return Decision(None, reason="holds submodules (a composite layer, not one norm)")
    extra = sorted(set(params) - {"weight", "bias"})
    if extra:
        return Decision(None, reason=f"has parameters {', '.join(extra)} beyond weight and bias")
    if any(getattr(m, n, None) is not None and getattr(m, n).dim() != 1 for n in ("weight", "bias")):
        return Decision(None, reason="its weight or bias is not 1-D (not a last-dim norm)")
    if len(m._buffers):
        return Decision(None, reason=f"keeps buffers ({', '.join(m._buffers)}): running statistics or state")
    takes = _extra_forward_arguments(m)
    gated = takes == [GATE_ARGUMENT] and getattr(m, "bias", None) is None and getattr(m, "weight", None) is not None
    if takes and not gated:
        return Decision(None, reason=f"its forward takes {', '.join(takes)} besides the input "
                                     "(a gated or conditioned norm)")
    eps_attribute = next((a for a in EPS_ATTRIBUTES if isinstance(getattr(m, a, None), float)), None)
    has_bias = getattr(m, "bias", None) is not None
    candidates = (Recipe("layer_norm"),) if has_bias else (*RMS_CANDIDATES, Recipe("layer_norm"))
    if _width(m) is None:  # weightless and width-free: only RMSNorm takes the input's last dim as it comes
        candidates = RMS_CANDIDATES
    if gated:
        candidates = GATED_CANDIDATES
    elif _groups_split(m) and not has_bias and getattr(m, "weight", None) is not None:
        candidates = (*candidates, *GROUPED_CANDIDATES)
    tries = [Decision(c, eps_attribute) for c in candidates] if eps_attribute else \
        [Decision(c, eps=eps) for eps in HARD_CODED_EPS for c in candidates]
    try:
        results = [(d, _probe(m, d)) for d in tries]
    except Exception as e:  # noqa: BLE001 — any error of foreign code on the probe input is a refusal with its reason
        why = str(e).splitlines()[0][:100] if str(e) else ""
        return Decision(None, reason="does not take a (..., width) input normalized over its last dim "
                                     f"({type(e).__name__}: {why})")
    passing = [(d, exact) for d, (exact, ok, _) in results if ok]
    if passing:
        d, exact = max(passing, key=lambda r: len(r[1]))  # the first of the most bitwise
        return dataclasses.replace(d, recipe=dataclasses.replace(d.recipe, exact=exact))
    best, (_, _, err) = min(results, key=lambda r: r[1][2])
    what = best.recipe.describe()
    prefix = f"its forward takes {GATE_ARGUMENT} besides the input and " if gated else ""
    closest = f"closest: {what}, {err:.2g} × the allowed error"
    return Decision(None, reason=f"{prefix}no normlab formula reproduces its outputs ({closest})")


def _width(m: nn.Module) -> int | None:
    weight = getattr(m, "weight", None)
    if weight is not None:
        return weight.numel()
    for name in WIDTH_ATTRIBUTES:
        v = getattr(m, name, None)
        if isinstance(v, (tuple, list, torch.Size)) and len(v) == 1:
            v = v[0]
        if isinstance(v, int) and v > 0:
            return v
    return None


def group_size(m: nn.Module) -> int | None:
    """The size of the groups ``m`` normalizes: its ``group_size``, or its width over ``n_groups``; None if neither."""
    size = getattr(m, "group_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    groups, width = getattr(m, "n_groups", None), _width(m)
    if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 and width and width % groups == 0:
        return width // groups
    return None


def _groups_split(m: nn.Module) -> bool:
    """Whether ``m`` names a group size that splits its width into more than one group."""
    size, width = group_size(m), _width(m)
    return size is not None and width is not None and size < width


def _gate_optional(m: nn.Module) -> bool:
    try:
        return inspect.signature(m.forward).parameters[GATE_ARGUMENT].default is None
    except (TypeError, ValueError, KeyError):
        return False


def _extra_forward_arguments(m: nn.Module) -> list[str]:
    """The forward's parameters beyond the input (``**kwargs`` excepted)."""
    try:
        sig = inspect.signature(m.forward)
    except (TypeError, ValueError):
        return []
    positional = [p for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return [p.name for p in positional[1:]]


def _probe_inputs(width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of unit scale with a mean (LayerNorm ≠ RMSNorm), a row at 1e-3 (where eps shows), a row near 10."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 4, width, generator=g, dtype=torch.float64) + 0.3
    x[0, 1] *= 1e-3
    x[1, 2] += 10.0
    return x.to(dtype)


def _probe_calls(m: nn.Module, decision: Decision, width: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """The argument tuples the probe calls with: the input; for a gated recipe the input and a gate of unit
    scale (whose silu is far from linear), and the input alone where the gate is optional."""
    x = _probe_inputs(width, dtype)
    if decision.recipe.op != "gated_rms_norm" or GATE_ARGUMENT not in _extra_forward_arguments(m):
        return [(x,)]
    z = (torch.randn(x.shape, generator=torch.Generator().manual_seed(width + 1), dtype=torch.float64) * 2).to(dtype)
    return [(x, z), (x,)] if _gate_optional(m) else [(x, z)]


def _randomised(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``m`` on the CPU in ``dtype`` with random weight and bias (far from their 1 / 0 init)."""
    probe = copy.deepcopy(m).to(device="cpu", dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in probe.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + 0.2)
    return probe


def _probe(m: nn.Module, decision: Decision) -> tuple[tuple[str, ...], bool, float]:
    """(the dtypes where bitwise equal, within the rule in all, worst error / allowed error) over the probe dtypes."""
    # the same dtypes whatever the instance's: the cached decision must not depend on which instance came first
    # (and many classes compute an fp64 input in fp32 on purpose)
    dtypes = PROBE_DTYPES
    exact, ok, worst = [], True, 0.0
    with torch.no_grad():
        for dtype in dtypes:
            original = _randomised(m, dtype)
            candidate = build(original, decision)
            reference = build(copy.deepcopy(original).double(), decision)
            equal = True
            for args in _probe_calls(m, decision, _width(m) or PROBE_WIDTH, dtype):
                x = args[0]
                try:
                    o = original(*args)
                except Exception:
                    if len(args) == 1 and decision.recipe.op == "gated_rms_norm":
                        continue  # a gate optional in the signature only: the original needs one
                    raise
                c = candidate(*args)
                if not (isinstance(o, torch.Tensor) and o.shape == x.shape and o.dtype == x.dtype):
                    return (), False, math.inf
                r = reference(*(a.double() for a in args))
                equal = equal and torch.equal(o, c)
                e_orig = (o.double() - r).abs().max().item()
                e_cand = (c.double() - r).abs().max().item()
                scale = r.abs().max().item()
                allowed_orig = ULPS[dtype] * torch.finfo(dtype).eps * scale + ATOL[dtype]
                allowed_cand = 2 * e_orig + ATOL[dtype]
                ratio = max(e_orig / allowed_orig, e_cand / allowed_cand)
                if not math.isfinite(ratio):
                    ratio = math.inf
                ok = ok and ratio <= 1.0
                worst = max(worst, ratio)
            if equal and dtype.itemsize == 2:
                exact.append(str(dtype).removeprefix("torch."))
    return tuple(exact), ok, worst
