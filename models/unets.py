"""UNet architectures, built from their published configs with diffusers' ``UNet2DModel``.

Nothing here downloads anything: weights come from the checkpoint shipped with the package
(the default MNIST model) or from a local path the user gives (see ``loading.py``).
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel

# google/ddpm-cifar10-32 (Ho et al. 2020), 35,746,307 parameters.
DDPM_CIFAR10: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, dropout=0.1,
    act_fn="silu", center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional",
    resnet_time_scale_shift="default", add_attention=True,
)

# Improved DDPM ImageNet-64 (Nichol & Dhariwal 2021), learned-range variance: out_channels = 6
# (3 for epsilon, 3 for the variance interpolation v). Attention at 16x16 and 8x8, as published.
IDDPM_IMAGENET64: dict[str, Any] = dict(
    sample_size=64, in_channels=3, out_channels=6,
    block_out_channels=(128, 256, 384, 512), layers_per_block=3,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5, dropout=0.0,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
    resnet_time_scale_shift="scale_shift", add_attention=True,
)

# The project's default model: a small DDPM trained on 5,000 real MNIST digits (tools/train.py).
# 28x28 -> 14x14 -> 7x7 with self-attention at 7x7; 1,112,801 parameters.
MNIST_SMALL: dict[str, Any] = dict(
    sample_size=28, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=None,
)

# Larger MNIST configs for when the default's quality is not enough and a GPU (or hours) is at
# hand: twice the channels (4.4M parameters), and also two layers per block (6.5M). Their cost per
# training step on the CPU: `python tools/train.py ddpm --arch NAME --time-steps 15`.
MNIST_WIDE: dict[str, Any] = {**MNIST_SMALL, "block_out_channels": (64, 128, 128)}
MNIST_WIDE2: dict[str, Any] = {**MNIST_WIDE, "layers_per_block": 2}

# A tiny config for fast tests (a few thousand parameters, attention included).
TINY: dict[str, Any] = dict(
    sample_size=8, in_channels=1, out_channels=1,
    block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, attention_head_dim=None,
)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "ddpm-cifar10": DDPM_CIFAR10,
    "iddpm-imagenet64": IDDPM_IMAGENET64,
    "mnist-small": MNIST_SMALL,
    "mnist-wide": MNIST_WIDE,
    "mnist-wide2": MNIST_WIDE2,
    "tiny": TINY,
}


def build_unet(name_or_config: str | dict[str, Any]) -> UNet2DModel:
    """Build a randomly initialised UNet from an architecture name or a config dict."""
    if isinstance(name_or_config, str):
        if name_or_config not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {name_or_config!r}; "
                             f"known: {', '.join(sorted(ARCHITECTURES))}")
        config = ARCHITECTURES[name_or_config]
    else:
        config = name_or_config
    return UNet2DModel(**config)
