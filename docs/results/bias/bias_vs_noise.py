"""Bias vs noise in each config's per-step error (teacher forced), plus free-running final-sample statistics.

    python docs/results/bias/bias_vs_noise.py WEIGHTS|default N   (a diagnostic record: docs/results/history.md, "Bias correction: the cosine model's shift is a mean shift")
"""
import copy, sys
from pathlib import Path
import torch
import ptq4dm
from ptq4dm.models.loading import load_unet, load_default_unet, trained_schedule
from ptq4dm.passes import MSE, NDTC, MinMax, PassContext
from ptq4dm.passes.fakequant import FakeQuant

torch.set_num_threads(2)
W = sys.argv[1] if sys.argv[1] != "default" else None
N = int(sys.argv[2])
unet = load_default_unet() if W is None else load_unet(None, W)
sampler = ptq4dm.make_sampler("ddpm", num_inference_steps=100, schedule=trained_schedule(W), variance_type="fixed_small")
step = ptq4dm.DiffusionStep(unet, sampler).eval()
cache = Path(".cache/calibration")
pipe = "decompose_attention,mark,observe,calibrate,solve,fakequant"
qs = {name: ptq4dm.quantize(step, calibration=NDTC(n=256, seed=0), solver=s, pipeline=pipe, cache_dir=cache, progress=False).graph
      for name, s in [("mse", MSE()), ("minmax", MinMax())]}
g0 = torch.Generator().manual_seed(1234)
xT = torch.randn(step.sample_shape(N), generator=g0)
def run(fn):
    gen = torch.Generator().manual_seed(99)
    x = xT; xs = []
    with torch.no_grad():
        for t_val in sampler.timesteps.tolist():
            t = torch.full((N,), t_val, dtype=torch.long)
            noise = torch.randn(x.shape, generator=gen)
            out = fn(x, t, noise)
            x = out[0] if isinstance(out, (tuple, list)) else out.prev_sample
            xs.append(x)
    return xs
fp = run(step)
print("teacher-forced: per tenth of steps, sum over steps of ||mean_n dx||^2/D (bias) and mean_n ||dx||^2/D (total)")
gen = torch.Generator().manual_seed(99)
states = []
x = xT
with torch.no_grad():
    for i, t_val in enumerate(sampler.timesteps.tolist()):
        t = torch.full((N,), t_val, dtype=torch.long)
        noise = torch.randn(x.shape, generator=gen)
        out = step(x, t, noise); states.append((x, t, noise, out.prev_sample)); x = out.prev_sample
for name, g in qs.items():
    bias, tot, mean_shift = [], [], []
    with torch.no_grad():
        for (x, t, noise, prev) in states:
            d = g(x, t, noise)[0] - prev
            D = d[0].numel()
            bias.append(d.mean(0).pow(2).sum().item() / D); tot.append(d.pow(2).sum().item() / (N * D))
            mean_shift.append(d.mean().item())
    dec = lambda v: " ".join(f"{sum(v[i:i+10]):.2e}" for i in range(0, 100, 10))
    print(f"{name:8} bias  {dec(bias)}\n{name:8} total {dec(tot)}\n{name:8} mean dx per tenth {' '.join(f'{sum(mean_shift[i:i+10]):+.2e}' for i in range(0,100,10))}")
print("free-running final samples (in [-1,1]): mean, ink fraction (>0), mean |x|, dist to FP rms")
def stats(name, xs):
    x = xs[-1]
    print(f"{name:8} mean {x.mean():+.4f} ink {(x > 0).float().mean():.4f} |x| {x.abs().mean():.4f} sat(>0.95) {(x.abs()>0.95).float().mean():.4f} rms-to-fp {(x - fp[-1]).pow(2).mean().sqrt():.4f}")
    # drift of the mean over the chain
    print(f"{'':8} mean-diff to FP at 25/50/75/90/100 %: " + " ".join(f"{(xs[i]-fp[i]).mean():+.4f}" for i in (24, 49, 74, 89, 99)))
stats("fp", fp)
for name, g in qs.items():
    stats(name, run(g))
