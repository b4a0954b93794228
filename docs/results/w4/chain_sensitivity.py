"""(docs/results/w4/chain_sensitivity.py) How much an error in the UNet's output at each step moves the final sample,
along float chains of the default model: ``ptq4dm.models.step.chain_sensitivity`` (||d x_0 / d eps_k||_F^2 / d,
Hutchinson, one probe per chain), for DDPM-100 (fixed_small) and DDIM-50, 32 chains from two seeds each; the
arithmetic mean over chains and the geometric mean (what reconstruct{t_weight} uses) at every 5th (DDPM) / 2nd (DDIM)
step. Rows appended to docs/results/w4/chain-sensitivity-<date>.jsonl.

    python docs/results/w4/chain_sensitivity.py
"""
import datetime, json, time
import torch
import ptq4dm
from ptq4dm.models.step import chain_sensitivity
from ptq4dm.models.loading import load_default_unet, trained_schedule

torch.set_num_threads(2)
unet = load_default_unet().eval()
for p in unet.parameters():
    p.requires_grad_(False)
out = f"docs/results/w4/chain-sensitivity-{datetime.date.today()}.jsonl"
for kind, S in (("ddpm", 100), ("ddim", 50)):
    kw = dict(variance_type="fixed_small") if kind == "ddpm" else {}
    sampler = ptq4dm.make_sampler(kind, num_inference_steps=S, schedule=trained_schedule(None), **kw)
    for seed in (0, 1):
        t0 = time.time()
        s = chain_sensitivity(unet, sampler, (32, *ptq4dm.DiffusionStep(unet, sampler).sample_shape(1)[1:]), seed=seed)
        geo = s.double().clamp_min(1e-30).log().mean(0).exp()
        row = dict(sampler=kind, steps=S, chains=32, seed=seed, seconds=round(time.time() - t0, 1),
                   mean=s.double().mean(0).tolist(), geo=geo.tolist(),
                   geo_first_over_min=float(geo[0] / geo.min()), date=str(datetime.date.today()))
        print(kind, S, seed, f"{row['seconds']}s first/min {row['geo_first_over_min']:.0f}x geo",
              " ".join(f"{v:.2g}" for v in geo[::5 if S == 100 else 2].tolist()), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
