"""Forward/backward hooks on normalization modules: activation statistics and time spent inside them."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Self

import torch
from torch import nn

from normlab.analysis.geometry import cos_uniform

_NORM_CLASS_HINTS = ("norm", "dyt")


def find_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.norm_layers()`` when the model has it (normlab models), else every module whose class name
    contains "Norm" (torch, Hugging Face) or is DyT — leaves only, in registration order."""
    if hasattr(model, "norm_layers"):
        return [(n, m) for n, m in model.norm_layers() if not isinstance(m, nn.Identity)]
    out = []
    for name, m in model.named_modules():
        cls = type(m).__name__.lower()
        if any(h in cls for h in _NORM_CLASS_HINTS) and not any(True for _ in m.children()):
            out.append((name, m))
    return out


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def tensor_stats(x: torch.Tensor) -> dict[str, float]:
    """Statistics of a batch of vectors (last dim = features): mean, std, rms, max|x|, mean cos(x, 1)
    and mean |cos(x, 1)|."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    c = cos_uniform(x)
    return {
        "mean": x.mean().item(),
        "std": x.std(unbiased=False).item(),
        "rms": x.pow(2).mean().sqrt().item(),
        "max_abs": x.abs().max().item(),
        "cos": c.mean().item(),
        "abs_cos": c.abs().mean().item(),
    }


class ActivationStats:
    """Records :func:`tensor_stats` of the input and output of every norm layer on each forward.

    ``with ActivationStats(model) as rec: model(x)`` then ``rec.summary()`` → ``{layer: {"in": …,
    "out": …}}`` (averaged over the calls); ``rec.inputs[layer]`` keeps the raw inputs when
    ``keep_inputs=True``. ``rec.order`` is the order in which the layers ran.
    """

    def __init__(self, model: nn.Module, layers: Iterable[tuple[str, nn.Module]] | None = None, *,
                 keep_inputs: bool = False):
        self.layers = list(layers) if layers is not None else find_norm_layers(model)
        self.keep_inputs = keep_inputs
        self.records: dict[str, list[dict]] = defaultdict(list)
        self.inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.order: list[str] = []
        self._handles = []

    def __enter__(self) -> Self:
        for name, m in self.layers:
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x, y = _first_tensor(inputs), _first_tensor(output)
            if x is None or y is None:
                return
            if name not in self.order:
                self.order.append(name)
            self.records[name].append({"in": tensor_stats(x), "out": tensor_stats(y)})
            if self.keep_inputs:
                self.inputs[name].append(x.detach().clone())

        return hook

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        out = {}
        for name in self.order:
            recs = self.records[name]
            out[name] = {
                side: {k: sum(r[side][k] for r in recs) / len(recs) for k in recs[0][side]} for side in ("in", "out")
            }
        return out


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors of a module call's arguments or output (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


# A module whose backward spans more autograd nodes than this is timed by the nodes of its outputs only.
_MAX_MODULE_NODES = 64


def module_nodes(args, output) -> tuple[list, list]:
    """(roots, nodes): the autograd nodes a module call created, found from its outputs' ``grad_fn`` back to
    its inputs' nodes and the parameters' gradient accumulators; roots are its outputs' nodes."""
    outside = {id(t.grad_fn) for t in _tensors(args) if t.grad_fn is not None}
    roots = {id(n): n for n in (t.grad_fn for t in _tensors(output)) if n is not None and id(n) not in outside}
    nodes, todo = {}, list(roots.values())
    while todo:
        node = todo.pop()
        if id(node) in nodes or id(node) in outside or hasattr(node, "variable"):  # variable: an AccumulateGrad
            continue
        nodes[id(node)] = node
        if len(nodes) > _MAX_MODULE_NODES:
            return list(roots.values()), list(roots.values())
        todo.extend(n for n, _ in node.next_functions if n is not None)
    return list(roots.values()), list(nodes.values())


class NormTimer:
    """Wall time spent inside norm modules (forward and backward), via hooks.

    Forward: from the module's forward pre-hook to its forward hook. Backward: from the moment the first of
    the autograd nodes its forward created starts to the moment the last of them is done, with hooks on those
    nodes (:func:`module_nodes`) — the module's inputs and outputs are not wrapped (as full backward hooks
    do), so the timer adds little to the step it times. The caller times the whole step;
    ``rest = step_time − norm_time``.
    """

    def __init__(self, model: nn.Module, layers: Iterable[tuple[str, nn.Module]] | None = None, *,
                 backward: bool = True):
        self.layers = list(layers) if layers is not None else find_norm_layers(model)
        self.backward = backward
        self.forward_s = 0.0
        self.backward_s = 0.0
        self._t0: dict[int, float] = {}
        self._handles = []

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    def reset(self) -> None:
        self.forward_s = self.backward_s = 0.0

    def __enter__(self) -> Self:
        for _, m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._forward_start))
            self._handles.append(m.register_forward_hook(self._forward_done, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_start(self, module: nn.Module, args) -> None:
        self._t0[id(module)] = time.perf_counter()

    def _forward_done(self, module: nn.Module, args, kwargs, output) -> None:
        t0 = self._t0.pop(id(module), None)
        if t0 is not None:
            self.forward_s += time.perf_counter() - t0
        if self.backward and torch.is_grad_enabled():
            self._time_backward(*module_nodes((args, kwargs), output))

    def _time_backward(self, roots: list, nodes: list) -> None:
        state = {"t0": None, "left": 0}

        def started(grad_outputs) -> None:
            if state["t0"] is None:
                state["t0"], state["left"] = time.perf_counter(), len(nodes)

        def done(grad_inputs, grad_outputs) -> None:
            state["left"] -= 1
            if state["left"] == 0 and state["t0"] is not None:
                self.backward_s += time.perf_counter() - state["t0"]
                state["t0"] = None

        for node in roots:
            node.register_prehook(started)
        for node in nodes:
            node.register_hook(done)
