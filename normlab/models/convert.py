"""Exact Pre-LN → Pre-RMSNorm conversion (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm
Transformers"); the ``normlab convert SRC DST`` command is :mod:`normlab.cli.convert`.

LayerNorm forgets the mean of its input: ``LN(x + k·1) = LN(x)``. In a Pre-LN Transformer every
LayerNorm reads the residual stream ``x = embeddings + Σ branch outputs``, so making the stream
zero-mean changes nothing the LayerNorms see — and on a zero-mean input ``LN(x) = RMSNorm(x)``
(same eps). The conversion therefore

1. re-centres the token and position embeddings: every row minus its mean;
2. column-centres the last linear map of every residual branch (attention output projection, MLP
   down projection): ``Â = A − 1·mean_rows(A)``, ``b̂ = b − mean(b)`` — each branch output is then
   zero-mean for any input;
3. replaces every LayerNorm (final one too) by RMSNorm with the same weight, and — RMSNorm having no
   shift — keeps the LayerNorm bias as the ``bias`` of :class:`~normlab.models.RMSNormWithBias`
   (``RMSNorm(x) + b``, keys ``weight``/``bias`` as LayerNorm's);
4. unties ``lm_head`` from the token embedding: the head keeps the original (uncentred) matrix,
   since ``logits = h · Wᵀ`` is not invariant to centring ``W``'s rows.

The logits are unchanged up to rounding (≈1e-15 in fp64). A model is refused with a ``ValueError``
when the identity does not hold: not Pre-LN (post, sandwich, DeepNorm, OLMo-2, Mix-LN or no placement; LayerNorm
Scaling's ``N(x)/√ℓ`` is Pre-LN and converts; another norm;
no final norm before the head) or a residual branch that does not end in a linear map.

The centring is computed in float64 and rounded once to the model's dtype.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from normlab.models.gpt import GPT, GPTConfig
from normlab.models.norms import RMSNormWithBias
from normlab.nn import LayerNorm, RMSNorm

HF_GPT2_CLASSES = ("GPT2LMHeadModel", "GPT2Model")


def _centre_rows(w: Tensor) -> Tensor:
    """Each row minus its mean (embedding tables: one row per token/position)."""
    w64 = w.detach().double()
    return (w64 - w64.mean(dim=-1, keepdim=True)).to(w.dtype)


def _centre_outputs(w: Tensor, out_dim: int) -> Tensor:
    """A weight whose outputs (along ``out_dim``) have zero mean: subtract the mean over ``out_dim``."""
    w64 = w.detach().double()
    return (w64 - w64.mean(dim=out_dim, keepdim=True)).to(w.dtype)


def _refuse(why: str) -> None:
    raise ValueError(f"cannot convert to Pre-RMSNorm exactly: {why}")


def pre_ln_to_pre_rmsnorm(model: nn.Module) -> nn.Module:
    """A converted copy of a Pre-LN ``model`` (normlab :class:`GPT` or Hugging Face
    ``GPT2LMHeadModel``/``GPT2Model``) whose LayerNorms are RMSNorms and whose outputs are equal;
    ``model`` itself is left untouched. Raises ``ValueError`` for a model that is not Pre-LN."""
    if isinstance(model, GPT):
        return _convert_gpt(model)
    if type(model).__name__ in HF_GPT2_CLASSES:
        return _convert_hf_gpt2(model)
    _refuse(f"{type(model).__name__} is neither a normlab GPT nor a Hugging Face {' / '.join(HF_GPT2_CLASSES)}")


# ----------------------------------------------------------------------------------------------
# normlab GPT: the conversion is a new config (norm="rmsnorm", untied) and a transformed state_dict
# ----------------------------------------------------------------------------------------------
def _check_gpt(model: GPT) -> None:
    c = model.config
    if c.placement not in ("pre", "lnscaling"):
        _refuse(f"placement is {c.placement!r}; only 'pre' (x = x + F(N(x))) and 'lnscaling' (x + F(N(x)/√ℓ)) keep "
                "every norm input on the residual stream, where the mean can be removed")
    if c.norm != "layernorm":
        _refuse(f"norm is {c.norm!r}, not 'layernorm'")
    if not c.final_norm:
        _refuse("no final norm: lm_head reads the residual stream directly, so its mean matters")
    for i, block in enumerate(model.transformer.h):
        for name in ("ln_1", "ln_2"):
            if not isinstance(getattr(block, name), LayerNorm):
                _refuse(f"transformer.h.{i}.{name} is a {type(getattr(block, name)).__name__}, not a LayerNorm")
        for name, branch in (("attn", block.attn), ("mlp", block.mlp)):
            if type(branch.c_proj) is not nn.Linear:
                _refuse(f"the residual branch transformer.h.{i}.{name} ends in {type(branch.c_proj).__name__}, "
                        "not a linear map (its output cannot be made zero-mean)")
    if not isinstance(model.transformer.ln_f, LayerNorm):
        _refuse(f"transformer.ln_f is a {type(model.transformer.ln_f).__name__}, not a LayerNorm")


def _convert_gpt(model: GPT) -> GPT:
    _check_gpt(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()      # untied: the head keeps the original matrix
    sd["transformer.wte.weight"] = _centre_rows(sd["transformer.wte.weight"])
    if "transformer.wpe.weight" in sd:
        sd["transformer.wpe.weight"] = _centre_rows(sd["transformer.wpe.weight"])
    for i in range(model.config.n_layer):
        for proj in ("attn.c_proj", "mlp.c_proj"):
            key = f"transformer.h.{i}.{proj}"
            sd[key + ".weight"] = _centre_outputs(sd[key + ".weight"], out_dim=0)  # nn.Linear: (out, in)
            if key + ".bias" in sd:
                sd[key + ".bias"] = _centre_outputs(sd[key + ".bias"], out_dim=0)
    # LayerNorm weight/bias keys are RMSNormWithBias's (bias=True) or RMSNorm's (bias=False): kept as they are
    config = dataclasses.replace(model.config, norm="rmsnorm", tie_embeddings=False)
    ref = model.transformer.wte.weight
    with torch.device(ref.device):
        converted = GPT(config).to(ref.dtype)
    converted.load_state_dict(sd, strict=True)
    return converted.train(model.training)


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2: Conv1D weights are (in, out), so the output axis is dim 1
# ----------------------------------------------------------------------------------------------
def _check_hf_gpt2(model: nn.Module) -> nn.Module:
    base = model.transformer if hasattr(model, "transformer") else model
    cfg = model.config
    if getattr(cfg, "add_cross_attention", False):
        _refuse("the model has cross-attention branches")
    for i, block in enumerate(base.h):
        for name in ("ln_1", "ln_2"):
            if type(getattr(block, name)) is not nn.LayerNorm:
                _refuse(f"h.{i}.{name} is a {type(getattr(block, name)).__name__}, not a LayerNorm")
        for name in ("attn", "mlp"):
            tail = getattr(block, name).c_proj
            if type(tail).__name__ != "Conv1D" and type(tail) is not nn.Linear:
                _refuse(f"the residual branch h.{i}.{name} ends in {type(tail).__name__}, not a linear map")
    if type(base.ln_f) is not nn.LayerNorm:
        _refuse(f"ln_f is a {type(base.ln_f).__name__}, not a LayerNorm")
    return base


def _rmsnorm_from(ln: nn.LayerNorm) -> nn.Module:
    w = ln.weight
    norm = (RMSNormWithBias if ln.bias is not None else RMSNorm)(
        ln.normalized_shape, eps=ln.eps, elementwise_affine=w is not None, device=None if w is None else w.device,
        dtype=None if w is None else w.dtype)
    with torch.no_grad():
        if w is not None:
            norm.weight.copy_(w)
        if ln.bias is not None:
            norm.bias.copy_(ln.bias)
    return norm


def _convert_hf_gpt2(model: nn.Module) -> nn.Module:
    _check_hf_gpt2(model)
    model = copy.deepcopy(model)
    base = model.transformer if hasattr(model, "transformer") else model
    with torch.no_grad():
        if hasattr(model, "lm_head"):
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        base.wte.weight.copy_(_centre_rows(base.wte.weight))
        base.wpe.weight.copy_(_centre_rows(base.wpe.weight))
        for block in base.h:
            for tail in (block.attn.c_proj, block.mlp.c_proj):
                out_dim = 0 if isinstance(tail, nn.Linear) else 1  # Conv1D: y = x·W + b, W is (in, out)
                tail.weight.copy_(_centre_outputs(tail.weight, out_dim))
                if tail.bias is not None:
                    tail.bias.copy_(_centre_outputs(tail.bias, 0))
            block.ln_1, block.ln_2 = _rmsnorm_from(block.ln_1), _rmsnorm_from(block.ln_2)
        base.ln_f = _rmsnorm_from(base.ln_f)
    return model


def gpt_from_hf_gpt2(model: nn.Module) -> GPT:
    """The normlab :class:`GPT` equal to a Hugging Face ``GPT2LMHeadModel`` (same weights, same logits)."""
    if type(model).__name__ != "GPT2LMHeadModel":
        raise ValueError(f"expected a Hugging Face GPT2LMHeadModel, got {type(model).__name__}")
    hf = model.config
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx or hf.add_cross_attention:
        raise ValueError("unsupported GPT-2 variant: needs scale_attn_weights=True, "
                         "scale_attn_by_inverse_layer_idx=False, add_cross_attention=False")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if hf.activation_function not in acts:
        raise ValueError(f"unsupported GPT-2 activation {hf.activation_function!r}; expected one of {sorted(acts)}")
    config = GPTConfig.preset(
        "gpt2", vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head,
        d_model=hf.n_embd, mlp=acts[hf.activation_function], mlp_hidden=hf.n_inner or 4 * hf.n_embd,
        eps=hf.layer_norm_epsilon, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)))
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".attn.bias") and v.dim() == 4 or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of older versions
        if any(k.endswith(f"{p}.weight") for p in ("c_attn", "c_proj", "c_fc")):
            v = v.t()  # Conv1D (in, out) → Linear (out, in)
        sd[k] = v.detach().clone().contiguous()
    ref = model.transformer.wte.weight
    with torch.device(ref.device):
        gpt = GPT(config).to(ref.dtype)
    gpt.load_state_dict(sd, strict=True)
    return gpt.eval()
