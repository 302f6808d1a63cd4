"""Transformer models with every norm type and placement, model patching and exact conversion."""

from normlab.models.gpt import GPT, Block, GPTConfig
from normlab.models.norms import NORMS, RMSNormWithBias, TokenGroupNorm, make_norm
from normlab.models.patch import PatchReport, patch, unpatch
from normlab.models.serialization import load_pretrained, save_pretrained

__all__ = [
           "GPT",
           "NORMS",
           "Block",
           "GPTConfig",
           "PatchReport",
           "RMSNormWithBias",
           "TokenGroupNorm",
           "load_pretrained",
           "make_norm",
           "patch",
           "save_pretrained",
           "unpatch",
]
