"""Which tensors carry the W8A8 error on DDIM, and what removes it (a diagnostic record for
docs/results/history.md, "DDIM: where the W8A8 error comes from"). Each variant: NDTC(n=256, seed=--calib-seed) calibration, its policy /
solver / pipeline suffix, N samples from the same seeds as FP (batch i of 250 uses seed + i); one
JSON row per variant appended to --out: FID (MNIST classifier) and its change vs FP, PSNR vs FP,
the share of samples whose digit changes, seconds.

    python docs/results/ddim/ablate.py VARIANT [VARIANT ...] [--sampler ddim --steps 50 --eta 0] [--n 300] [--seed 11]
"""
import argparse, json, sys, time
from pathlib import Path
import torch
REPO = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(REPO / "tools"))
import ptq4dm
from ptq4dm.passes import MSE, MinMax, NDTC, QuantPolicy, DEFAULT_PIPELINE
from ptq4dm.passes.mark import OUTPUT_ROLES
from ptq4dm.models.classifier import load_classifier
from ptq4dm.models.loading import load_default_unet, trained_schedule
from ptq4dm.models.metrics import classifier_stats, frechet_distance, psnr
from train import load_digits
BC = ",bias_correct{groups=10}"; NC = ",noise_correct{groups=10}"
CFG = {
 "shipped": (dict(), BC, "mse"),
 "minmax": (dict(), "", "minmax"),
 "paper": (dict(), "", "mse"),
 "fpout-bc": (dict(quantize_outputs=False), BC, "mse"),
 "fpout-bc-nc": (dict(quantize_outputs=False), BC + NC, "mse"),   # noise_correct (PTQD form)
 "fpout-nc": (dict(quantize_outputs=False), NC, "mse"),
 "shipped-nc": (dict(), BC + NC, "mse"),
 "fpout-fl-bc": (dict(quantize_outputs=False, keep_first_last_fp=True), BC, "mse"),
 "fpout-w8only-bc": (dict(quantize_outputs=False, act_bits=16, attn_bits=16), BC, "mse"),
 "fpout-a8only-bc": (dict(quantize_outputs=False, weight_bits=16), BC, "mse"),
 "fpout-attnfp-bc": (dict(quantize_outputs=False, quantize_attention=False), BC, "mse"),
 "out16-bc-nc": (dict(output_bits=16), BC + NC, "mse"),
 "outg10-bc-nc": (dict(timestep_groups=10, grouped_roles=OUTPUT_ROLES), BC + NC, "mse"),
 "fpout-split-bc-nc": (dict(quantize_outputs=False, split_cat=True), BC + NC, "mse"),
 "fpout-fl-attnfp-bc": (dict(quantize_outputs=False, keep_first_last_fp=True, quantize_attention=False), BC, "mse"),
 "out16-fl-bc": (dict(output_bits=16, keep_first_last_fp=True), BC, "mse"),
 "fl-bc": (dict(keep_first_last_fp=True), BC, "mse"),
 "fpout-fl": (dict(quantize_outputs=False, keep_first_last_fp=True), "", "mse"),
 "fpout-fl-mm-bc": (dict(quantize_outputs=False, keep_first_last_fp=True), BC, "minmax"),
 "fpout-fl-bc-nc": (dict(quantize_outputs=False, keep_first_last_fp=True), BC + NC, "mse"),
 "out16-fl": (dict(output_bits=16, keep_first_last_fp=True), "", "mse"),
 "out16-fl-attnfp-bc": (dict(output_bits=16, keep_first_last_fp=True, quantize_attention=False), BC, "mse"),
 "out16-fl-g10-bc": (dict(output_bits=16, keep_first_last_fp=True, timestep_groups=10), BC, "mse"),
 "out16-fl-split-bc": (dict(output_bits=16, keep_first_last_fp=True, split_cat=True), BC, "mse"),
 "out16-fl-mm-bc": (dict(output_bits=16, keep_first_last_fp=True), BC, "minmax"),
 "out16-fl-bcg25": (dict(output_bits=16, keep_first_last_fp=True), ",bias_correct{groups=25}", "mse"),
 "out16-fl-bcg1": (dict(output_bits=16, keep_first_last_fp=True), ",bias_correct", "mse"),
 "out16-fl-tfp-bc": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True), BC, "mse"),
 "out16-fl-sym": (dict(output_bits=16, keep_first_last_fp=True, act_symmetric=True), BC, "mse"),
 # the recommended preset, and it with the sensitivity pass widening the k costliest activations to 16 bits
 "rec": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True), BC, "mse"),
 "rec-widen2": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True), ",sensitivity{widen=2}" + BC, "mse"),
 "rec-widen4": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True), ",sensitivity{widen=4}" + BC, "mse"),
 "rec-widen8": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True), ",sensitivity{widen=8}" + BC, "mse"),
 # split_cat: one 8-bit quantizer per part of each skip cat read by a conv (Q-Diffusion's split shortcut)
 "rec-split": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True, split_cat=True), BC, "mse"),
 "rec-split-widen4": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True, split_cat=True),
                      ",sensitivity{widen=4,weights=false}" + BC, "mse"),
 # 4-bit weights: nearest rounding vs learned rounding (reconstruct), on the recommended preset
 "rec-w4": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
            ",sensitivity{widen=4,weights=false}" + BC, "mse"),
 "rec-w4-recon": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct" + BC, "mse"),
 "rec-recon": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
               ",sensitivity{widen=4,weights=false},reconstruct" + BC, "mse"),
 "rec-w4-recon1k": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                    ",sensitivity{widen=4,weights=false},reconstruct{iters=1000}" + BC, "mse"),
 # ... + every rounding together against the UNet's output after the layer-wise phase (reconstruct{network=...})
 "rec-w4-net1k": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct{network=1000}" + BC, "mse"),
 "rec-w4-net1k-r3": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct{network=1000,network_reg=0.001}" + BC, "mse"),
 "rec-w4-net1k-r1": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct{network=1000,network_reg=1}" + BC, "mse"),
 "rec-w4-net1k-r01": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct{network=1000,network_reg=0.1}" + BC, "mse"),
 "rec-w4-net1k-lr3": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct{network=1000,network_lr=0.003}" + BC, "mse"),
 # ... with each weight's per-channel scale learned with its rounding (reconstruct{scales=true})
 "rec-w4-recon-s": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                    ",sensitivity{widen=4,weights=false},reconstruct{scales=true}" + BC, "mse"),
 "rec-mix5-recon-s": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                      ",sensitivity{widen=4,budget=5},reconstruct{scales=true}" + BC, "mse"),
 "rec-recon-s": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                 ",sensitivity{widen=4,weights=false},reconstruct{scales=true}" + BC, "mse"),
 "rec-w4-brecq": (dict(weight_bits=4, output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false},reconstruct{blocks=true}" + BC, "mse"),
 # mixed weight precision: 4 bits, the weights that cost the most back at 8, <= 5 bits per weight on average
 "rec-mix5": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
              ",sensitivity{widen=4,budget=5}" + BC, "mse"),
 "rec-mix5-recon": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                    ",sensitivity{widen=4,budget=5},reconstruct" + BC, "mse"),
 # ... and the next 8 / all activations' scales re-chosen against the step's x_{t-1} error (refine)
 "rec-widen4-refine8": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                        ",sensitivity{widen=4,weights=false,refine=8}" + BC, "mse"),
 "rec-widen4-refineall": (dict(output_bits=16, keep_first_last_fp=True, time_path_fp=True),
                          ",sensitivity{widen=4,weights=false,refine=-1}" + BC, "mse"),
 # the paper's full setting (8-bit mean / variance / x_{t-1}) on top of the recommended passes; widen may not pick
 # the outputs; error_feedback carries x_{t-1}'s rounding residual into the next step (float / 2 bits)
 "rec-out8": (dict(keep_first_last_fp=True, time_path_fp=True), ",sensitivity{widen=4,weights=false,outputs=false}" + BC, "mse"),
 "rec-out8-ef": (dict(keep_first_last_fp=True, time_path_fp=True),
                 ",sensitivity{widen=4,weights=false,outputs=false}" + BC + ",error_feedback", "mse"),
 "rec-out8-ef2": (dict(keep_first_last_fp=True, time_path_fp=True),
                  ",sensitivity{widen=4,weights=false,outputs=false}" + BC + ",error_feedback{residual_bits=2}", "mse"),
 "rec-out8-g50-ef": (dict(keep_first_last_fp=True, time_path_fp=True, timestep_groups=50, grouped_roles=OUTPUT_ROLES),
                     ",sensitivity{widen=4,weights=false,outputs=false}" + BC + ",error_feedback", "mse"),
 "rec-out8-g50": (dict(keep_first_last_fp=True, time_path_fp=True, timestep_groups=50, grouped_roles=OUTPUT_ROLES),
                  ",sensitivity{widen=4,weights=false,outputs=false}" + BC, "mse"),
 "recon-out8-ef": (dict(keep_first_last_fp=True, time_path_fp=True),
                   ",sensitivity{widen=4,weights=false,outputs=false},reconstruct" + BC + ",error_feedback", "mse"),
 "recon-out8-ef2": (dict(keep_first_last_fp=True, time_path_fp=True),
                    ",sensitivity{widen=4,weights=false,outputs=false},reconstruct" + BC + ",error_feedback{residual_bits=2}", "mse"),
}
p = argparse.ArgumentParser(); p.add_argument("cfgs", nargs="+"); p.add_argument("--n", type=int, default=300)
p.add_argument("--seed", type=int, default=11); p.add_argument("--calib-seed", type=int, default=None)
p.add_argument("--sampler", default="ddim"); p.add_argument("--steps", type=int, default=50); p.add_argument("--eta", type=float, default=0.0)
p.add_argument("--threads", type=int, default=1); p.add_argument("--out", default=str(REPO / "docs/results/ddim/ablate.jsonl"))
a = p.parse_args(); torch.set_num_threads(a.threads)
cseed = a.seed if a.calib_seed is None else a.calib_seed
unet = load_default_unet()
kw = {"eta": a.eta} if a.sampler == "ddim" else {"variance_type": "fixed_small"}
sampler = ptq4dm.make_sampler(a.sampler, num_inference_steps=a.steps, schedule=trained_schedule(None), **kw)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
net = load_classifier(); real, _, _ = load_digits(); rs = classifier_stats(net, real)
shape = step.sample_shape(1)[1:]
def draw(fn):
    outs = []
    for b, i in enumerate(range(0, a.n, 250)):
        outs.append(ptq4dm.sample(fn, sampler, (min(250, a.n - i), *shape), seed=a.seed + b).float())
    return torch.cat(outs)
tag = f"{a.sampler}{a.steps}-eta{a.eta}-n{a.n}-s{a.seed}"
fpf = REPO / ".cache" / f"ddim-ablate-fp-{tag}.pt"   # the FP samples, drawn once
with torch.no_grad():
    if fpf.exists(): xf = torch.load(fpf)
    else:
        xf = draw(step); fpf.parent.mkdir(exist_ok=True); torch.save(xf, fpf.with_suffix('.tmp')); fpf.with_suffix('.tmp').replace(fpf)
sf = classifier_stats(net, xf); pf = sf["logits"].argmax(1); fid_fp = frechet_distance(sf["feat"], rs["feat"])
print(f"FP {tag} FID {fid_fp:.3f}", flush=True)
for c in a.cfgs:
    pol, extra, solv = CFG[c]; t0 = time.time()
    res = ptq4dm.quantize(step, calibration=NDTC(n=256, seed=cseed), solver=MSE() if solv == "mse" else MinMax(),
                          policy=QuantPolicy(**pol), pipeline=DEFAULT_PIPELINE + extra, progress=False,
                          cache_dir=REPO / ".cache/calibration")
    with torch.no_grad(): x = draw(res.graph)
    s = classifier_stats(net, x); fid = frechet_distance(s["feat"], rs["feat"])
    net_ = (res.report.reconstruct or {}).get("network")
    if net_: print("network phase", {k: v for k, v in net_.items()}, flush=True)
    row = dict(cfg=c, tag=tag, calib_seed=cseed, fid=fid, fid_fp=fid_fp, rel=100 * (fid - fid_fp) / fid_fp, psnr=psnr(x, xf),
               changed=float((s["logits"].argmax(1) != pf).float().mean()), sec=time.time() - t0)
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as fh: fh.write(json.dumps(row) + "\n")
