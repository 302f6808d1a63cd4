"""Save and load a normlab :class:`GPT` as a directory: ``config.json`` + ``model.safetensors``
(``model.pt``, a ``torch.save``d state_dict, when safetensors is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from normlab.models.gpt import GPT, GPTConfig

MODEL_TYPE = "normlab-gpt"


def save_pretrained(model: GPT, directory: str | Path) -> Path:
    """Write ``config.json`` (``{"model_type": "normlab-gpt", **config}``) and the weights into ``directory``."""
    if not isinstance(model, GPT):
        raise TypeError(f"save_pretrained expects a normlab GPT, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **model.config.to_dict()}, indent=2))
    try:
        from safetensors.torch import save_model
    except ImportError:
        torch.save(model.state_dict(), directory / "model.pt")
    else:
        save_model(model, str(directory / "model.safetensors"))  # handles the tied lm_head/wte weight
    return directory


def is_normlab_dir(directory: str | Path) -> bool:
    path = Path(directory) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == MODEL_TYPE


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """The :class:`GPT` saved by :func:`save_pretrained` in ``directory``, in the saved dtype."""
    directory = Path(directory)
    if not is_normlab_dir(directory):
        raise ValueError(f"{directory} is not a normlab model directory "
                         f"(no config.json with model_type {MODEL_TYPE!r})")
    config = json.loads((directory / "config.json").read_text())
    config.pop("model_type")
    model = GPT(GPTConfig.from_dict(config))
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(directory / "model.safetensors"), device=str(map_location))
    elif (directory / "model.pt").is_file():
        state = torch.load(directory / "model.pt", map_location=map_location, weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} holds neither model.safetensors nor model.pt")
    if config["tie_embeddings"]:  # safetensors stores a shared tensor under one of its names
        tied = state.get("transformer.wte.weight", state.get("lm_head.weight"))
        state["transformer.wte.weight"] = state["lm_head.weight"] = tied
    model = model.to(device=map_location, dtype=state["transformer.wte.weight"].dtype)
    model.load_state_dict(state, strict=True)
    return model
