"""(docs/results/w4/handoff_fid.py) Is the 4-bit step's FID loss made early or late in the chain? The hand-off of
handoff_probe.py (the quantized step for some steps, the FP step for the others, the same x_T and noise) at N = 1,000,
DDPM-100, sampling seeds --seed + b for batch b (evaluate.py's), MNIST-classifier FID against the 5,000 real digits,
its change from FP with the paired half-sampling interval (evaluate.py's), and PSNR from the FP samples. The graph:
W4A8 + reconstruct{scales=true,n=0,refit=float} + bias_correct{groups=10}, calibration NDTC n=1024, 4 per chain,
draw --draw. Rows appended to docs/results/w4/handoff-fid-<date>.jsonl as each finishes.

    python docs/results/w4/handoff_fid.py --seed 0 --splits q:0-49,q:50-99,q:0-99
"""
import argparse
import datetime
import json
import sys
import time

import torch

sys.path.insert(0, "tools"); sys.path.insert(0, "docs/results/w4")
import ptq4dm  # noqa: E402
from ptq4dm.models.classifier import load_classifier  # noqa: E402
from ptq4dm.models.metrics import classifier_stats, fid_change_interval, frechet_distance, psnr  # noqa: E402
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC  # noqa: E402
from screen_setup import ddpm100_w4  # noqa: E402
from train import load_digits  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--draw", type=int, default=100)
ap.add_argument("--samples", type=int, default=1000)
ap.add_argument("--batch", type=int, default=250)
ap.add_argument("--splits", default="q:0-49,q:50-99,q:0-99",
                help="comma-separated q:A-B: the quantized step for steps A..B (0 = the noisiest), FP elsewhere")
ap.add_argument("--out", default=f"docs/results/w4/handoff-fid-{datetime.date.today()}.jsonl")
args = ap.parse_args()
unet, sampler, step, shape, policy, cache = ddpm100_w4()
res = ptq4dm.quantize(step, calibration=NDTC(n=1024, seed=args.draw, per_chain=4), policy=policy, progress=False,
                      cache_dir=cache, pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false},"
                      "reconstruct{scales=true,n=0,refit=float},bias_correct{groups=10}")
q = res.graph
index = {int(t): i for i, t in enumerate(sampler.timesteps.tolist())}


def hybrid(lo: int, hi: int):
    def fn(x, t, noise):
        return q(x, t, noise) if lo <= index[int(t[0])] <= hi else step(x, t, noise)
    return fn


def draw(fn) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([ptq4dm.sample(fn, sampler, (min(args.batch, args.samples - i), *shape),
                                        seed=args.seed + b).float()
                          for b, i in enumerate(range(0, args.samples, args.batch))])


net = load_classifier()
real, _, _ = load_digits()
with torch.no_grad():
    f_real = classifier_stats(net, real)["feat"]
    ref = draw(step)
    f_ref = classifier_stats(net, ref)["feat"]
fid_fp = frechet_distance(f_ref, f_real)
print(json.dumps({"split": "fp", "fid": fid_fp}), flush=True)
for spec in args.splits.split(","):
    lo, hi = (int(v) for v in spec.removeprefix("q:").split("-"))
    t0 = time.time()
    x = draw(hybrid(lo, hi))
    with torch.no_grad():
        f = classifier_stats(net, x)["feat"]
    fid = frechet_distance(f, f_real)
    lo_i, hi_i = fid_change_interval(f, f_ref, f_real)
    row = dict(split=spec, seed=args.seed, draw=args.draw, samples=args.samples, fid=fid, fid_fp=fid_fp,
               change=fid / fid_fp - 1, interval=[lo_i, hi_i], psnr=float(psnr(x, ref)),
               seconds=round(time.time() - t0, 1), date=str(datetime.date.today()))
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
