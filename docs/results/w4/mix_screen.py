"""(docs/results/w4/mix_screen.py) Does the mixed 4/8-bit policy pick better layers when each calibration sample's error
counts by how far its step moves the final sample? The mixed <= 5 bits row (evaluate's mixed5 configs) ranks each
weight by the step's x_{t-1} error at 4 and at 8 bits, every calibration sample alike; the chain loses the 4-bit
samples in the noisy steps (details.md, "Where the chain loses the samples"). `sensitivity{t_weight=g}` weighs each
sample's squared x_{t-1} error by ||d x_0 / d x_{t-1}||^2 of its step (float chains) to the power g. For each g: the
recommended preset's policy, `sensitivity{widen=4,budget=5,t_weight=g}`, then (optionally) reconstruct, then
bias_correct{groups=10}; PSNR vs FP of the samples of two sampling seed sets, and which weights stayed at 8 bits.
Rows appended to docs/results/w4/mix-screen-<date>.jsonl.

    python docs/results/w4/mix_screen.py --sampler ddim --steps 50 --draw 2000 --g 0,1
    python docs/results/w4/mix_screen.py --sampler ddim --steps 50 --draw 2000 --g 0,1 --recon scales=true,n=0,refit=float
"""
import argparse, datetime, json, pathlib, sys, time
import torch
sys.path.insert(0, "tools")
import ptq4dm
from ptq4dm.models.loading import load_default_unet, trained_schedule
from ptq4dm.models.metrics import psnr
from ptq4dm.passes import NDTC, PRESETS

ap = argparse.ArgumentParser()
ap.add_argument("--sampler", default="ddim")
ap.add_argument("--steps", type=int, default=50)
ap.add_argument("--calib-n", type=int, default=1024)
ap.add_argument("--per-chain", type=int, default=4)
ap.add_argument("--draw", type=int, default=2000)
ap.add_argument("--g", default="0,1", help="t_weight powers, comma-separated")
ap.add_argument("--sens", default="", help="extra sensitivity options, k=v,... (e.g. n=256)")
ap.add_argument("--recon", default="", help="reconstruct options (k=v,...); empty: no reconstruct (nearest rounding)")
ap.add_argument("--weight-bits", type=int, default=0, help="> 0: every weight at this width (no budget; --g ignored)")
ap.add_argument("--sample-seeds", default="21,500")
ap.add_argument("--samples", type=int, default=100)
ap.add_argument("--out", default=f"docs/results/w4/mix-screen-{datetime.date.today()}.jsonl")
args = ap.parse_args()

torch.set_num_threads(2)
unet = load_default_unet()
kw = {"variance_type": "fixed_small"} if args.sampler == "ddpm" else {}
sampler = ptq4dm.make_sampler(args.sampler, num_inference_steps=args.steps, schedule=trained_schedule(None), **kw)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
shape = step.sample_shape(1)[1:]
policy = PRESETS["recommended"][1]
if args.weight_bits:
    import dataclasses
    policy = dataclasses.replace(policy, weight_bits=args.weight_bits)
sseeds = [int(s) for s in args.sample_seeds.split(",")]
with torch.no_grad():
    ref = {s: ptq4dm.sample(step, sampler, (args.samples, *shape), seed=s).float() for s in sseeds}
for g in [0.0] if args.weight_bits else [float(x) for x in args.g.split(",")]:
    sens = ",".join(["widen=4"] + (["weights=false"] if args.weight_bits else ["budget=5"])
                    + ([f"t_weight={g:g}"] if g else []) + ([args.sens] if args.sens else []))
    passes = f"decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{{{sens}}}"
    passes += (f",reconstruct{{{args.recon}}}" if args.recon else "") + ",bias_correct{groups=10}"
    t0 = time.time()
    res = ptq4dm.quantize(step, calibration=NDTC(n=args.calib_n, seed=args.draw, per_chain=args.per_chain),
                          policy=policy, pipeline=passes, progress=False, cache_dir=pathlib.Path(".cache/calibration"))
    sec = time.time() - t0
    with torch.no_grad():
        out = {str(s): float(psnr(ptq4dm.sample(res.graph, sampler, (args.samples, *shape), seed=s).float(), ref[s]))
               for s in sseeds}
    sr = res.report.sensitivity
    mixed = sr.get("mixed") or {"average_bits": float(args.weight_bits), "layers": []}
    row = dict(sampler=args.sampler, steps=args.steps, calib_n=args.calib_n, per_chain=args.per_chain, draw=args.draw,
               t_weight=g, weight_bits=args.weight_bits or "mixed", sens=sens, recon=args.recon, psnr=out, quantize_s=round(sec, 1),
               average_bits=mixed["average_bits"],
               weights_at_bits={b: sum(r["elements"] for r in mixed["layers"] if r["bits"] == b) / max(mixed.get("weights", 1), 1)
                                for b in sorted({r["bits"] for r in mixed["layers"]})},
               eight_bit=sorted(r["key"] for r in mixed["layers"] if r["bits"] == 8),
               step_error=sr["error_all"], step_error_after=sr.get("error_all_mixed", sr.get("error_all_widened")),
               widened=sr["widened"], date=str(datetime.date.today()))
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
