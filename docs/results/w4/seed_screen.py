"""(docs/results/w4/seed_screen.py) Is the all-4-bit reconstruct result bound to the calibration set, or a lottery
over any perturbation of the learned rounding? DDPM-100, the default model, W4A8 recommended policy (evaluate's
config w4a8-reconstruct-scales-all). One calibration set (NDTC n, per_chain K, seed d); the pipeline up to
sensitivity runs once; then for each reconstruct seed s (the minibatch order: nothing else changes)
reconstruct{scales=true,n=0,seed=s} + bias_correct{groups=10} on a copy, and PSNR vs FP of the samples of two
disjoint sampling seed sets (DDPM-100): if the PSNR moves with s as much as it moved with the set, the rounding's
outcome is a lottery, and whether the two seed sets rank the variants alike says whether a held-out chain
can select among them. Rows appended to docs/results/w4/seed-screen-<date>.jsonl.

    python docs/results/w4/seed_screen.py --calib-n 1024 --per-chain 4 --draw 100 --seeds 0,1,2
"""
import argparse, copy, datetime, json, sys, time
import torch
sys.path.insert(0, "tools")
import ptq4dm
from ptq4dm.ir.graph import StepGraph
from ptq4dm.passes import NDTC, DEFAULT_PIPELINE, PassContext, Reconstruct, BiasCorrect
from screen_setup import ddpm100_w4
from ptq4dm.models.metrics import psnr
from ptq4dm.api import weights_hash

ap = argparse.ArgumentParser()
ap.add_argument("--calib-n", type=int, default=1024)
ap.add_argument("--per-chain", type=int, default=4)
ap.add_argument("--draw", type=int, default=100)
ap.add_argument("--seeds", default="0,1,2")
ap.add_argument("--opts", default="", help="extra reconstruct options, k=v,... (e.g. iters=1000)")
ap.add_argument("--sample-seeds", default="21,500", help="two sampling seed sets (one batch each)")
ap.add_argument("--samples", type=int, default=100)
ap.add_argument("--out", default=f"docs/results/w4/seed-screen-{datetime.date.today()}.jsonl")
args = ap.parse_args()
unet, sampler, step, shape, policy, cache = ddpm100_w4()
calib = NDTC(n=args.calib_n, seed=args.draw, per_chain=args.per_chain)
sseeds = [int(s) for s in args.sample_seeds.split(",")]
with torch.no_grad():
    ref = {s: ptq4dm.sample(step, sampler, (args.samples, *shape), seed=s).float() for s in sseeds}
res = ptq4dm.quantize(step, calibration=calib, policy=policy, progress=False, cache_dir=cache,
                      pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false}")
cs = res.calibration_set
extra = {k: (v == "true") if isinstance(getattr(Reconstruct, k), bool) else type(getattr(Reconstruct, k))(v)
         for k, v in (kv.split("=") for kv in args.opts.split(",") if kv)}
for s in [int(x) for x in args.seeds.split(",")]:
    g, t0 = StepGraph(copy.deepcopy(res.graph.gm), res.graph.example_inputs, dict(res.graph.meta), res.graph.dynamic_batch), time.time()
    g.meta["qparams"] = copy.deepcopy(res.graph.meta["qparams"])
    ctx = PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False)
    Reconstruct(**{"scales": True, "n": 0, **extra, "seed": s}).run(g, ctx)
    BiasCorrect(groups=10).run(g, PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False))
    sec = time.time() - t0
    out = {}
    with torch.no_grad():
        for ss in sseeds:
            out[ss] = float(psnr(ptq4dm.sample(g, sampler, (args.samples, *shape), seed=ss).float(), ref[ss]))
    row = dict(calib_n=args.calib_n, per_chain=args.per_chain, draw=args.draw, recon_seed=s, opts=args.opts,
               psnr={str(k): v for k, v in out.items()}, quantize_s=round(sec, 1),
               recon_error_after=ctx.results["reconstruct"]["error_after"], date=str(datetime.date.today()))
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
