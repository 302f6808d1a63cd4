"""A decoder-only Transformer (GPT) whose normalization is configuration.

Each ``Block`` is an attention sub-layer and an MLP sub-layer, ``F`` below, joined to the residual
stream ``x`` by one of eight placements of the norm ``N``:

    post       x = N(x + F(x))                    (Vaswani et al. 2017)
    pre        x = x + F(N(x))                    (GPT-2, Llama)
    sandwich   x = x + N₂(F(N₁(x)))               (a.k.a. peri-LN; Ding et al. 2021)
    deepnorm   x = N(α·x + F(x)),  α = (2M)^¼     (Wang et al. 2022, decoder constants, M = n_layer)
    olmo2      x = x + N(F(x))                    (OLMo 2's reordered norm, 2024: the branch output only)
    mixln      post in blocks 0 … P-1, pre after  (Li et al. 2024; P = mixln_post_layers, default ⌊M/4⌋ ≥ 1)
    lnscaling  x = x + F(N(x) / √ℓ),  ℓ = i + 1   (Sun et al. 2025, "the curse of depth": block i's norms)
    none       x = x + F(x)

DeepNorm also scales the initialisation of the value, attention output and MLP weights by
β = (8M)^-¼ (Xavier-normal with gain β; query and key with gain 1).

Norm kinds (see :mod:`normlab.models.norms` for how each sees a ``(B, T, C)`` tensor): layernorm,
rmsnorm, groupnorm (per token, over channel groups), dyt, none, and batchnorm — statistics over all
B·T tokens of the batch, so in training a token's output depends on *later* tokens and on other
sequences: a causal model with BatchNorm leaks the future. It is here to be studied, not used.

Module names follow nanoGPT (``transformer.wte/wpe/h.N.ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/
mlp.c_proj/ln_f``, ``lm_head``), so a nanoGPT state_dict loads into the ``gpt2`` preset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.norms import NORMS, make_norm
from normlab.nn import RMSNorm

PLACEMENTS = ("post", "pre", "sandwich", "deepnorm", "olmo2", "mixln", "lnscaling", "none")
MLPS = ("gelu", "gelu_tanh", "relu", "swiglu")
POSITIONS = ("learned", "rotary")
INITS = ("gpt2", "xavier")

PRESETS = {
    "gpt2": dict(norm="layernorm", placement="pre", mlp="gelu", pos="learned", final_norm=True,
                 tie_embeddings=True, bias=True),
    "llama": dict(norm="rmsnorm", placement="pre", mlp="swiglu", pos="rotary", final_norm=True,
                  tie_embeddings=False, bias=False),
}


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64           # longest sequence (learned positions, rotary tables)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    norm: str = "layernorm"        # layernorm | rmsnorm | batchnorm | groupnorm | dyt | none
    placement: str = "pre"         # post | pre | sandwich | deepnorm | olmo2 | mixln | lnscaling | none
    mixln_post_layers: int | None = None  # mixln: how many leading blocks are post (None: ⌊n_layer/4⌋, at least 1)
    mlp: str = "gelu"              # gelu | gelu_tanh | relu | swiglu
    pos: str = "learned"           # learned | rotary
    final_norm: bool = True        # a norm before lm_head
    tie_embeddings: bool = True    # lm_head.weight is wte.weight
    qk_norm: bool = False          # RMSNorm over the head dim on q and k
    bias: bool = True              # bias in the Linears and in the LayerNorm / RMSNorm / DyT norms
    dropout: float = 0.0
    mlp_hidden: int | None = None  # None: 4·d (gelu), 8d/3 rounded up to a multiple of 32 (swiglu)
    eps: float = 1e-5              # eps of every norm
    norm_groups: int = 4           # groups of groupnorm
    dyt_alpha: float = 0.5         # DyT's α₀ (the init of its learnable scale)
    rope_base: float = 10000.0
    init_std: float = 0.02         # gpt2 init: the weights' std
    init: str = "gpt2"             # gpt2 (nanoGPT's) | xavier (the original Transformer's, as in Xiong et al. 2020)

    def __post_init__(self) -> None:
        for name, choices in (("norm", NORMS), ("placement", PLACEMENTS), ("mlp", MLPS), ("pos", POSITIONS),
                              ("init", INITS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(choices)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "norm_groups"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.pos == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got d_model/n_head={self.head_dim}")
        if self.norm == "groupnorm" and self.d_model % self.norm_groups:
            raise ValueError(f"groupnorm needs d_model={self.d_model} divisible by norm_groups={self.norm_groups}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and not (isinstance(self.mlp_hidden, int) and self.mlp_hidden > 0):
            raise ValueError(f"mlp_hidden must be a positive int or None, got {self.mlp_hidden!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not (math.isfinite(self.dyt_alpha) and self.dyt_alpha > 0):
            raise ValueError(f"dyt_alpha must be a finite number > 0, got {self.dyt_alpha}")
        if self.mixln_post_layers is not None:
            if self.placement != "mixln":
                raise ValueError(f"mixln_post_layers applies to placement 'mixln', not {self.placement!r}")
            if not (isinstance(self.mixln_post_layers, int) and 0 <= self.mixln_post_layers <= self.n_layer):
                raise ValueError(f"mixln_post_layers must be an int in [0, n_layer={self.n_layer}], "
                                 f"got {self.mixln_post_layers!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def post_layers(self) -> int:
        """Mix-LN: the number of leading post blocks (the paper's ⌊αL⌋, α = 0.25 by default, at least 1)."""
        if self.mixln_post_layers is not None:
            return self.mixln_post_layers
        return max(1, self.n_layer // 4)

    def block_placement(self, layer_idx: int) -> str:
        """The placement block ``layer_idx`` computes: mixln's blocks are post or pre."""
        if self.placement == "mixln":
            return "post" if layer_idx < self.post_layers else "pre"
        return self.placement

    @property
    def hidden(self) -> int:
        """Width of the MLP's hidden layer."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 32 * math.ceil(8 * self.d_model / 3 / 32)
        return 4 * self.d_model

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """``gpt2``: LayerNorm, pre, GELU MLP, learned positions, final norm, tied embeddings, bias.
        ``llama``: RMSNorm, pre, SwiGLU, rotary positions, final norm, untied, no bias.
        Sizes are the dataclass defaults unless given in ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Rotary positions (Su et al. 2021), "rotate half" layout: pairs (i, i + d/2)
# ----------------------------------------------------------------------------------------------
def rotary_tables(block_size: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape (block_size, head_dim), angle ``t · base^(-2i/head_dim)``, built in fp64."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(torch.get_default_dtype()), angles.sin().to(torch.get_default_dtype())


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair of ``x`` (B, H, T, D) by the angle of its position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The sub-layers and the block
# ----------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d, self.n_head = config.d_model, config.n_head
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)   # q, k, v
        self.c_proj = nn.Linear(d, d, bias=config.bias)       # output projection (last op of the branch)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, eps=config.eps)
            self.k_norm = RMSNorm(config.head_dim, eps=config.eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (after QK-norm and rotary) and values, each ``(B, n_head, T, head_dim)``."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, rope)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d, h = config.d_model, config.hidden
        self.kind = config.mlp
        self.c_fc = nn.Linear(d, h, bias=config.bias)
        self.c_gate = nn.Linear(d, h, bias=config.bias) if config.mlp == "swiglu" else None
        self.c_proj = nn.Linear(h, d, bias=config.bias)       # down projection (last op of the branch)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        elif self.kind == "relu":  # the original Transformer's FFN, as in Xiong et al. 2020
            h = F.relu(self.c_fc(x))
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Attention then MLP, each joined to the residual stream by ``config.block_placement(layer_idx)``."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.placement = layer_idx, config.block_placement(layer_idx)

        def norm() -> nn.Module:
            kind = "none" if config.placement == "none" else config.norm
            return make_norm(kind, config.d_model, eps=config.eps, bias=config.bias, groups=config.norm_groups,
                             dyt_alpha=config.dyt_alpha)

        self.ln_1 = norm()
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm()
        self.mlp = MLP(config)
        if config.placement == "sandwich":
            self.ln_1_out, self.ln_2_out = norm(), norm()
        self.alpha = (2 * config.n_layer) ** 0.25 if config.placement == "deepnorm" else 1.0
        self.scale = 1.0 / math.sqrt(layer_idx + 1) if config.placement == "lnscaling" else 1.0

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        p = self.placement
        if p == "pre":
            x = x + self.attn(self.ln_1(x), rope)
            return x + self.mlp(self.ln_2(x))
        if p == "lnscaling":
            x = x + self.attn(self.ln_1(x) * self.scale, rope)
            return x + self.mlp(self.ln_2(x) * self.scale)
        if p == "olmo2":
            x = x + self.ln_1(self.attn(x, rope))
            return x + self.ln_2(self.mlp(x))
        if p == "sandwich":
            x = x + self.ln_1_out(self.attn(self.ln_1(x), rope))
            return x + self.ln_2_out(self.mlp(self.ln_2(x)))
        if p in ("post", "deepnorm"):
            x = self.ln_1(self.alpha * x + self.attn(x, rope))
            return self.ln_2(self.alpha * x + self.mlp(x))
        x = x + self.attn(x, rope)  # none
        return x + self.mlp(x)

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """The norm modules of this block in forward order, with names relative to the block."""
        qk = ["attn.q_norm", "attn.k_norm"]
        order = {
            "pre": ["ln_1", *qk, "ln_2"],
            "lnscaling": ["ln_1", *qk, "ln_2"],
            "olmo2": [*qk, "ln_1", "ln_2"],
            "sandwich": ["ln_1", *qk, "ln_1_out", "ln_2", "ln_2_out"],
            "post": [*qk, "ln_1", "ln_2"],
            "deepnorm": [*qk, "ln_1", "ln_2"],
            "none": qk,
        }[self.placement]
        found = []
        for name in order:
            m = self
            for part in name.split("."):
                m = getattr(m, part, None)
            if m is not None and not isinstance(m, nn.Identity):
                found.append((name, m))
        return found


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.d_model),
            wpe=nn.Embedding(c.block_size, c.d_model) if c.pos == "learned" else nn.Identity(),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c, i) for i in range(c.n_layer)]),
            ln_f=make_norm(c.norm if c.final_norm else "none", c.d_model, eps=c.eps, bias=c.bias, groups=c.norm_groups,
                           dyt_alpha=c.dyt_alpha),
        ))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if c.pos == "rotary":
            cos, sin = rotary_tables(c.block_size, c.head_dim, c.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``gpt2`` (nanoGPT's): N(0, 0.02) weights, zero biases, residual output projections N(0, 0.02/√(2M)).
        ``xavier`` (the original Transformer's): Xavier-uniform Linears, q, k and v each as its own (d, d)
        matrix, zero biases, embeddings N(0, 1/d), no residual scaling.
        DeepNorm, either way: Xavier-normal, gain β = (8M)^-¼ on v, attention output and MLP, gain 1 on q, k."""
        c, std = self.config, self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std if c.init == "gpt2" else c.d_model ** -0.5)
            elif isinstance(m, nn.Linear):
                if c.init == "gpt2":
                    nn.init.normal_(m.weight, mean=0.0, std=std)
                elif m.weight is not self.transformer.wte.weight:  # a tied head keeps the embedding's init
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for block in self.transformer.h:
            if c.placement == "deepnorm":
                beta = (8 * c.n_layer) ** -0.25
                self._init_qkv(block, nn.init.xavier_normal_, (1.0, 1.0, beta))
                for lin in (block.attn.c_proj, block.mlp.c_fc, block.mlp.c_gate, block.mlp.c_proj):
                    if lin is not None:
                        nn.init.xavier_normal_(lin.weight, gain=beta)
            elif c.init == "xavier":
                self._init_qkv(block, nn.init.xavier_uniform_, (1.0, 1.0, 1.0))
            else:
                for lin in (block.attn.c_proj, block.mlp.c_proj):
                    nn.init.normal_(lin.weight, mean=0.0, std=std / math.sqrt(2 * c.n_layer))

    def _init_qkv(self, block: Block, init, gains: tuple[float, float, float]) -> None:
        """Initialise q, k and v, stored as one (3d, d) matrix, each as its own (d, d) matrix."""
        d, w = self.config.d_model, block.attn.c_attn.weight
        with torch.no_grad():
            for i, gain in enumerate(gains):
                init(w[i * d:(i + 1) * d], gain=gain)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx`` (B, T) int64 token ids → ``(logits (B, T, vocab), loss or None)``; targets -1 are ignored."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) int64 tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            # (on a GPU this check would wait for the device at every step; its embedding asserts instead)
            lo, hi = (int(v) for v in idx.aminmax())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size}), "
                                 f"got ids from {lo} to {hi}")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """Every normalization module, in forward order, with its qualified name."""
        out = [(f"transformer.h.{i}.{n}", m) for i, b in enumerate(self.transformer.h) for n, m in b.norm_layers()]
        if not isinstance(self.transformer.ln_f, nn.Identity):
            out.append(("transformer.ln_f", self.transformer.ln_f))
        return out

    def num_params(self) -> int:
        """Number of parameters; a tied ``lm_head``/``wte`` weight counts once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_nanogpt_state_dict(cls, state_dict: dict, config: GPTConfig) -> GPT:
        """A GPT (in the dtype of the weights) loaded from a nanoGPT ``model.state_dict()``
        (``torch.nn.LayerNorm``-style keys ``weight``/``bias``). Drops nanoGPT's causal-mask buffers
        (``*.attn.bias``, 4-D) and the ``_orig_mod.`` prefix of a ``torch.compile``d model; any other
        mismatch raises."""
        sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
        sd = {k: v for k, v in sd.items() if not (k.endswith(".attn.bias") and v.dim() == 4)}
        model = cls(config)
        if "transformer.wte.weight" in sd:
            model = model.to(sd["transformer.wte.weight"].dtype)
        model.load_state_dict(sd, strict=True)
        return model
