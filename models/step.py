"""``DiffusionStep``: one denoising step (x_t, t, noise) -> x_{t-1} as a single module,
and the sampling loop that drives it."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .samplers import Sampler, StepResult

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "StepResult | tuple"]


class DiffusionStep(nn.Module):
    """UNet + sampler: ``forward(x_t, t, noise) -> StepResult(prev_sample, mean, variance)``.

    ``t`` is a (B,) int64 tensor of training timesteps (the sampler's respaced ones), exactly
    what the UNet receives. ``mean`` and ``variance`` are the Gaussian p(x_{t-1} | x_t) the
    UNet's output defines (the paper's mu_theta and Sigma_theta); they are returned so that
    the captured graph names them as outputs.
    """

    def __init__(self, unet: nn.Module, sampler: Sampler):
        super().__init__()
        self.unet = unet
        self.sampler = sampler

    def forward(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> StepResult:
        out = self.unet(x, t)
        out = out.sample if hasattr(out, "sample") else out
        return self.sampler.step(out, t, x, noise)

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.unet.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)


def trajectory(step_fn: StepFn, sampler: Sampler, x_T: torch.Tensor,
               generator: torch.Generator | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the sampling chain from ``x_T``; yield ``(i, t, x_t, x_{t-1})`` for each step.

    ``(x_t, t)`` are exactly the inputs handed to ``step_fn`` at step ``i`` (0 = first, the
    noisiest). Noise for every step is drawn from ``generator`` in a fixed order, so two step
    functions driven with equal generators see equal noise.
    """
    x = x_T
    for i, t_val in enumerate(sampler.timesteps.tolist()):
        t = torch.full((x.shape[0],), t_val, dtype=torch.long, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        out = step_fn(x, t, noise)
        prev = out[0]
        yield i, t, x, prev
        x = prev


@torch.no_grad()
def sample(step_fn: StepFn, sampler: Sampler, shape: tuple[int, ...], seed: int = 0,
           device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Draw samples: x_T ~ N(0, I) from ``seed``, then the full chain. Returns x_0."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g).to(device)
    steps = trajectory(step_fn, sampler, x_T, g)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, total=sampler.S, desc="sample", unit="step", leave=False)
    x = x_T
    for _, _, _, x in steps:
        pass
    return x
