"""Free-running drift of quantized chains from the FP chain (a diagnostic record, docs/results.md
"Bias correction"). Same x_T and sampler noise for every chain; prints, for the final samples,
the ink fraction (pixels > 0), the RMS distance to the FP samples, and the mean difference to
the FP chain at 25 / 50 / 75 / 90 / 100 % of the steps.

    python docs/results/bias/drift.py VARIANT[,VARIANT...] [--weights W] [--n 128]
"""
import argparse
import sys
from pathlib import Path

import torch

import ptq4dm
from ptq4dm.models.loading import load_unet, trained_schedule
from ptq4dm.passes import DEFAULT_PIPELINE, MSE, NDTC, MinMax, QuantPolicy

XT = QuantPolicy(output_roles=("prev_sample",))
VARIANTS = {   # name: (solver, pipeline suffix, policy)
    "mse": (MSE(), "", QuantPolicy()), "minmax": (MinMax(), "", QuantPolicy()),
    "xtonly": (MSE(), "", XT),
    "bc": (MSE(), ",bias_correct", QuantPolicy()), "minmax+bc": (MinMax(), ",bias_correct", QuantPolicy()),
    "bc-g5": (MSE(), ",bias_correct{groups=5}", QuantPolicy()),
    "bc-g10": (MSE(), ",bias_correct{groups=10}", QuantPolicy()),
    "bc+varfp": (MSE(), ",bias_correct", QuantPolicy(output_roles=("mean", "prev_sample"))),
    "bc+xtonly": (MSE(), ",bias_correct", XT),
    "bc-g10+xtonly": (MSE(), ",bias_correct{groups=10}", XT),
}

p = argparse.ArgumentParser()
p.add_argument("variants")
p.add_argument("--weights", default="models/weights/mnist-small-ddpm-cosine.safetensors")
p.add_argument("--n", type=int, default=128)
args = p.parse_args()
torch.set_num_threads(2)
unet = load_unet(None, args.weights)
sampler = ptq4dm.make_sampler("ddpm", num_inference_steps=100, schedule=trained_schedule(args.weights),
                              variance_type="fixed_small")
step = ptq4dm.DiffusionStep(unet, sampler).eval()
N = args.n
xT = torch.randn(step.sample_shape(N), generator=torch.Generator().manual_seed(1234))


def run(fn):
    gen = torch.Generator().manual_seed(99)
    x, xs = xT, []
    with torch.no_grad():
        for t_val in sampler.timesteps.tolist():
            t = torch.full((N,), t_val, dtype=torch.long)
            x = fn(x, t, torch.randn(x.shape, generator=gen))[0]
            xs.append(x)
    return xs


fp = run(step)
print(f"{'fp':14} ink {(fp[-1] > 0).float().mean():.4f}", flush=True)
for name in args.variants.split(","):
    solver, suffix, policy = VARIANTS[name]
    r = ptq4dm.quantize(step, calibration=NDTC(n=256, seed=0), solver=solver, policy=policy,
                        pipeline=DEFAULT_PIPELINE + suffix, cache_dir=Path(".cache/calibration"), progress=False)
    xs = run(r.graph)
    q = xs[-1]
    print(f"{name:14} ink {(q > 0).float().mean():.4f} rms-to-fp {(q - fp[-1]).pow(2).mean().sqrt():.4f} "
          "mean-diff 25/50/75/90/100%: " + " ".join(f"{(xs[i] - fp[i]).mean():+.4f}" for i in (24, 49, 74, 89, 99)),
          flush=True)
