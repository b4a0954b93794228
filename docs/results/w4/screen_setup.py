"""(docs/results/w4/screen_setup.py) What the 4-bit screens share: the default model under DDPM-100 (the trained
schedule, fixed_small variance), its sample shape, the W4A8 recommended policy and the repository's calibration
cache; 2 threads. The screens run from the repository root (their own folder is on sys.path as scripts)."""
import pathlib
import sys

import torch

sys.path.insert(0, "tools")
import ptq4dm  # noqa: E402
from ptq4dm.models.loading import load_default_unet, trained_schedule  # noqa: E402
from ptq4dm.passes import QuantPolicy  # noqa: E402


def ddpm100_w4():
    """(unet, sampler, step, shape, policy, cache) for the DDPM-100 W4A8 screens."""
    torch.set_num_threads(2)
    unet = load_default_unet()
    sampler = ptq4dm.make_sampler("ddpm", num_inference_steps=100, schedule=trained_schedule(None),
                                  variance_type="fixed_small")
    step = ptq4dm.DiffusionStep(unet, sampler).eval()
    policy = QuantPolicy(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True)
    return unet, sampler, step, step.sample_shape(1)[1:], policy, pathlib.Path(".cache/calibration")
