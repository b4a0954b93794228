"""(docs/results/w4/handoff_ddim.py) handoff_probe.py on DDIM-50 (eta 0): the default model, W4A8 + reconstruct
{scales=true,n=0,refit=float} + bias_correct{groups=10} calibrated on DDIM-50's own chains (NDTC n=1024, 4 per chain,
draw 100); the quantized step on steps A..B (0 = the noisiest) and the FP step elsewhere, the same x_T; PSNR of 100
samples from seeds 21 and 500 vs the all-FP ones. Rows appended to docs/results/w4/handoff-ddim-<date>.jsonl.

    python docs/results/w4/handoff_ddim.py --splits q:0-49,q:0-24,q:25-49,q:0-12
"""
import argparse
import datetime
import json
import sys

import torch

sys.path.insert(0, "tools"); sys.path.insert(0, "docs/results/w4")
import ptq4dm  # noqa: E402
from ptq4dm.models.loading import trained_schedule  # noqa: E402
from ptq4dm.models.metrics import psnr  # noqa: E402
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC  # noqa: E402
from screen_setup import ddpm100_w4  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--splits", default="q:0-49,q:0-24,q:25-49")
ap.add_argument("--out", default=f"docs/results/w4/handoff-ddim-{datetime.date.today()}.jsonl")
args = ap.parse_args()
unet, _, _, shape, policy, cache = ddpm100_w4()
sampler = ptq4dm.make_sampler("ddim", num_inference_steps=50, schedule=trained_schedule(None))
step = ptq4dm.DiffusionStep(unet, sampler).eval()
res = ptq4dm.quantize(step, calibration=NDTC(n=1024, seed=100, per_chain=4), policy=policy, progress=False,
                      cache_dir=cache, pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false},"
                      "reconstruct{scales=true,n=0,refit=float},bias_correct{groups=10}")
q = res.graph
index = {int(t): i for i, t in enumerate(sampler.timesteps.tolist())}
with torch.no_grad():
    ref = {s: ptq4dm.sample(step, sampler, (100, *shape), seed=s).float() for s in (21, 500)}
    for spec in args.splits.split(","):
        lo, hi = (int(v) for v in spec.removeprefix("q:").split("-"))

        def fn(x, t, noise):
            return q(x, t, noise) if lo <= index[int(t[0])] <= hi else step(x, t, noise)

        row = {"split": spec, "sampler": "ddim-50", "draw": 100, "date": str(datetime.date.today()),
               "psnr": {str(s): float(psnr(ptq4dm.sample(fn, sampler, (100, *shape), seed=s).float(), ref[s]))
                        for s in (21, 500)}}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
