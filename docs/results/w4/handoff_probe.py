"""(docs/results/w4/handoff_probe.py) Where along the chain does the 4-bit step lose the samples? DDPM-100, the default
model, W4A8 + reconstruct{scales=true,n=0,refit=float} + bias_correct{groups=10} (the row of 2026-12-07), calibration
NDTC n=1024, 4 per chain, draw 100 (the seed screen's). From the same x_T and noise, the quantized step runs the
first k steps and the FP step the rest (k = 0: all FP, k = S: all quantized), and the reverse (FP first, quantized
from step k on); PSNR of the samples vs the all-FP ones, sampling seeds 21 and 500 (100 samples each). If the loss
is made late (small t, where the injected noise is small), a hand-off at k near S keeps most of it.

    python docs/results/w4/handoff_probe.py
"""
import json
import sys

import torch

sys.path.insert(0, "tools"); sys.path.insert(0, "docs/results/w4")
import ptq4dm  # noqa: E402
from ptq4dm.models.metrics import psnr  # noqa: E402
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC  # noqa: E402
from screen_setup import ddpm100_w4  # noqa: E402

unet, sampler, step, shape, policy, cache = ddpm100_w4()
res = ptq4dm.quantize(step, calibration=NDTC(n=1024, seed=100, per_chain=4), policy=policy, progress=False,
                      cache_dir=cache, pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false},"
                      "reconstruct{scales=true,n=0,refit=float},bias_correct{groups=10}")
q, S = res.graph, sampler.S


def hybrid(k: int, quant_first: bool):
    def fn(x, t, noise):
        i = int((sampler.timesteps == int(t[0])).nonzero()[0])
        use_q = (i < k) if quant_first else (i >= k)
        return q(x, t, noise) if use_q else step(x, t, noise)
    return fn


ks = [0, 50, 70, 80, 90, 95, 98, 100]
with torch.no_grad():
    ref = {s: ptq4dm.sample(step, sampler, (100, *shape), seed=s).float() for s in (21, 500)}
    for quant_first in (True, False):
        for k in ks:
            if (quant_first and k == 0) or (not quant_first and k == S):
                continue   # all FP: the reference itself
            out = {s: float(psnr(ptq4dm.sample(hybrid(k, quant_first), sampler, (100, *shape), seed=s).float(), ref[s]))
                   for s in (21, 500)}
            row = {"quantized": f"steps 0..{k - 1}" if quant_first else f"steps {k}..{S - 1}", "k": k,
                   "quant_first": quant_first, "psnr": out}
            print(json.dumps(row), flush=True)
