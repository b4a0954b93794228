"""Noise schedules (beta tables) shared by training and the sampler step modules.

Pure functions returning float64 tensors; callers cast. The formulas match diffusers'
``DDPMScheduler`` (``linear`` and ``squaredcos_cap_v2``) so our samplers can be tested
against it.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def make_betas(schedule: str, num_train_timesteps: int = 1000,
               beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return the ``num_train_timesteps`` betas of ``schedule`` as float64."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if schedule == "linear":
        # diffusers computes linspace in float32; match it exactly.
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32).double()
    if schedule == "cosine":
        # Nichol & Dhariwal 2021 ("squaredcos_cap_v2" in diffusers).
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                 for i in range(num_train_timesteps)]
        return torch.tensor(betas, dtype=torch.float32).double()
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)
