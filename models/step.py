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


def chain_sensitivity(unet: nn.Module, sampler: Sampler, shape: tuple[int, ...], seed: int = 0,
                      probes: int = 1, device: str | torch.device = "cpu", progress: bool = False,
                      wrt: str = "output") -> torch.Tensor:
    """How much an error in the UNet's output at each step moves the sample the chain ends at.

    Returns ``(N, S)``, one row per chain (``N = shape[0]``), columns indexed like ``sampler.timesteps`` (0 = the
    noisiest step): ``s_k = ||J_k||_F^2 / d``,
    ``J_k = d x_0 / d eps_k`` the Jacobian of the final sample with respect to the UNet's output at step ``k``
    along the float chains from ``x_T ~ N(0, I)`` (``seed``; the chains' noise from the same generator), ``d`` the
    size of one sample: the mean squared displacement of ``x_0`` that a unit white error in ``eps_k`` causes
    (to first order; the sampler's clip of x_0 included). Estimated with Hutchinson's trace estimator: for a
    random ``v``, one backward pass from ``<v, x_0>`` gives ``J_k^T v`` at every step at once, and
    ``E ||J_k^T v||^2 = ||J_k||_F^2``; ``probes`` such passes averaged. The rows are heavy-tailed (a chain near
    a fork of its path has a Jacobian orders of magnitude larger at the noisy steps): reduce them robustly (a
    geometric mean). Each step
    is recomputed in the backward pass (activation checkpointing), so memory is one step's activations plus
    the chain's states: the cost is about three float chains of ``shape[0]`` samples per probe.

    ``wrt="state"``: the error enters the step's result x_{t-1} instead of the UNet's output, so ``s_k`` is
    ``||d x_0 / d x_{t-1}||_F^2 / d`` at step ``k`` (1 at the last step): the weight that turns a squared error of
    step ``k``'s x_{t-1} into the squared displacement of the final sample."""
    from torch.utils.checkpoint import checkpoint

    if wrt not in ("output", "state"):
        raise ValueError(f"chain_sensitivity wrt must be 'output' (the UNet's output) or 'state' (the step's x_{{t-1}}), "
                         f"got {wrt!r}")
    if probes < 1 or shape[0] < 1:
        raise ValueError(f"chain_sensitivity needs probes >= 1 and at least one chain; got probes={probes}, "
                         f"shape={tuple(shape)}")
    unet_out = lambda x, t: (lambda o: o.sample if hasattr(o, "sample") else o)(unet(x, t))
    total = torch.zeros(shape[0], sampler.S, dtype=torch.float64)
    d = float(torch.tensor(shape[1:]).prod())
    it = range(probes)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="chain sensitivity", unit="probe", leave=False)
    for p in it:
        g = torch.Generator().manual_seed(seed + p)
        x = torch.randn(shape, generator=g).to(device)
        errs = []
        with torch.enable_grad():
            for t_val in sampler.timesteps.tolist():
                t = torch.full((shape[0],), t_val, dtype=torch.long, device=device)
                noise = torch.randn(shape, generator=g).to(device)
                e = torch.zeros(shape, device=device, requires_grad=True)
                errs.append(e)
                if wrt == "output":
                    step = lambda x, e, t=t, noise=noise: sampler.step(unet_out(x, t) + e, t, x, noise)[0]
                else:
                    step = lambda x, e, t=t, noise=noise: sampler.step(unet_out(x, t), t, x, noise)[0] + e
                x = checkpoint(step, x, e, use_reentrant=False)
            v = torch.randn(shape, generator=g).to(device)
            grads = torch.autograd.grad((x * v).sum(), errs)
        total += torch.stack([gr.double().pow(2).flatten(1).sum(1) for gr in grads], 1).cpu() / d
    return (total / probes).float()
