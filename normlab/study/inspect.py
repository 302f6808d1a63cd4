"""Geometry of the norm layers of a saved normlab model or a local Hugging Face model directory (the
library behind ``normlab inspect PATH``, whose command line is :mod:`normlab.cli.inspect`).

For every norm layer, on a text sample: ``cos(h, 1) = mean(h)/rms(h)`` of its inputs ``h`` (mean and mean
absolute value over the tokens) against the random baseline ``sqrt(2/π)/sqrt(d)``, the input's RMS, the
placement found from the autograd graph, and statistics of the layer's parameters.

Placement is read off the graph of one forward pass, from the residual sums ``a + b`` in it. A norm whose
*input* is also an operand of a sum is bypassed by the stream: ``pre``. A norm whose *output* is an operand
of a sum is on the residual path: ``post`` when it normalizes a sum itself, ``branch-out`` when it normalizes
a branch's output (sandwich / peri-LN, OLMo 2). A last norm left over is the model's ``final`` norm. Mix-LN
reads as post norms followed by pre norms.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from normlab.analysis import cos_uniform, find_norm_layers, random_baseline

_TRANSPARENT = ("View", "Reshape", "Clone", "ToCopy", "Expand", "Alias", "Unsafe", "MulBackward0", "Identity")


@dataclass
class InspectReport:
    source: str
    kind: str  # "normlab" | "huggingface"
    description: str
    tokens: int
    placement: str
    rows: list[dict] = field(default_factory=list)

    def table(self) -> str:
        from normlab.study.report import text_table

        headers = ["norm layer", "class", "placement", "d", "mean cos(h,1)", "mean |cos|", "|cos|/baseline", "rms(h)",
                   "weight mean±std [min, max]", "bias mean±std"]
        rows = []
        for r in self.rows:
            p = r["params"]
            w = p.get("weight")
            b = p.get("bias")
            rows.append([r["name"], r["class"], r["placement"], r["d"], r["mean_cos"], r["mean_abs_cos"], r["ratio"],
                         r["input_rms"],
                         f"{w['mean']:.3g}±{w['std']:.3g} [{w['min']:.3g}, {w['max']:.3g}]" if w else "-",
                         f"{b['mean']:.3g}±{b['std']:.3g}" if b else "-"])
        return text_table(headers, rows)


def _param_stats(m: nn.Module) -> dict[str, dict[str, float]]:
    out = {}
    for n, p in m.named_parameters(recurse=False):
        t = p.detach().double().reshape(-1)
        out[n] = {"mean": t.mean().item(), "std": t.std(unbiased=False).item(), "min": t.min().item(),
                  "max": t.max().item(), "numel": t.numel()}
    return out


def _skip(node):
    while node is not None and any(k in type(node).__name__ for k in _TRANSPARENT):
        nxt = [n for n, _ in node.next_functions if n is not None and "AccumulateGrad" not in type(n).__name__]
        if len(nxt) != 1:
            break
        node = nxt[0]
    return node


def _residual_sums(nodes) -> list:
    """Every ``AddBackward`` node reachable backwards from ``nodes``: the residual sums, among other adds."""
    seen, stack, adds = set(), [n for n in nodes if n is not None], []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if "AddBackward" in type(node).__name__:
            adds.append(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return adds


def detect_placement(layers: list[tuple[str, nn.Module]], inputs: dict[str, torch.Tensor],
                     outputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per norm layer: ``pre``, ``post``, ``branch-out`` (it normalizes a branch's output: sandwich / peri-LN,
    OLMo 2), ``final`` (a last norm on the stream, before the head) or ``other``, from the autograd graph of
    one forward pass (see the module docstring)."""
    names = [n for n, _ in layers if n in inputs]
    in_node = {n: _skip(inputs[n].grad_fn) for n in names if inputs[n].grad_fn is not None}
    out_node = {n: _skip(outputs[n].grad_fn) for n in names if outputs[n].grad_fn is not None}
    adds = _residual_sums([*in_node.values(), *out_node.values()])
    summed = {id(_skip(n)) for add in adds for n, _ in add.next_functions if n is not None}
    label: dict[str, str] = {}
    post_outputs: set[int] = set()
    for n in names:
        node_in, node_out = in_node.get(n), out_node.get(n)
        sums_input = node_in is not None and "AddBackward" in type(node_in).__name__
        if node_in is not None and id(node_in) in summed:
            label[n] = "pre"  # its input also goes around it, into a sum
        elif node_out is not None and id(node_out) in summed:
            label[n] = "post" if sums_input else "branch-out"
        elif sums_input and any(id(_skip(m)) in post_outputs for m, _ in node_in.next_functions if m is not None):
            label[n] = "post"  # the last post norm: it sums an earlier post norm's output, and feeds the head
        if label.get(n) == "post" and node_out is not None:
            post_outputs.add(id(node_out))
    for i, n in enumerate(names):
        if n not in label:
            label[n] = "final" if i == len(names) - 1 and label else "other"
    return label


def overall_placement(labels: dict[str, str]) -> str:
    values = list(labels.values())
    if "branch-out" in values:
        if "pre" in values:
            return "sandwich (pre + branch-output norms)"
        return "reordered (branch-output norms only, OLMo 2)"
    counts = Counter(v for v in values if v in ("pre", "post"))
    if not counts:
        return "none found"
    (top, n), total = counts.most_common(1)[0], sum(counts.values())
    if n == total:
        return f"{top}-norm"
    order = [v for v in values if v in ("pre", "post")]
    if order == sorted(order, key=lambda v: v == "pre"):  # every post norm before every pre norm
        return f"post then pre (Mix-LN: {counts['post']} post, {counts['pre']} pre)"
    return f"mostly {top}-norm ({n}/{total})"


def inspect_model(model: nn.Module, run, *, source: str = "", kind: str = "", description: str = "",
                  tokens: int = 0) -> InspectReport:
    """Hook every norm layer of ``model``, call ``run()`` (one forward pass, gradients enabled so the graph
    can be read) and build the report."""
    layers = find_norm_layers(model)
    if not layers:
        raise ValueError(f"no normalization layers found in {source or type(model).__name__}")
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def hook(name):
        def f(mod, args, out):
            x = args[0] if isinstance(args, tuple) and args else args
            y = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(x, torch.Tensor) and name not in ins:
                ins[name], outs[name] = x, y
                order.append(name)

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        for p, rg in flags:
            p.requires_grad_(rg)
    labels = detect_placement([(n, m) for n, m in layers if n in ins], ins, outs)
    modules = dict(layers)
    rows = []
    for n in order:
        h = ins[n].detach().reshape(-1, ins[n].shape[-1])
        c = cos_uniform(h)
        d = h.shape[-1]
        rows.append({
            "name": n, "class": type(modules[n]).__name__, "placement": labels[n], "d": d,
            "mean_cos": c.mean().item(), "mean_abs_cos": c.abs().mean().item(), "baseline": random_baseline(d),
            "ratio": c.abs().mean().item() / random_baseline(d), "input_rms": h.double().pow(2).mean().sqrt().item(),
            "params": _param_stats(modules[n]),
        })
    return InspectReport(source, kind, description, tokens, overall_placement(labels), rows)


def default_text() -> str:
    """A sample of English prose: the start of the built-in corpus's validation split."""
    from normlab.study.data import builtin_text

    t = builtin_text()
    start = int(0.9 * len(t))
    return t[start : start + 2000]


def _is_normlab_run(p: Path) -> bool:
    if not (p / "config.json").exists() or not (p / "checkpoint.pt").exists():
        return False
    try:
        return "model" in json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def inspect_path(path: str | Path, text: str | None = None, max_tokens: int = 256) -> InspectReport:
    """Report for a normlab run directory (``config.json`` + ``checkpoint.pt``) or a local Hugging Face
    model directory (``config.json`` with a ``model_type``), loaded offline."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"inspect: no such directory: {p}")
    if not p.is_dir():
        raise ValueError(f"inspect: expected a model directory (normlab run or Hugging Face model), got a file: {p}")
    text = text if text is not None else default_text()
    if not text:
        raise ValueError("inspect: the text sample is empty")
    if _is_normlab_run(p):
        return _inspect_normlab(p, text, max_tokens)
    from normlab.models.serialization import is_normlab_dir

    if is_normlab_dir(p):
        return _inspect_saved(p, text, max_tokens)
    cfg = p / "config.json"
    if cfg.exists() and "model_type" in cfg.read_text():
        return _inspect_hf(p, text, max_tokens)
    raise ValueError(f"inspect: {p} is neither a normlab run directory (config.json with 'model' + checkpoint.pt) "
                     "nor a Hugging Face model directory (config.json with 'model_type')")


def _run_corpus(run_dir: Path):
    from normlab.study.config import RunConfig
    from normlab.study.data import load_corpus

    rc = RunConfig(**json.loads((run_dir / "config.json").read_text()))
    return rc, load_corpus(None if rc.data.startswith("builtin:") else rc.data)


def _inspect_normlab(p: Path, text: str, max_tokens: int) -> InspectReport:
    from normlab.study.train import RunResult

    rc, corpus = _run_corpus(p)
    model = RunResult(p.name, p, rc, {}).load_model()
    return _inspect_gpt(model, corpus, text, max_tokens, str(p))


def _inspect_saved(p: Path, text: str, max_tokens: int) -> InspectReport:
    """A ``save_pretrained`` directory; its characters come from the run directory around it, else from
    the built-in corpus when the vocabulary size matches."""
    from normlab.models.serialization import load_pretrained
    from normlab.study.data import load_corpus

    model = load_pretrained(p).eval()
    if _is_normlab_run(p.parent):
        corpus = _run_corpus(p.parent)[1]
    else:
        corpus = load_corpus()
        if corpus.vocab_size != model.config.vocab_size:
            raise ValueError(f"inspect: {p} has no vocabulary (vocab_size {model.config.vocab_size}, "
                             f"the built-in corpus has {corpus.vocab_size}); "
                             "inspect the study run directory that holds it instead")
    return _inspect_gpt(model, corpus, text, max_tokens, str(p))


def _inspect_gpt(model: nn.Module, corpus, text: str, max_tokens: int, source: str) -> InspectReport:
    c = model.config
    known = "".join(ch for ch in text if ch in corpus.stoi)
    block = c.block_size
    ids = corpus.encode(known[: min(max_tokens, (len(known) // block) * block or len(known))])
    if len(ids) == 0:
        raise ValueError("inspect: the text sample has no character of the model's vocabulary")
    x = ids[: (len(ids) // block) * block].view(-1, block) if len(ids) >= block else ids.view(1, -1)
    desc = f"normlab GPT {c.norm}-{c.placement}, {c.n_layer} layers, d={c.d_model}"
    return inspect_model(model, lambda: model(x), source=source, kind="normlab", description=desc, tokens=x.numel())


@contextlib.contextmanager
def _offline():
    """Hugging Face offline while loading (unless the caller chose otherwise); the environment as it was after."""
    names = [n for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if n not in os.environ]
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for n in names:
            os.environ.pop(n, None)


def _inspect_hf(p: Path, text: str, max_tokens: int) -> InspectReport:
    with _offline():
        return _load_and_inspect_hf(p, text, max_tokens)


def _load_and_inspect_hf(p: Path, text: str, max_tokens: int) -> InspectReport:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            "inspect: loading a Hugging Face model needs `transformers` (pip install 'normlab[hf]')") from e
    no_tokenizer = (f"{p}: no usable tokenizer in this directory (a model saved without its tokenizer: "
                    "save the tokenizer beside it, e.g. tokenizer.save_pretrained(dir))")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{no_tokenizer}; transformers said: {str(e).splitlines()[0]}") from None
    model = AutoModel.from_pretrained(p, local_files_only=True).eval()
    enc = tok(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    if enc["input_ids"].numel() == 0:
        raise ValueError(f"{no_tokenizer}; it turned the text into no tokens")
    desc = f"{type(model).__name__} ({model.config.model_type}), {model.num_parameters():,} parameters"
    return inspect_model(model, lambda: model(**enc), source=str(p), kind="huggingface", description=desc,
                         tokens=int(enc["input_ids"].numel()))
