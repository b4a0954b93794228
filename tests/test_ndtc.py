"""NDTC calibration: the distribution of drawn steps and consistency with the real sampler."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep, trajectory
from ptq4dm.passes.calibrate import NDTC, RandomNoise, Single, Uniform, make_calibration_set, snap_to_sampler


@given(mu=st.floats(0.1, 0.5), sigma=st.floats(0.05, 0.3), seed=st.integers(0, 10_000))
def test_ndtc_draws_in_range_with_mean_and_spread(mu, sigma, seed):
    sampler = make_sampler("ddpm", num_inference_steps=1000)
    c = NDTC(mu=mu, sigma=sigma, n=4000, seed=seed)
    t = c.draw(sampler, torch.Generator().manual_seed(seed))
    steps = snap_to_sampler(t, sampler)
    tv = sampler.timesteps[steps].double()
    assert tv.min() >= 0 and tv.max() <= 999
    # mu +- 3 sigma within [0, T): clamping is rare, so sample moments match within ~5 standard errors
    T, n = 1000, 4000
    if mu - 3 * sigma >= 0:
        se_mean = sigma * T / math.sqrt(n)
        assert abs(tv.mean().item() - mu * T) < 5 * se_mean + 1
        assert abs(tv.std().item() - sigma * T) < 0.1 * sigma * T + 1


def test_ndtc_bad_parameters():
    for bad in (NDTC(mu=-0.1), NDTC(mu=1.5), NDTC(sigma=0), NDTC(n=0), Uniform(n=0), Single(t_frac=2.0)):
        with pytest.raises(ValueError) as e:
            bad.validate()
        assert any(w in str(e.value) for w in ("mu", "sigma", "n >=", "t_frac"))


@pytest.mark.parametrize("kind,kw,per_chain", [("ddpm", dict(num_inference_steps=20), 1),
                                               ("ddim", dict(num_inference_steps=25, eta=0.0), 1),
                                               ("ddim", dict(num_inference_steps=10, eta=1.0), 1),
                                               ("ddpm", dict(num_inference_steps=20), 3),
                                               ("ddim", dict(num_inference_steps=10, eta=1.0), 4)])
def test_calibration_pairs_equal_the_samplers_real_inputs(tiny_unet, kind, kw, per_chain):
    """The (x_t, t) pairs calibration records are the very inputs the sampler feeds the UNet,
    respacing included (the reference code's off-by-direction bug would fail this); with
    ``per_chain`` K, K consecutive samples are taken from one chain at their own drawn steps, the
    same steps as with one sample per chain, for 1 / K of the chains' UNet calls."""
    calls = []

    class Counting(DiffusionStep):
        def forward(self, x, t, noise):
            calls.append(x.shape[0])
            return super().forward(x, t, noise)

    step = Counting(tiny_unet, make_sampler(kind, **kw)).eval()
    calib = NDTC(n=12, batch_size=12, seed=3, per_chain=per_chain)
    cs = make_calibration_set(step, step.sampler, calib, (12, 1, 8, 8), progress=False)
    assert set(cs.t.tolist()) <= set(step.sampler.timesteps.tolist())
    rows, calls[:] = sum(calls), []
    one = make_calibration_set(step, step.sampler, NDTC(n=12, batch_size=12, seed=3), (12, 1, 8, 8), progress=False)
    assert torch.equal(cs.t, one.t) and cs.x.shape == one.x.shape
    assert rows * per_chain == sum(calls) > 0   # 12 / K chains over the same steps as 12 chains
    # Replay: the timesteps come from the seed; batch 0 (all 12) draws x_T, then each step's
    # noise, from its own generator (distributed.batch_seed), whichever rank runs it.
    from ptq4dm.distributed import batch_seed

    g = torch.Generator().manual_seed(batch_seed(calib.seed, 0))
    x_T = torch.randn((12 // per_chain, 1, 8, 8), generator=g)
    seen = {}
    with torch.no_grad():
        for i, t, x, _ in trajectory(step, step.sampler, x_T, g):
            seen[i] = (x.clone(), t.clone())
    for j in range(12):
        i = int(cs.step[j])
        x_ref, t_ref = seen[i]
        assert int(cs.t[j]) == int(t_ref[j // per_chain]) == int(step.sampler.timesteps[i])
        assert torch.equal(cs.x[j], x_ref[j // per_chain])


def test_baselines_and_cache(tiny_unet, tmp_path):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=10)).eval()
    single = make_calibration_set(step, step.sampler, Single(t_frac=0.5, n=8), (8, 1, 8, 8), progress=False)
    assert len(set(single.t.tolist())) == 1
    rnd = make_calibration_set(step, step.sampler, RandomNoise(n=8), (8, 1, 8, 8), progress=False)
    assert abs(rnd.x.std().item() - 1) < 0.3
    a = make_calibration_set(step, step.sampler, Uniform(n=8), (8, 1, 8, 8), progress=False, cache_dir=tmp_path,
                             model_hash="abc")
    b = make_calibration_set(step, step.sampler, Uniform(n=8), (8, 1, 8, 8), progress=False, cache_dir=tmp_path,
                             model_hash="abc")
    assert not a.config["cached"] and b.config["cached"] and torch.equal(a.x, b.x)
