"""``normlab convert SRC DST``: a saved Pre-LN model converted to Pre-RMSNorm
(:func:`normlab.models.convert.pre_ln_to_pre_rmsnorm`), saved, reloaded and checked on a probe batch."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from normlab.cli.argtypes import positive_int
from normlab.models.convert import gpt_from_hf_gpt2, pre_ln_to_pre_rmsnorm
from normlab.models.gpt import GPT
from normlab.models.serialization import is_normlab_dir, load_pretrained, save_pretrained
from normlab.nn import LayerNorm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="a saved normlab model directory or a Hugging Face GPT-2 "
                        "directory (save_pretrained)")
    parser.add_argument("dst", metavar="DST", help="where to write the converted normlab model directory")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                        help="dtype of the probe comparison (default float64); the saved weights keep SRC's dtype")
    parser.add_argument("--probe-batch", type=positive_int, default=4,
                        help="sequences in the probe batch, ≥ 1 (default 4)")
    parser.add_argument("--probe-len", type=positive_int, default=None,
                        help="probe sequence length, 1 to block_size (default: min(block_size, 64))")
    parser.add_argument("--seed", type=int, default=0)


def _load_src(src: Path) -> tuple[nn.Module, GPT]:
    """(the model as saved, the same model as a normlab GPT)."""
    if is_normlab_dir(src):
        model = load_pretrained(src).eval()
        return model, model
    config = src / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "gpt2":
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise SystemExit("normlab convert: a Hugging Face SRC needs transformers (pip install normlab[hf])") from e
        hf = GPT2LMHeadModel.from_pretrained(src).eval()
        return hf, gpt_from_hf_gpt2(hf)
    hint = ""
    if is_normlab_dir(src / "model"):
        hint = f" (a study run directory: its model is {src / 'model'})"
    raise SystemExit(f"normlab convert: {src} is neither a normlab model directory "
                     f"nor a Hugging Face GPT-2 directory{hint}")


def _logits(model: nn.Module, idx: Tensor) -> Tensor:
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


def _usage_error(why: str) -> int:
    print(f"normlab convert: error: {why}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        return _usage_error(f"DST {str(dst)!r} is SRC {str(src)!r} or inside it: choose a directory outside SRC")
    if dst.exists() and not dst.is_dir():
        return _usage_error(f"DST {str(dst)!r} exists and is not a directory")
    original, gpt = _load_src(src)
    if args.probe_len is not None and args.probe_len > gpt.config.block_size:
        return _usage_error(f"--probe-len {args.probe_len} exceeds the model's block_size {gpt.config.block_size}")
    try:
        converted = pre_ln_to_pre_rmsnorm(gpt)
    except ValueError as e:
        print(f"normlab convert: {e}", file=sys.stderr)
        return 1
    save_pretrained(converted, dst)
    reloaded = load_pretrained(dst).eval()
    weights = str(reloaded.transformer.wte.weight.dtype).removeprefix("torch.")
    dtype = getattr(torch, args.dtype)
    c = reloaded.config
    T = args.probe_len or min(c.block_size, 64)
    idx = torch.randint(0, c.vocab_size, (args.probe_batch, T), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        a = _logits(copy.deepcopy(original).to(dtype), idx)
        b = _logits(reloaded.to(dtype), idx)
    n_ln = sum(isinstance(m, (nn.LayerNorm, LayerNorm)) for m in reloaded.modules())
    print(f"converted {src} → {dst} ({weights} weights): {len(reloaded.norm_layers())} norms are RMSNorm, "
          f"{n_ln} LayerNorm left")
    max_diff = (a - b).abs().max().item()
    print(f"max |logit difference| on a {args.probe_batch}×{T} probe batch ({args.dtype}): {max_diff:.3e}")
    return 0
