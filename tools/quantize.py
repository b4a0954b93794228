#!/usr/bin/env python
"""Quantize a diffusion model with PTQ4DM (the main job). Grows with the pipeline; see --help."""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="ddpm-cifar10", help="built-in architecture")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--demo", action="store_true", help="the README demo")
    args = p.parse_args(argv)
    import ptq4dm

    torch.manual_seed(0)
    unet = ptq4dm.build_unet(args.arch)
    step = ptq4dm.DiffusionStep(unet, ptq4dm.make_sampler(args.sampler, num_inference_steps=args.steps)).eval()
    graph = ptq4dm.capture_step(step)
    print(graph.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
