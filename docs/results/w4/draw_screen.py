"""(docs/results/w4/draw_screen.py) How much the all-4-bit reconstruct result depends on the calibration draw, and
where the dependence comes from. DDPM-100, the default model, W4A8 recommended policy (as evaluate's config
w4a8-reconstruct-scales). For each calibration draw (NDTC n=256, seed d) the pipeline up to sensitivity runs once
(ranges and the 4 widened activations are the draw's own), then each variant runs on a copy:

  rtn        bias_correct{groups=10} only (nearest rounding)
  rec        reconstruct{scales=true} + bias_correct, both on the draw's own set (the evaluated config)
  rec-x      reconstruct{scales=true} on the OTHER draw's set, bias_correct on its own: a drop here that
             follows the reconstruct set, not the grid, says the learned rounding is what is draw-bound
  rec-long   reconstruct{scales=true, iters=1000, lr=3e-3}: slower, smaller steps

Reported per row: the x_{t-1} error against FP on a fixed held-out draw (NDTC seed 99; relative squared
error), PSNR vs FP of 100 samples (seed 21, DDPM-100), the widened activations, seconds. Rows to
docs/results/w4/draw-screen-<date>.jsonl.

    python docs/results/w4/draw_screen.py --draws 0,100 --variants rtn,rec,rec-x,rec-long
"""
import argparse, copy, datetime, json, sys, time
import torch
sys.path.insert(0, "tools")
import ptq4dm
from ptq4dm.ir.graph import StepGraph
from ptq4dm.passes import NDTC, DEFAULT_PIPELINE, PassContext, Reconstruct, BiasCorrect
from ptq4dm.passes.calibrate import make_calibration_set
from screen_setup import ddpm100_w4
from ptq4dm.models.metrics import psnr
from ptq4dm.api import weights_hash

ap = argparse.ArgumentParser()
ap.add_argument("--draws", default="0,100")
ap.add_argument("--variants", default="rtn,rec,rec-x,rec-long")
ap.add_argument("--samples", type=int, default=100)
ap.add_argument("--out", default=f"docs/results/w4/draw-screen-{datetime.date.today()}.jsonl")
args = ap.parse_args()
unet, sampler, step, shape, policy, cache = ddpm100_w4()
draws = [int(d) for d in args.draws.split(",")]
sets = {d: make_calibration_set(step, sampler, NDTC(n=256, seed=d), (1, *shape), progress=True, cache_dir=cache,
                                model_hash=weights_hash(unet)) for d in draws + [99]}
held = sets[99]
with torch.no_grad():
    x_fp = ptq4dm.sample(step, sampler, (args.samples, *shape), seed=21).float()


def clone(g):
    return StepGraph(copy.deepcopy(g.gm), g.example_inputs, dict(g.meta), g.dynamic_batch)


def err(g, s):
    n = torch.randn(s.x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = g(s.x, s.t, n), step(s.x, s.t, n)
        a = a[0] if isinstance(a, tuple) else a
        b = b[0] if isinstance(b, tuple) else b
    return float((a - b).pow(2).sum() / b.pow(2).sum())


for d in draws:
    res = ptq4dm.quantize(step, calibration=NDTC(n=256, seed=d), policy=policy, progress=False, cache_dir=cache,
                          pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false}")
    widened = [str(k) for k in res.report.sensitivity.get("widened", [])]
    other = next(o for o in draws if o != d) if len(draws) > 1 else d
    for v in args.variants.split(","):
        g, t0 = clone(res.graph), time.time()
        rec = {"rtn": None, "rec": dict(scales=True), "rec-x": dict(scales=True),
               "rec-long": dict(scales=True, iters=1000, lr=3e-3)}[v]
        if rec is not None:
            cs = sets[other] if v == "rec-x" else sets[d]
            Reconstruct(**rec).run(g, PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False))
        BiasCorrect(groups=10).run(g, PassContext(options={"calibration_set": sets[d], "fp_step": step}, progress=False))
        sec = time.time() - t0
        with torch.no_grad():
            x = ptq4dm.sample(g, sampler, (args.samples, *shape), seed=21).float()
        row = dict(draw=d, variant=v, rec_set=(other if v == "rec-x" else d) if rec is not None else None,
                   held_err=err(g, held), train_err=err(g, sets[d]), psnr=float(psnr(x, x_fp)), quantize_s=sec,
                   widened=widened, date=str(datetime.date.today()))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
