#!/usr/bin/env python
"""At which noise level does the model start to lose digits? Noise real digits, denoise them back.

    python tools/denoise_from.py --from-t 0,100,300,500,700,900 --n 500 --steps 100

For each starting timestep t the classifier's held-out digits (the 500 it never trained on) are
noised by the forward process, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the sampler
(DDPM, respaced to ``--steps``) takes them from t back to 0 with the FP model ("SDEdit"). The
classifier then reports, per t: the share it is sure of (confidence >= 0.9, the bar of issue 4),
and the share still read as the digit it started as. t = 0 is the real digits themselves; a last
row samples from pure noise (x_T ~ N(0, I)), the ordinary sampler. Where the confident share
falls between those two says which noise levels the model's unsure samples come from.
Same seeds for every t (``--seed``): row differences are the noise level's, not the draw's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, atomic_write_json  # noqa: E402

CONFIDENT = 0.9


@torch.no_grad()
def denoise_from(step, sampler, x0: torch.Tensor, t_start: int | None, seed: int) -> torch.Tensor:
    """Noise ``x0`` to ``t_start`` (None: pure noise, the whole chain) and run the sampler back to 0."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    ts = sampler.timesteps.tolist()
    if t_start is None:
        x = eps
    else:
        if t_start not in ts and t_start != 0:
            raise ValueError(f"t = {t_start} is not on the sampler's grid (multiples of {sampler.stride} up to {ts[0]})")
        if t_start == 0:
            return x0.clone()
        abar = sampler.alphas_cumprod[t_start]
        x = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        ts = [t for t in ts if t <= t_start]
    for t_val in ts:
        t = torch.full((x.shape[0],), t_val, dtype=torch.long)
        x = step(x, t, torch.randn(x.shape, generator=g))[0]
    return x


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-t", default="0,100,300,500,700,900",
                   help="comma-separated starting timesteps, on the sampler's grid (0 = the real digits)")
    p.add_argument("--n", type=int, default=500, help="held-out digits used (at most 500)")
    p.add_argument("--steps", type=int, default=100, help="DDPM steps of the full chain (the grid's spacing is T / steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=None, help="a .safetensors with its .json card (default: the shipped model)")
    p.add_argument("--out-json", default=None)
    p.add_argument("--grid", default=None, metavar="PNG",
                   help="also draw the first 16 digits as denoised from each t, captioned with the "
                        "classifier's digit and confidence")
    args = p.parse_args(argv)
    try:
        starts = [int(s) for s in args.from_t.split(",") if s.strip()]
    except ValueError:
        p.error(f"--from-t {args.from_t!r}: give integers separated by commas, e.g. 0,300,600")
    if not 1 <= args.n <= 500:
        p.error(f"--n {args.n}: the classifier holds out 500 digits; pick 1..500")
    torch.set_num_threads(args.threads)

    import ptq4dm
    from ptq4dm.models.classifier import load_classifier
    from ptq4dm.models.loading import DEFAULT_MODEL, load_default_unet, load_unet, trained_schedule
    from train import load_digits, split

    unet = load_default_unet() if args.weights is None else load_unet(None, args.weights)
    sampler = ptq4dm.make_sampler("ddpm", num_inference_steps=args.steps, schedule=trained_schedule(args.weights))
    step = ptq4dm.DiffusionStep(unet, sampler).eval()
    off = [t for t in starts if t != 0 and t not in sampler.timesteps.tolist()]
    if off:
        p.error(f"--from-t {','.join(map(str, off))}: not on the grid of DDPM-{args.steps} (multiples of "
                f"{sampler.stride} from 0 to {sampler.timesteps[0].item()}); pick timesteps on it")
    card = json.loads((REPO / "models" / "weights" / "mnist-classifier.json").read_text())
    x, y, _ = load_digits()
    _, held = split(x.shape[0], card["heldout"], card["seed"])
    x0, y0 = x[held[:args.n]], y[held[:args.n]]
    net = load_classifier()

    rows, pictures = [], []
    for t_start in tqdm([*starts, None], desc="from t", unit="t"):
        outs = [denoise_from(step, sampler, x0[i:i + args.batch], t_start, args.seed + i // args.batch)
                for i in range(0, args.n, args.batch)]
        out = torch.cat(outs).clamp(-1, 1)
        with torch.no_grad():
            prob = net(out).softmax(1)
        conf, pred = prob.max(1)
        pictures.append((f"from t = {'T (noise)' if t_start is None else t_start}", out[:16],
                         [f"{int(d)} {float(c):.2f}" for d, c in zip(pred[:16], conf[:16])]))
        rows.append({"from_t": "T (pure noise)" if t_start is None else t_start,
                     "confident_frac": float((conf >= CONFIDENT).float().mean()),
                     "same_digit_frac": None if t_start is None else float((pred == y0).float().mean()),
                     "mean_confidence": float(conf.mean())})
        r = rows[-1]
        same = "—" if r["same_digit_frac"] is None else f"{r['same_digit_frac']:.3f}"
        tqdm.write(f"from t = {r['from_t']}: conf >= {CONFIDENT} {r['confident_frac']:.3f}, same digit {same}")

    command = "python tools/denoise_from.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command}\n\n| from t | conf >= {CONFIDENT} | same digit as the real one | mean confidence |\n|---|---|---|---|")
    for r in rows:
        same = "—" if r["same_digit_frac"] is None else f"{r['same_digit_frac']:.3f}"
        print(f"| {r['from_t']} | {r['confident_frac']:.3f} | {same} | {r['mean_confidence']:.3f} |")
    result = {"meta": {"command": command, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "cpu": platform.machine(), "n": args.n, "seed": args.seed, "sampler": sampler.config(),
                       "weights": args.weights or DEFAULT_MODEL.name},
              "rows": rows}
    if args.out_json:
        atomic_write_json(Path(args.out_json), result)
    if args.grid:
        from evaluate import grid_png

        grid_png(pictures, Path(args.grid))
    return result


if __name__ == "__main__":
    main()
