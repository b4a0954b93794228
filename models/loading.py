"""Load UNet weights from local files only (never a hub): safetensors or a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from .unets import ARCHITECTURES, build_unet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the default: the small UNet trained on the cosine schedule (90.5% of its samples confidently
# digits); mnist-small-ddpm.safetensors (linear schedule) was the default before 2026-11-26
DEFAULT_MODEL = WEIGHTS_DIR / "mnist-small-ddpm-cosine.safetensors"


class WeightsError(ValueError):
    """Weights that cannot be loaded into the requested architecture."""


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; on any mismatch raise naming missing / unexpected keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        def head(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {head(shapes)}")
        raise WeightsError(f"weights in {source} do not fit this architecture: " + "; ".join(parts)
                           + ". Pick the architecture the weights were trained with (--arch).")
    model.load_state_dict(state)


def load_unet(arch: str | dict[str, Any] | None = None, weights: str | Path | None = None) -> UNet2DModel:
    """Build ``arch`` and load ``weights`` (a ``.safetensors`` file or a diffusers UNet folder).

    With a diffusers folder and no ``arch``, the folder's ``config.json`` gives the architecture.
    """
    from safetensors.torch import load_file

    if weights is None:
        if arch is None:
            raise ValueError("give an architecture name or a weights path")
        return build_unet(arch)
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights path {str(path)!r} does not exist; give a .safetensors file "
                                f"or a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors)")
    if path.is_dir():
        cfg_file, w_file = path / "config.json", path / "diffusion_pytorch_model.safetensors"
        if not w_file.exists():
            raise FileNotFoundError(f"{path} is not a diffusers UNet folder: {w_file.name} is missing")
        if arch is None:
            if not cfg_file.exists():
                raise FileNotFoundError(f"{path} has no config.json; pass the architecture explicitly")
            config = {k: v for k, v in json.loads(cfg_file.read_text()).items() if not k.startswith("_")}
            model = UNet2DModel.from_config(config)
        else:
            model = build_unet(arch)
        path = w_file
    else:
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors files are loaded (no pickle); convert it first")
        if arch is None:
            card = path.with_suffix(".json")
            if not card.exists():
                raise ValueError(f"{path} has no .json card beside it; pass the architecture (--arch)")
            arch = json.loads(card.read_text()).get("unet_config")
            if arch is None:
                raise WeightsError(f"{card} has no 'unet_config': {path} is not a UNet checkpoint")
        model = build_unet(arch)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    load_state_dict_strict(model, state, str(path))
    return model.eval()


def default_model_card() -> dict[str, Any]:
    card = DEFAULT_MODEL.with_suffix(".json")
    if not card.exists():
        raise FileNotFoundError(f"the default model checkpoint is missing ({card}); train it with "
                                f"`python tools/train.py ddpm`")
    return json.loads(card.read_text())


def trained_schedule(weights: str | Path | None = None) -> str:
    """The noise schedule ``weights`` (default: the shipped model) was trained on, from its .json card.

    The sampler must use the same betas; tools build theirs from this. A card written before
    ``tools/train.py`` had ``--schedule`` says "linear", as does a diffusers folder (no card).
    """
    from .schedules import SCHEDULES

    path = DEFAULT_MODEL if weights is None else Path(weights)
    card = path.with_suffix(".json")
    if path.is_dir() or not card.exists():
        return "linear"
    schedule = json.loads(card.read_text()).get("schedule", "linear")
    if schedule not in SCHEDULES:
        raise WeightsError(f"{card}: schedule {schedule!r} is not one this project samples with ({', '.join(SCHEDULES)})")
    return schedule


def load_default_unet() -> UNet2DModel:
    """The project's trained MNIST DDPM (shipped with the package)."""
    card = default_model_card()
    return load_unet(card["unet_config"], DEFAULT_MODEL)


def arch_names() -> list[str]:
    return sorted(ARCHITECTURES)
