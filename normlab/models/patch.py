"""``normlab.patch(model)``: swap the norm layers of any ``nn.Module`` for normlab modules that compute
the same thing (with normlab's fast kernels); ``normlab.unpatch(model)`` puts the originals back.

The replacement *shares* the original's Parameter and buffer objects, so weights, dtype, device — and
later training updates — are one and the same.

- torch's own norms by their exact class: ``nn.LayerNorm`` → LayerNorm, ``nn.RMSNorm`` →
  RMSNorm(casting="gemma") (= F.rms_norm: fp32 throughout), ``nn.BatchNorm1d`` → BatchNorm(layout="NCL")
  (running statistics shared), ``nn.GroupNorm`` → GroupNorm. Other torch norms have no counterpart.
- Every other module whose class name says it normalizes (``*RMSNorm*``, ``*LayerNorm*``, ``…Norm``),
  Hugging Face's included, by behaviour (:mod:`normlab.models.probe`): attributes, then a probe of a
  randomised copy against each candidate (RMSNorm with casting ``llama`` / ``gemma`` / ``none`` and
  offset 0 or Gemma's 1, LayerNorm), in float32 and bfloat16. Decided once per class; a subclass with
  its own forward is probed like any class. transformers is never imported.

What is not replaced is in the report, one line and a reason per class. ``target`` picks the families:
``"fast"`` (all), ``"layernorm"``, ``"rmsnorm"``, ``"batchnorm"``, ``"groupnorm"``.

Known differences: Hugging Face's Llama/Gemma/T5 norms compute in float32 even for float64 inputs
(normlab computes fp64 in fp64, so a patched fp64 model is *more* accurate, ≈1e-7 away); with a
float32 weight on a bf16/fp16 input, LlamaRMSNorm returns float32 where normlab returns the input
dtype. Forward hooks registered on an original module do not move to its replacement.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from normlab.models import probe
from normlab.nn import BatchNorm, GroupNorm, LayerNorm, RMSNorm

TARGETS = ("fast", "layernorm", "rmsnorm", "batchnorm", "groupnorm")
_RECORD = "_normlab_patches"  # attribute on the patched root: [(parent, child name, original module)]


def _shared(new: nn.Module, old: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """``new`` using ``old``'s Parameter/buffer objects for ``names``, in ``old``'s train/eval mode."""
    for name in names:
        value = getattr(old, name, None)
        if value is not None or getattr(new, name, None) is not None:
            setattr(new, name, value)
    return new.train(old.training)


def _factory(p: torch.Tensor | None) -> dict:
    return {} if p is None else dict(device=p.device, dtype=p.dtype)


def _layer_norm(m: nn.LayerNorm) -> nn.Module:
    new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                    bias=m.bias is not None, **_factory(m.weight))
    return _shared(new, m, ("weight", "bias"))


def _torch_rms_norm(m: nn.RMSNorm) -> nn.Module:
    new = RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, casting="gemma",
                  **_factory(m.weight))
    return _shared(new, m, ("weight",))


def _batch_norm(m: nn.BatchNorm1d) -> nn.Module:
    new = BatchNorm(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                    track_running_stats=m.track_running_stats, layout="NCL", **_factory(m.weight))
    return _shared(new, m, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))


def _group_norm(m: nn.GroupNorm) -> nn.Module:
    new = GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine, **_factory(m.weight))
    return _shared(new, m, ("weight", "bias"))


def _rule(m: nn.Module) -> tuple[str, Callable[[], nn.Module] | str] | None:
    """(family, build replacement) for a module normlab reproduces, ("refused", reason) for a norm-like
    module it does not, None for anything else."""
    t = type(m)
    if t is nn.LayerNorm:
        return "layernorm", lambda: _layer_norm(m)
    if t is nn.RMSNorm:
        return "rmsnorm", lambda: _torch_rms_norm(m)
    if t is nn.BatchNorm1d:
        return "batchnorm", lambda: _batch_norm(m)
    if t is nn.GroupNorm:
        return "groupnorm", lambda: _group_norm(m)
    if not probe.is_norm_like(m):
        return None
    if t.__module__.startswith("torch.nn."):
        return "refused", f"torch.nn.{t.__name__} has no normlab counterpart"
    decision = probe.decide(m)
    if decision.recipe is None:
        return "refused", decision.reason
    return decision.recipe.family, lambda: probe.build(m, decision)


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` = [(qualified name, original class, normlab class)];
    ``refused`` = [(qualified name, class, why no normlab module reproduces it)]."""

    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    refused: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    @property
    def reasons(self) -> dict[str, str]:
        """``{class: reason}`` of the refused classes."""
        return {cls: why for _, cls, why in self.refused}

    @property
    def counts(self) -> dict[str, int]:
        """``{"LayerNorm → LayerNorm": n, …}``"""
        return dict(Counter(f"{a} → {b}" for _, a, b in self.replaced))

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"normlab.patch: {len(self.replaced)} modules replaced" if self.replaced
                 else "normlab.patch: nothing replaced"]
        lines += [f"  {n:4d} × {what}" for what, n in self.counts.items()]
        if self.refused:
            lines.append(f"  not replaced ({len(self.refused)} modules):")
            per_class = Counter(cls for _, cls, _ in self.refused)
            lines += [f"  {per_class[cls]:4d} × {cls}: {why}" for cls, why in self.reasons.items()]
        return "\n".join(lines)


def patch(model: nn.Module, *, target: str = "fast") -> PatchReport:
    """Replace, in place, every norm module of ``model`` that normlab implements exactly (see the
    module docstring) by its normlab counterpart sharing the same parameters; returns a report.
    A module shared by several parents gets one replacement. Reversible with :func:`unpatch`."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    if _rule(model) is not None:
        raise ValueError(f"the model itself is a {type(model).__name__}: patch the module that holds it")
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
    report, record, replacement, seen = PatchReport(), [], {}, set()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            rule = _rule(child)
            if rule is not None and rule[0] == "refused":
                if id(child) not in seen:
                    seen.add(id(child))
                    report.refused.append((names[id(child)], type(child).__name__, rule[1]))
                continue
            if rule is None or (target != "fast" and rule[0] != target):
                continue
            if id(child) not in replacement:
                replacement[id(child)] = rule[1]()
                report.replaced.append((names[id(child)], type(child).__name__, type(replacement[id(child)]).__name__))
            setattr(parent, child_name, replacement[id(child)])
            record.append((parent, child_name, child))
    if record:
        model.__dict__.setdefault(_RECORD, []).append(record)
    return report


def unpatch(model: nn.Module) -> int:
    """Undo every :func:`patch` of ``model`` (latest first), putting the original module objects back;
    returns how many slots were restored. Raises ``ValueError`` if the model was never patched."""
    records = model.__dict__.pop(_RECORD, None)
    if not records:
        raise ValueError(f"{type(model).__name__} has no normlab patch to undo")
    n = 0
    for record in reversed(records):
        for parent, child_name, original in reversed(record):
            setattr(parent, child_name, _hand_back(original, getattr(parent, child_name)))
            n += 1
    return n


def _hand_back(original: nn.Module, replacement: nn.Module) -> nn.Module:
    """``original``, carrying over what happened to its replacement while patched: the tensors that
    ``.to()`` / ``.double()`` put in place of the shared ones (buffers always; parameters when torch is
    set to overwrite them on conversion) and the train/eval mode."""
    for store in ("_parameters", "_buffers"):
        mine, theirs = getattr(original, store), getattr(replacement, store)
        for name in mine:
            if isinstance(theirs.get(name), torch.Tensor):
                mine[name] = theirs[name]
    return original.train(replacement.training)
