"""How large is the quantized step's mean error against the step's own variance (DDPM-100, W4A8 + reconstruct
refit=float, calibration draw 100)? Along 64 FP chains (seed 777) at each step: the FP step and the quantized step
on the same x_t; e = mean_q - mean_fp. Per step: var(e) (pixels and samples; its mean removed) and the share of it not
explained by a gain on (mean_fp - its mean), against the step's variance."""
import sys
import torch
sys.path.insert(0, "tools"); sys.path.insert(0, "docs/results/w4")
import ptq4dm
from ptq4dm.passes import NDTC, DEFAULT_PIPELINE
from screen_setup import ddpm100_w4
unet, sampler, step, shape, policy, cache = ddpm100_w4()
opts = sys.argv[1] if len(sys.argv) > 1 else "scales=true,n=0,refit=float"
res = ptq4dm.quantize(step, calibration=NDTC(n=1024, seed=100, per_chain=4), policy=policy, progress=False,
                      cache_dir=cache, pipeline=DEFAULT_PIPELINE + f",sensitivity{{widen=4,weights=false}},"
                      f"reconstruct{{{opts}}},bias_correct{{groups=10}}")
q = res.graph
g = torch.Generator().manual_seed(777)
x = torch.randn((64, *shape), generator=g)
rows = []
with torch.no_grad():
    for i, tv in enumerate(sampler.timesteps.tolist()):
        t = torch.full((64,), tv, dtype=torch.long)
        noise = torch.randn(x.shape, generator=g)
        f = step(x, t, noise)
        o = q(x, t, noise)
        e = (o[1] - f[1]).double()
        mf = (f[1] - f[1].mean()).double()
        ec = e - e.mean()
        k = float((ec * mf).sum() / (mf * mf).sum())
        r = ec - k * mf
        var = float(f[2].double().mean())
        rows.append((i, tv, float(e.mean()), k, float(ec.var()), float(r.var()), var))
        x = f[0]
print("step t mean(e) gain-1 var(e) var(r) variance ratio(r/variance)")
for (i, tv, m, k, ve, vr, var) in rows:
    if i % 5 == 0 or i > 94:
        print(f"{i:3d} {tv:4d} {m:+.5f} {k:+.4f} {ve:.3e} {vr:.3e} {var:.3e} {vr / max(var, 1e-30):.3f}")
import statistics
print("mean ratio over steps with variance > 0:", statistics.mean(vr / var for (_, _, _, _, _, vr, var) in rows if var > 0))
