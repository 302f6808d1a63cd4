"""``normlab bench --models``: whole models, normlab against torch, in one process.

- ``study``: a training step (forward, backward, AdamW step) of the study's default GPT
  (``normlab.models.GPT`` built as the study builds it, at :class:`~normlab.study.config.StudyConfig`'s
  default sizes and batch; the LayerNorm and RMSNorm pre-norm variants) with normlab's norms, against a
  copy of it whose norms are torch.nn modules holding the same values (:func:`with_torch_norms`).
- ``nanogpt``: the training step of a small torch.nn GPT written here (:class:`NanoGPT`, with
  ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm``, the study model's sizes), ``normlab.patch``-ed
  against unpatched.
- ``llama``: a Hugging Face ``LlamaForCausalLM`` with random weights, under ``torch.inference_mode``, in
  fp32 and bf16: the forward of a batch of sequences, and a one-token decode step after a cached
  prefix; ``normlab.patch``-ed against unpatched, both sharing the same weight tensors.

The two sides of each row are sampled round-robin by :func:`normlab.bench.timing.interleaved_medians` (the
op ladder's rule: medians of ``samples`` samples of at least ``min_time`` each); the max |logit
difference| between them on the same input is taken before the timing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import normlab

#: the Llama-style model of the issue (Llama's vocabulary; random init)
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024)


@dataclass(frozen=True)
class Sizes:
    """What ``--models`` builds. ``None`` for the GPT sizes means the study's default
    (:class:`~normlab.study.config.StudyConfig`, its corpus's vocabulary)."""

    vocab_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    block_size: int | None = None
    batch_size: int | None = None
    llama: dict = field(default_factory=lambda: dict(LLAMA))
    llama_batches: tuple[tuple[int, int], ...] = ((4, 256),)  # (batch, sequence) of the forward rows
    llama_prefix: int = 255  # tokens in the KV cache before the decode step (0: a lone token)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # of the Llama rows; the training steps are fp32


#: ``--quick``: a shorter Llama forward (one sequence of 128) and prefix; the rest as in a full run
QUICK = Sizes(llama_batches=((1, 128),), llama_prefix=127)


# ---- the study GPT, with normlab's norms or torch.nn's ---------------------------------------------
class TorchRMSNormWithBias(nn.RMSNorm):
    """``torch.nn.RMSNorm`` followed by ``+ bias``: the torch.nn twin of the study's RMSNorm with a bias."""

    def __init__(self, d: int, eps: float, weight: nn.Parameter, bias: nn.Parameter):
        super().__init__(d, eps=eps, device=weight.device, dtype=weight.dtype)
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


def _torch_twin(m: nn.Module) -> nn.Module | None:
    """The torch.nn module computing what normlab module ``m`` does (in fp32), with ``m``'s parameters;
    None for anything that is not a norm."""
    from normlab.models.norms import RMSNormWithBias
    from normlab.nn import LayerNorm, RMSNorm

    if type(m) is LayerNorm:
        new = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                           bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        new.weight, new.bias = m.weight, m.bias
        return new
    if type(m) in (RMSNorm, RMSNormWithBias):
        if m.offset != 0.0 or m.partial is not None or not m.elementwise_affine:
            raise ValueError(f"no torch.nn twin for {m!r}")
        if type(m) is RMSNormWithBias:
            return TorchRMSNormWithBias(m.normalized_shape, m.eps, m.weight, m.bias)
        new = nn.RMSNorm(m.normalized_shape, eps=m.eps, device=m.weight.device, dtype=m.weight.dtype)
        new.weight = m.weight
        return new
    if type(m).__module__.startswith("normlab.") and "norm" in type(m).__name__.lower():
        raise ValueError(f"no torch.nn twin for {type(m).__name__}")
    return None


def with_torch_norms(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose normlab LayerNorm / RMSNorm modules are torch.nn ones with the same
    values (casting modes agree in fp32, the dtype the study trains in)."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            new = _torch_twin(child)
            if new is not None:
                setattr(parent, name, new.train(child.training))
    return twin


def study_settings(sizes: Sizes) -> tuple:
    """The :class:`~normlab.study.config.StudyConfig` of ``sizes`` (its defaults where ``sizes`` says
    None) and the settings of the training step: lr, weight decay, batch, sequence, vocabulary."""
    from normlab.study.config import StudyConfig
    from normlab.study.data import load_corpus

    cfg = StudyConfig(**{k: getattr(sizes, k) for k in ("n_layer", "n_head", "d_model", "block_size")
                         if getattr(sizes, k) is not None})
    step = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch=sizes.batch_size or cfg.batch_size,
                seq=cfg.block_size, vocab=sizes.vocab_size or load_corpus(cfg.data).vocab_size)
    return cfg, step


def study_gpt(norm: str, sizes: Sizes) -> tuple[nn.Module, dict]:
    """The study's GPT for the variant ``<norm>-pre`` (the study's own ``model_config``), seeded as the
    study seeds it, and the settings of its training step (:func:`study_settings`)."""
    from normlab.models import GPT, GPTConfig
    from normlab.study.experiments import model_config

    cfg, step = study_settings(sizes)
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig.from_dict(model_config(cfg, step["vocab"], f"{norm}-pre"))), step


# ---- a torch.nn nanoGPT ------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, n_head: int, norm: Callable[[], nn.Module]):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = norm(), norm()
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """A pre-norm GPT in plain torch.nn (nanoGPT's layout: learned positions, GELU MLP, tied
    embeddings), its norms ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm``; returns ``(logits, loss)``."""

    def __init__(self, norm: str, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int):
        super().__init__()
        make = {"layernorm": lambda: nn.LayerNorm(d_model), "rmsnorm": lambda: nn.RMSNorm(d_model, eps=1e-5)}[norm]
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList([_Block(d_model, n_head, make) for _ in range(n_layer)])
        self.ln_f = make()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# ---- timing ------------------------------------------------------------------------------------------
def _train_step(model: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor, targets: torch.Tensor):
    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()

    return step


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _modules(report) -> str:
    return "; ".join(f"{n} × {what}" for what, n in report.counts.items()) or "none"


def _timed(model: str, step: str, dtype: str, shape: str, fns: dict[str, Callable], max_diff: float,
           modules: str, samples: int, min_time: float) -> dict:
    """One row: torch and normlab sampled round-robin."""
    from normlab.bench.timing import interleaved_medians

    row = dict(model=model, step=step, dtype=dtype, shape=shape, normlab_modules=modules)
    calls: dict[str, int] = {}
    timed = interleaved_medians(fns, lambda: None, samples, min_time, calls)
    errors = [f"{name}: {type(v).__name__}: {str(v).splitlines()[0][:200]}"
              for name, v in timed.items() if isinstance(v, Exception)]
    if errors:
        row["error"] = "; ".join(errors)
    else:
        row.update(torch_ms=timed["torch"] * 1e3, normlab_ms=timed["normlab"] * 1e3,
                   speedup=timed["torch"] / timed["normlab"], max_logit_diff=max_diff, calls_per_sample=calls)
    print(f"  {model:28s} {step:18s} {dtype:8s} {shape:16s} "
          + (row.get("error") or f"torch {row['torch_ms']:.4g} ms, normlab {row['normlab_ms']:.4g} ms, "
                                 f"×{row['speedup']:.2f}, max |Δ logits| {max_diff:.3g}"), flush=True)
    return row


def _training_pair(name: str, torch_side: nn.Module, normlab_side: nn.Module, modules: str, step: dict,
                   samples: int, min_time: float) -> dict:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, step["vocab"], (step["batch"], step["seq"]), generator=g)
    targets = torch.randint(0, step["vocab"], (step["batch"], step["seq"]), generator=g)
    with torch.no_grad():
        diff = _max_diff(torch_side(idx)[0], normlab_side(idx)[0])
    fns = {side: _train_step(m, _optimizer(m, step["lr"], step["weight_decay"]), idx, targets)
           for side, m in (("torch", torch_side), ("normlab", normlab_side))}
    shape = f"{step['batch']}×{step['seq']}"
    return _timed(name, "train step", "float32", shape, fns, diff, modules, samples, min_time)


def study_rows(sizes: Sizes, samples: int, min_time: float) -> list[dict]:
    rows = []
    for norm in ("layernorm", "rmsnorm"):
        ours, step = study_gpt(norm, sizes)
        theirs = with_torch_norms(ours)
        kinds = sorted({type(m).__name__ for _, m in ours.norm_layers()})
        modules = f"{len(ours.norm_layers())} × {'/'.join(kinds)} (torch side: torch.nn)"
        rows.append(_training_pair(f"study GPT, {norm}", theirs, ours, modules, step, samples, min_time))
    return rows


def nanogpt_rows(sizes: Sizes, samples: int, min_time: float) -> list[dict]:
    cfg, step = study_settings(sizes)  # the study model's sizes and batch
    rows = []
    for norm, cls in (("layernorm", "torch.nn.LayerNorm"), ("rmsnorm", "torch.nn.RMSNorm")):
        torch.manual_seed(cfg.seed)
        theirs = NanoGPT(norm, step["vocab"], cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model)
        ours = copy.deepcopy(theirs)
        report = normlab.patch(ours)
        rows.append(_training_pair(f"nanoGPT, {cls}", theirs, ours, _modules(report), step, samples, min_time))
    return rows


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s modules holding the very same Parameter objects (no second set of weights)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def llama_rows(sizes: Sizes, samples: int, min_time: float) -> list[dict]:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:  # noqa: BLE001 — not installed, or broken against this torch: one row says so
        return [dict(model="Llama (Hugging Face)", step="forward", dtype="—", shape="—", error=f"transformers: {exc}")]
    config = LlamaConfig(**sizes.llama)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    layers, hidden = config.num_hidden_layers, config.hidden_size
    name = f"Llama {layers}L d{hidden} (HF, random)"
    g = torch.Generator().manual_seed(0)
    longest = max([s for _, s in sizes.llama_batches] + [sizes.llama_prefix + 1])
    tokens = torch.randint(0, config.vocab_size, (max(b for b, _ in sizes.llama_batches), longest), generator=g)
    rows = []
    for dtype_name in sizes.dtypes:
        base.to(getattr(torch, dtype_name))
        patched = _sharing_copy(base)
        modules = _modules(normlab.patch(patched))
        sides = (("torch", base), ("normlab", patched))
        with torch.inference_mode():
            for batch, seq in sizes.llama_batches:
                idx = tokens[:batch, :seq]
                diff = _max_diff(base(idx).logits, patched(idx).logits)
                fns = {side: (lambda m=m, idx=idx: m(idx)) for side, m in sides}
                shape = f"{batch}×{seq}"
                rows.append(_timed(name, "forward", dtype_name, shape, fns, diff, modules, samples, min_time))
            prefix, token = tokens[:1, :sizes.llama_prefix], tokens[:1, sizes.llama_prefix:sizes.llama_prefix + 1]
            fns, logits = {}, []
            for side, m in sides:
                cache = m(prefix, use_cache=True).past_key_values if sizes.llama_prefix else None

                def decode(m=m, cache=cache, token=token):
                    out = m(token, past_key_values=cache, use_cache=cache is not None)
                    if cache is not None:
                        cache.crop(-1)  # back to the prefix: every call decodes the same position
                    return out.logits

                logits.append(decode())
                fns[side] = decode
            shape = f"1×1, {sizes.llama_prefix} cached" if sizes.llama_prefix else "1×1"
            diff = _max_diff(*logits)
            rows.append(_timed(name, "decode step", dtype_name, shape, fns, diff, modules, samples, min_time))
        del patched
    return rows


GROUPS = {"study": study_rows, "nanogpt": nanogpt_rows, "llama": llama_rows}


def run_models(groups: list[str], samples: int, min_time: float, quick: bool = False,
               sizes: Sizes | None = None) -> list[dict]:
    """The ``--models`` rows of ``groups`` (keys of :data:`GROUPS`), in that order."""
    sizes = sizes or (QUICK if quick else Sizes())
    print(f"models: {', '.join(groups)}; medians of {samples} interleaved samples of ≥ {math.ceil(min_time * 1e3)} ms")
    rows = []
    for group in groups:
        rows.extend(GROUPS[group](sizes, samples, min_time))
    return rows
