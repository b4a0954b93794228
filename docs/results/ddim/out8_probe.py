"""8-bit x_{t-1} alone on a deterministic chain: how rounding it costs x_0, and what error feedback does.

The default model's FP step on DDIM (eta 0); only x_{t-1} is rounded to 8 bits (asymmetric, the MSE
range over a grid of clip ratios, taken from the FP chain itself: an oracle range, so that the
rounding is measured and not the calibration draw). Variants: one range for all steps or one per
step; rounding to nearest, stochastic rounding, or error feedback (the residual carried to the next
step, in float or on a grid of s / 2^b). PSNR of x_0 against the FP chain's, same x_T.

    python docs/results/ddim/out8_probe.py [--steps 50] [--n 100] [--seed 123] [--out docs/results/ddim/out8_probe.json]
"""
import argparse, json, sys, time
from pathlib import Path
import torch
REPO = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(REPO / "tools"))
import ptq4dm
from ptq4dm.models.loading import load_default_unet, trained_schedule
from ptq4dm.models.metrics import psnr
from _common import atomic_write_json

p = argparse.ArgumentParser(); p.add_argument("--steps", type=int, default=50); p.add_argument("--n", type=int, default=100)
p.add_argument("--seed", type=int, default=123); p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", default=str(REPO / "docs/results/ddim/out8_probe.json"))
a = p.parse_args(); torch.set_num_threads(a.threads)
sampler = ptq4dm.make_sampler("ddim", num_inference_steps=a.steps, schedule=trained_schedule(None), eta=0.0)
step = ptq4dm.DiffusionStep(load_default_unet(), sampler).eval()
xT = torch.randn(a.n, *step.sample_shape(1)[1:], generator=torch.Generator().manual_seed(a.seed))


def mse_range(v, bits=8):
    v = v.reshape(-1); lo0, hi0 = v.min(), v.max(); best = None
    for c in torch.linspace(0.3, 1.0, 36):
        lo, hi = lo0 * c, hi0 * c
        s = (hi - lo) / (2 ** bits - 1); z = torch.round(-lo / s)
        e = (((torch.clamp(torch.round(v / s) + z, 0, 2 ** bits - 1) - z) * s - v) ** 2).mean()
        if best is None or e < best[0]: best = (e, s, z)
    return best[1], best[2]


@torch.no_grad()
def chain(rng=None, mode="nearest", rbits=0):
    x, r, outs, g = xT.clone(), torch.zeros_like(xT), [], torch.Generator().manual_seed(5)
    for i, tv in enumerate(sampler.timesteps.tolist()):
        v = step(x, torch.full((a.n,), tv), torch.zeros_like(x))[0]
        outs.append(v)
        if rng is not None:
            s, z = rng(i)
            v = v + r if mode == "feedback" else v
            d = torch.rand(v.shape, generator=g) - 0.5 if mode == "stochastic" else 0.0
            q = (torch.clamp(torch.floor(v / s + 0.5 + d) + z, 0, 255) - z) * s
            if mode == "feedback":
                r = torch.clamp(v - q, -s / 2, s / 2)
                if rbits:   # mid-rise levels (k + 1/2) s / 2^b, as passes/error_feedback.py
                    r = (torch.clamp(torch.floor(r / (s / 2 ** rbits)), -2 ** (rbits - 1), 2 ** (rbits - 1) - 1) + 0.5) * (s / 2 ** rbits)
            v = q
        x = v
    return x, outs


t0 = time.time(); xf, outs = chain()
one = mse_range(torch.cat([o.reshape(-1) for o in outs])[::7]); per = [mse_range(o) for o in outs]
rows = []
for rng_name, rng in (("one range", lambda i: one), ("one range per step", lambda i: per[i])):
    for mode, rb in (("nearest", 0), ("stochastic", 0), ("feedback", 0), ("feedback", 4), ("feedback", 2)):
        x, _ = chain(rng, mode, rb)
        label = mode if mode != "feedback" else f"error feedback, residual {'float32' if not rb else f'{rb} bits'}"
        rows.append({"range": rng_name, "rounding": label, "psnr": psnr(x, xf)})
        print(json.dumps(rows[-1]), flush=True)
atomic_write_json(Path(a.out), {"meta": {"command": "python " + " ".join(sys.argv), "steps": a.steps, "n": a.n,
                                         "seed": a.seed, "torch": torch.__version__, "seconds": time.time() - t0,
                                         "scale_one_range": float(one[0]), "scale_first_step": float(per[0][0]),
                                         "scale_last_step": float(per[-1][0])}, "rows": rows})
