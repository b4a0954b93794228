"""Our sampler step modules against diffusers' schedulers on the same inputs and noise."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given
from hypothesis import strategies as st

from ptq4dm.models.samplers import DDIMSampler, DDPMSampler, make_sampler

SCHED = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@given(variance=st.sampled_from(["fixed_small", "fixed_large", "learned_range"]),
       schedule=st.sampled_from(["linear", "cosine"]), steps=st.sampled_from([1000, 250, 100, 10]),
       idx=st.integers(0, 10_000), seed=st.integers(0, 2**31 - 1), clip=st.booleans())
def test_ddpm_step_matches_diffusers(variance, schedule, steps, idx, seed, clip):
    ours = DDPMSampler(variance_type=variance, schedule=schedule, num_inference_steps=steps, clip_sample=clip)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=SCHED[schedule], variance_type=variance,
                        clip_sample=clip)
    ref.set_timesteps(steps)
    assert torch.equal(ref.timesteps, ours.timesteps)
    t = int(ours.timesteps[idx % steps])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 6 if variance == "learned_range" else 3, 4, 4, generator=g)
    want = ref.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
    noise = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    got = ours.step(out, torch.tensor([t, t]), x, noise).prev_sample
    assert (got - want).abs().max().item() <= 1e-5


@given(eta=st.sampled_from([0.0, 0.3, 1.0]), schedule=st.sampled_from(["linear", "cosine"]),
       steps=st.sampled_from([1000, 100, 50, 10]), idx=st.integers(0, 10_000), seed=st.integers(0, 2**31 - 1))
def test_ddim_step_matches_diffusers(eta, schedule, steps, idx, seed):
    ours = DDIMSampler(eta=eta, schedule=schedule, num_inference_steps=steps)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=SCHED[schedule])
    ref.set_timesteps(steps)
    assert torch.equal(ref.timesteps, ours.timesteps)
    t = int(ours.timesteps[idx % steps])
    g = torch.Generator().manual_seed(seed)
    x, out, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    want = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
    got = ours.step(out, torch.tensor([t, t]), x, noise).prev_sample
    assert (got - want).abs().max().item() <= 1e-5


def test_bad_sampler_options_are_named():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMSampler(num_inference_steps=0)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMSampler(variance_type="learned_log")
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-1)
    s = DDPMSampler(variance_type="learned_range")
    with pytest.raises(ValueError, match="2x3 output channels"):
        s.step(torch.randn(1, 3, 4, 4), torch.tensor([5]), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))


class _Linear(torch.nn.Module):
    """A UNet stand-in whose output is c * x: the chain is linear, each step's Jacobian a multiple of I."""

    def __init__(self, c: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def forward(self, x, t):
        return self.c * x


@pytest.mark.parametrize("wrt", ["output", "state"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_chain_sensitivity_is_the_squared_jacobian_of_the_final_sample(kind, wrt):
    """chain_sensitivity's s_k is ||d x_0 / d eps_k||_F^2 / d (wrt="output"; wrt="state": d x_0 / d x_{t-1} of step
    k): on a linear chain (J_k = j_k I) it must be j_k^2, with j_k measured directly by moving eps_k (x_{t-1} of step
    k) by h and watching x_0 move by j_k h (Hutchinson's estimate over 64 chains of 64 values: within a few % of
    it). The same seed gives the same values, another seed others."""
    from ptq4dm.models.step import chain_sensitivity

    sampler = make_sampler(kind, num_inference_steps=8, clip_sample=False)
    unet, shape = _Linear(0.3), (64, 1, 8, 8)
    s = chain_sensitivity(unet, sampler, shape, seed=3, wrt=wrt)
    assert s.shape == (64, 8)
    assert torch.equal(chain_sensitivity(unet, sampler, shape, seed=3, wrt=wrt), s)   # seeded
    assert not torch.equal(chain_sensitivity(unet, sampler, shape, seed=4, wrt=wrt), s)

    def x0(k: int, h: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape[1:], generator=g)[None]
        for i, t_val in enumerate(sampler.timesteps.tolist()):
            t = torch.full((1,), t_val, dtype=torch.long)
            eps = unet(x, t) + (h if i == k and wrt == "output" else 0.0)
            x = sampler.step(eps, t, x, torch.randn(x.shape, generator=g))[0] + (h if i == k and wrt == "state" else 0.0)
        return x

    with torch.no_grad():
        j = torch.stack([(x0(k, 1.0) - x0(k, 0.0)).mean() for k in range(8)])
    torch.testing.assert_close(s.mean(0), j.pow(2), rtol=0.08, atol=1e-9)
    assert float(j.abs().min()) > 0
    if wrt == "state":   # an error in the last step's result is an error in x_0 itself
        assert float(j[-1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probes"):
        chain_sensitivity(unet, sampler, shape, probes=0)
    with pytest.raises(ValueError, match="wrt must be 'output'"):
        chain_sensitivity(unet, sampler, shape, wrt="x")
