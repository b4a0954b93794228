import json

import pytest
import torch
from safetensors.torch import save_file

from ptq4dm.models.loading import WeightsError, load_unet
from ptq4dm.models.unets import build_unet


def test_roundtrip_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("tiny")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    loaded = load_unet("tiny", path)
    for k, v in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(WeightsError) as e:
        load_unet("mnist-small", path)
    msg = str(e.value)
    assert "missing keys" in msg or "shape mismatches" in msg
    assert "--arch" in msg


def test_diffusers_folder(tmp_path):
    unet = build_unet("tiny")
    unet.save_pretrained(tmp_path / "unet")
    loaded = load_unet(None, tmp_path / "unet")
    assert tuple(loaded.config.block_out_channels) == tuple(unet.config.block_out_channels)
    for k, v in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_bad_paths():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unet("tiny", "/nonexistent/model.safetensors")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_unet("ddpm-celeba")


def test_the_sampler_schedule_comes_from_the_weights_card(tmp_path):
    from ptq4dm.models.loading import trained_schedule

    assert trained_schedule() == "cosine"  # the shipped default model's card
    weights = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in build_unet("tiny").state_dict().items()}, str(weights))
    assert trained_schedule(weights) == "linear"  # no card: the DDPM default
    card = weights.with_suffix(".json")
    card.write_text(json.dumps({"unet_config": "tiny"}))
    assert trained_schedule(weights) == "linear"  # a card from before the field
    card.write_text(json.dumps({"unet_config": "tiny", "schedule": "cosine"}))
    assert trained_schedule(weights) == "cosine"
    card.write_text(json.dumps({"unet_config": "tiny", "schedule": "sigmoid"}))
    with pytest.raises(WeightsError, match="schedule 'sigmoid'"):
        trained_schedule(weights)
