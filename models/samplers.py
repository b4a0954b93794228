"""Sampler step modules: plain torch modules whose schedule tables are buffers.

Each sampler maps the UNet's output at timestep ``t`` to ``(x_{t-1}, mean, variance)`` for a
batch. Tables are indexed by the *training* timestep ``t`` (0 <= t < T), the same integer the
UNet receives, so a captured step graph takes exactly what the sampler feeds the UNet at
inference, respacing included.

The arithmetic follows diffusers' ``DDPMScheduler.step`` and ``DDIMScheduler.step``
("leading" timestep spacing, ``set_alpha_to_one=True``, ``steps_offset=0``); tests check
parity. Respacing ``T -> S`` uses ``stride = T // S`` with timesteps ``t_i = i * stride``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .schedules import alphas_cumprod, make_betas

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


class StepResult(NamedTuple):
    """One denoising step: the next sample and the Gaussian it was drawn from."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor


class Sampler(nn.Module):
    """Common schedule bookkeeping: respaced timesteps and per-t lookup tables (float32)."""

    kind = "base"

    def __init__(self, schedule: str = "linear", num_train_timesteps: int = 1000,
                 num_inference_steps: int | None = None, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        T = num_train_timesteps
        S = T if num_inference_steps is None else num_inference_steps
        if not 1 <= S <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {S}")
        self.schedule, self.T, self.S = schedule, T, S
        self.clip_sample, self.clip_sample_range = clip_sample, float(clip_sample_range)
        self.stride = T // S
        betas32 = make_betas(schedule, T, beta_start, beta_end).float()
        abar = torch.cumprod(1.0 - betas32, dim=0)  # float32, as diffusers computes it
        t = torch.arange(T)
        prev = t - self.stride
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones(()))
        self.register_buffer("timesteps", (torch.arange(S) * self.stride).flip(0).long(), persistent=False)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("alphas_cumprod_prev", abar_prev, persistent=False)
        self.beta_start, self.beta_end = beta_start, beta_end

    def config(self) -> dict:
        return {"kind": self.kind, "schedule": self.schedule, "num_train_timesteps": self.T,
                "num_inference_steps": self.S, "clip_sample": self.clip_sample,
                "clip_sample_range": self.clip_sample_range,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def _x0(self, eps: torch.Tensor, x: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
        x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def split_output(self, model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model_output, None

    def step(self, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
             noise: torch.Tensor) -> StepResult:
        raise NotImplementedError  # abstract: DDPMSampler and DDIMSampler implement it


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling with fixed-small, fixed-large or learned-range variance."""

    kind = "ddpm"

    def __init__(self, variance_type: str = "fixed_small", **kw):
        super().__init__(**kw)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {VARIANCE_TYPES}")
        self.variance_type = variance_type
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        beta = 1 - abar / abar_prev
        small = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
        self.register_buffer("beta_t", beta, persistent=False)
        self.register_buffer("var_small", small, persistent=False)
        self.register_buffer("coef_x0", abar_prev ** 0.5 * beta / (1 - abar), persistent=False)
        self.register_buffer("coef_xt", (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar), persistent=False)

    def config(self) -> dict:
        return {**super().config(), "variance_type": self.variance_type}

    def split_output(self, model_output, x):
        if self.variance_type == "learned_range":
            if model_output.shape[1] != 2 * x.shape[1]:
                raise ValueError(
                    f"learned_range variance needs a UNet with 2x{x.shape[1]} output channels, "
                    f"got {model_output.shape[1]}")
            eps, v = torch.split(model_output, x.shape[1], dim=1)
            return eps, v
        return model_output, None

    def step(self, model_output, t, x, noise):
        eps, v = self.split_output(model_output, x)
        abar_t = self._gather(self.alphas_cumprod, t, x)
        x0 = self._x0(eps, x, abar_t)
        mean = self._gather(self.coef_x0, t, x) * x0 + self._gather(self.coef_xt, t, x) * x
        if self.variance_type == "fixed_small":
            variance = self._gather(self.var_small, t, x).expand_as(x)
        elif self.variance_type == "fixed_large":
            variance = self._gather(self.beta_t, t, x).expand_as(x)
        else:
            min_log = torch.log(self._gather(self.var_small, t, x))
            max_log = torch.log(self._gather(self.beta_t, t, x))
            frac = (v + 1) / 2
            variance = torch.exp(frac * max_log + (1 - frac) * min_log)
        nonzero = (t > 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        prev = mean + nonzero * variance.sqrt() * noise
        return StepResult(prev, mean, variance)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021); ``eta = 0`` is deterministic, ``eta > 0`` adds noise."""

    kind = "ddim"

    def __init__(self, eta: float = 0.0, **kw):
        super().__init__(**kw)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        std = self.eta * var ** 0.5
        self.register_buffer("std_t", std, persistent=False)
        self.register_buffer("dir_coef", (1 - abar_prev - std ** 2) ** 0.5, persistent=False)

    def config(self) -> dict:
        return {**super().config(), "eta": self.eta}

    def step(self, model_output, t, x, noise):
        eps, _ = self.split_output(model_output, x)
        abar_t = self._gather(self.alphas_cumprod, t, x)
        x0 = self._x0(eps, x, abar_t)
        mean = self._gather(self.alphas_cumprod_prev, t, x) ** 0.5 * x0 + self._gather(self.dir_coef, t, x) * eps
        std = self._gather(self.std_t, t, x)
        variance = (std * std).expand_as(x)
        prev = mean + std * noise if self.eta > 0 else mean
        return StepResult(prev, mean, variance)


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def make_sampler(kind: str, **kw) -> Sampler:
    """Build a sampler by name (``ddpm`` or ``ddim``) with its keyword options."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind](**kw)
