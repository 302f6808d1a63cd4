"""Transformer models with every norm type and placement, model patching and exact conversion."""

from normlab.models.gpt import GPT, Block, GPTConfig
from normlab.models.norms import NORMS, RMSNormWithBias, TokenGroupNorm, make_norm
from normlab.models.patch import PatchReport, patch, unpatch
from normlab.models.serialization import load_pretrained, save_pretrained

__all__ = ["GPT", "GPTConfig", "Block", "NORMS", "make_norm", "RMSNormWithBias", "TokenGroupNorm",
           "save_pretrained", "load_pretrained", "patch", "unpatch", "PatchReport"]
