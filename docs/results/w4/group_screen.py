"""(docs/results/w4/group_screen.py) 4-bit weights with a scale per group of input weights, kept int8-exact:
a screen on DDPM-100, the default model, weights rounded to nearest (no reconstruct).

Per output channel c the 4-bit grid of the range solver has scale s_c (per channel, MSE). Here each group of
``g`` consecutive weights of the channel (in the flattened C x KH x KW order) gets its own scale m * s_c / 16 with
an integer m in 1..16 chosen by least squared error (m = 16 for every group is the per-channel grid, so no group
is worse off). Codes q in [-7, 7] (the symmetric 4-bit range) times m stay in [-112, 112]: the weight is exactly an int8 per-channel weight
with scale s_c / 16, so int8 lowering runs it unchanged; storage is 4 bits per weight + 4 bits per group (4.125
at g = 32). ``float`` variants: the group scale free (MSE over 32 candidate fractions of the group's max), the
bound that integer multipliers approach. Rows: the pipeline up to sensitivity once (W4A8 recommended policy, NDTC
n=256, calibration seed 31), then per variant the weights replaced, bias_correct{groups=10}, the x_{t-1} error
against FP on the calibration set and on a held-out NDTC draw (seed 99), PSNR vs FP of 100 samples (seed 21).

    python docs/results/w4/group_screen.py pc int32 int16 float32 --out docs/results/w4/group-screen.jsonl
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch

import ptq4dm
from ptq4dm.api import weights_hash
from ptq4dm.ir.graph import StepGraph
from ptq4dm.models.metrics import psnr
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, BiasCorrect, PassContext
from ptq4dm.passes.bias_correct import FLOAT_WEIGHT, _attr
from ptq4dm.passes.calibrate import make_calibration_set
from ptq4dm.passes.observe import QTENSOR
from screen_setup import ddpm100_w4


def group_multipliers(w: torch.Tensor, s_c: torch.Tensor, g: int) -> torch.Tensor:
    """w (OC, ...) float, s_c (OC,) the channel's 4-bit scale -> the integer multiplier m in 1..16 of each weight's
    group of g (weight-shaped): the m whose grid m * s_c / 16 rounds the group with the least squared error."""
    oc = w.shape[0]
    flat = w.reshape(oc, -1)
    k = flat.shape[1]
    x = torch.nn.functional.pad(flat, (0, (-k) % g)).reshape(oc, -1, g)      # (OC, G, g); padding is 0: no error
    m = torch.arange(1, 17, dtype=w.dtype).reshape(16, 1, 1, 1)
    s = m * (s_c.reshape(1, oc, 1, 1) / 16)                                     # (16, OC, 1, 1)
    q = torch.clamp(torch.round(x.unsqueeze(0) / s), -7, 7) * s                 # (16, OC, G, g)
    best = ((q - x.unsqueeze(0)).pow(2).sum(-1).argmin(0) + 1).to(w.dtype)      # (OC, G)
    return best.unsqueeze(-1).expand(oc, best.shape[1], g).reshape(oc, -1)[:, :k].reshape(w.shape)


def group_int(w: torch.Tensor, s_c: torch.Tensor, g: int) -> torch.Tensor:
    """w (OC, ...) float, s_c (OC,) the channel's 4-bit scale -> w on the grid m * s_c / 16 per group, m in 1..16."""
    sg = s_c.reshape(-1, *[1] * (w.dim() - 1)) * group_multipliers(w, s_c, g) / 16
    return torch.clamp(torch.round(w / sg), -7, 7) * sg


def group_float(w: torch.Tensor, g: int) -> torch.Tensor:
    """Free per-group scale: MSE over 32 fractions (0.3..1) of the group's max / 7 (the symmetric 4-bit grid)."""
    oc = w.shape[0]
    flat = w.reshape(oc, -1)
    k = flat.shape[1]
    pad = (-k) % g
    x = torch.nn.functional.pad(flat, (0, pad)).reshape(oc, -1, g)
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    frac = torch.linspace(0.3, 1.0, 32, dtype=w.dtype).reshape(32, 1, 1, 1)
    s = frac * amax.unsqueeze(0) / 7
    q = torch.clamp(torch.round(x.unsqueeze(0) / s), -7, 7) * s
    best = (q - x.unsqueeze(0)).pow(2).sum(-1).argmin(0)
    out = torch.gather(q, 0, best.reshape(1, oc, -1, 1).expand(1, oc, x.shape[1], g))[0]
    return out.reshape(oc, -1)[:, :k].reshape(w.shape)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="+", help="pc (per channel, as solved), intG (integer group multipliers, "
                   "group size G), floatG (free group scales)")
    p.add_argument("--out", default="docs/results/w4/group-screen.jsonl")
    p.add_argument("--calib-seed", type=int, default=31)
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    unet, sampler, step, _, pol, cache = ddpm100_w4()
    res = ptq4dm.quantize(step, calibration=NDTC(n=256, seed=args.calib_seed), policy=pol, progress=False,
                          pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false}", cache_dir=cache)
    cs = res.calibration_set
    shape = step.sample_shape(1)[1:]
    held = make_calibration_set(step, sampler, NDTC(n=256, seed=99), (1, *shape), progress=False, cache_dir=cache,
                                model_hash=weights_hash(unet))
    fp_path = Path(f".cache/group-screen-fp-ddpm100-n{args.n}-s{args.seed}.pt")
    if fp_path.exists():
        xf = torch.load(fp_path)
    else:
        with torch.no_grad():
            xf = ptq4dm.sample(step, sampler, (args.n, *shape), seed=args.seed).float()
        torch.save(xf, fp_path)

    def clone(gr):
        return StepGraph(copy.deepcopy(gr.gm), gr.example_inputs, dict(gr.meta), gr.dynamic_batch)

    def err(gr, s):
        noise = torch.randn(s.x.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            a, b = gr(s.x, s.t, noise)[0], step(s.x, s.t, noise)[0]
        return float((a - b).pow(2).sum() / b.pow(2).sum())

    qparams = res.graph.meta["qparams"]
    for v in args.variants:
        gr, t0 = clone(res.graph), time.time()
        changed = 0
        for n in gr.graph.nodes:
            if n.op != "get_attr" or FLOAT_WEIGHT not in n.meta:
                continue
            qp = qparams[n.meta[QTENSOR].key]
            if qp.qmax != 7 or v == "pc":   # 4-bit weights only (symmetric: codes -7..7)
                continue
            wf = _attr(gr.gm, n.meta[FLOAT_WEIGHT]).detach().float()
            g = int(v.lstrip("intfloat"))
            new = group_int(wf, qp.scale.float().reshape(-1), g) if v.startswith("int") else group_float(wf, g)
            with torch.no_grad():
                _attr(gr.gm, str(n.target)).copy_(new.to(_attr(gr.gm, str(n.target)).dtype))
            changed += 1
        ctx = PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False)
        tr, he = err(gr, cs), err(gr, held)
        BiasCorrect(groups=10).run(gr, ctx)
        with torch.no_grad():
            x = ptq4dm.sample(gr, sampler, (args.n, *shape), seed=args.seed).float()
        row = {"variant": v, "weights_changed": changed, "calib_seed": args.calib_seed, "seed": args.seed,
               "train_err": tr, "held_err": he, "psnr": float(psnr(x, xf)), "s": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
