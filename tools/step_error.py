#!/usr/bin/env python
"""Where along the sampling chain does quantization error enter? Teacher-forced, step by step.

    python tools/step_error.py --n 32 --configs ptq4dm-w8a8,minmax-w8a8 --png step-error.png

The FP step runs the chain from x_T ~ N(0, I) (seed ``--seed``); at every step each quantized
configuration gets the *same* (x_t, t, noise) and its x_{t-1} is compared with the FP step's.
Errors therefore do not compound, so each step's number is what quantization adds at that step
alone; a sampled chain (tools/evaluate.py) shows the compounded effect.

Per step the tool reports ``E ||dx_{t-1}||^2 / (2 sigma_t^2)`` per sample, sigma_t^2 the FP
step's variance: the KL divergence between the two Gaussian transitions when both share sigma_t
(it then also counts what rounding the variance does). The sum over steps is a path KL in nats;
the last step (sigma = 0: x_0 is the mean) is reported apart as the RMS of dx_0 per pixel.
Configurations are tools/evaluate.py's (``--configs`` takes the same names).

DDIM (``--sampler ddim``): with eta 0 no step has noise (sigma_t = 0), so every step reports
the per-pixel RMS of dx_{t-1}, and the summary's ``path`` is the sum over steps of that RMS
squared (a path MSE, not a KL); with eta > 0 the steps with sigma_t > 0 report the KL as for
DDPM. ``--ablate`` adds, for each configuration, the same configuration with one part kept in
float (outputs, conv_in / conv_out, attention, all activations, all weights): which tensors
carry the error, step by step.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, atomic_write, atomic_write_json  # noqa: E402


def step_errors(fp_step, q_steps: dict, sampler, x_T: torch.Tensor, generator: torch.Generator,
                progress: bool = False, variances: dict | None = None) -> dict[str, list[float]]:
    """Teacher-forced per-step errors of each step function in ``q_steps`` against ``fp_step``.

    Returns ``{name: [e_0, ..., e_{S-1}]}``, step 0 the noisiest: ``e_i`` is the mean over samples
    of ``||dx_{t-1}||^2 / (2 sigma_t^2)`` where sigma_t > 0, and the per-pixel RMS of dx_0 at the
    last step (sigma = 0). ``variances``, if given, receives ``{"reference": [...], name: [...]}``
    (the FP step's, then each config's): the variance each step used (first element of the
    batch), so rounding of it shows.
    """
    from ptq4dm.models.step import trajectory

    out = {name: [] for name in q_steps}
    seen = []  # (noise, FP step output) of the step trajectory() just ran

    def fp(x, t, noise):
        ref = fp_step(x, t, noise)
        seen.append((noise, ref))
        return ref

    chain = trajectory(fp, sampler, x_T, generator)
    if progress:
        from tqdm import tqdm

        chain = tqdm(chain, total=sampler.S, desc="steps", unit="step", leave=False)
    with torch.no_grad():
        for _, t, x, prev in chain:
            noise, ref = seen.pop()
            var = ref[2].reshape(x.shape[0], -1)[:, 0]
            if variances is not None:
                variances.setdefault("reference", []).append(float(var[0]))
            for name, fn in q_steps.items():
                q = fn(x, t, noise)
                if variances is not None:
                    variances.setdefault(name, []).append(float(q[2].reshape(-1)[0]))
                d2 = (q[0] - prev).double().pow(2).flatten(1).sum(1)
                if bool((var > 0).all()) and float(var.min()) > 1e-12:
                    out[name].append(float((d2 / (2 * var.double())).mean()))
                else:
                    out[name].append(float((d2 / x[0].numel()).mean().sqrt()))
    return out


def summarize(errs: list[float], parts: int = 10, deterministic: bool = False) -> dict:
    """Path KL (all steps but the last), its share per ``parts`` consecutive slices of the steps
    (slice 0 the noisiest), and the last step's RMS. ``deterministic`` (DDIM, eta 0: every entry
    is an RMS): the path is the sum of the squared RMS over all steps ("path_mse")."""
    kl = [e * e for e in errs] if deterministic else errs[:-1]
    n = len(kl)
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return {("path_mse" if deterministic else "path_kl"): sum(kl),
            "by_slice": [sum(kl[a:b]) for a, b in zip(bounds, bounds[1:])], "last_step_rms": errs[-1]}


ABLATIONS = {   # suffix -> the fields of tools/evaluate.py's Config that keep one part in float
    "outputs-fp": {"quantize_outputs": False},
    "first-last-fp": {"keep_first_last": True},
    "attention-fp": {"quantize_attention": False},
    "activations-fp": {"act_bits": 16, "attn_bits": 16, "output_bits": 16},
    "weights-fp": {"weight_bits": 16},
}


def plot_png(curves: dict[str, list[float]], timesteps: list[int], path: Path, title: str) -> None:
    """Per-step KL on a log axis against the step index (noisiest left), one line per config."""
    import math

    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 900, 420, 70, 20, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vals = [v for c in curves.values() for v in c[:-1] if v > 0]
    lo, hi = (math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))) if vals else (-3, 0)
    hi = max(hi, lo + 1)
    n = max(len(c) for c in curves.values()) - 1

    def xy(i, v):
        y = math.log10(max(v, 10 ** lo))
        return L + (W - L - R) * i / max(n - 1, 1), H - B - (H - T - B) * (y - lo) / (hi - lo)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for e in range(lo, hi + 1):
        _, y = xy(0, 10 ** e)
        d.line([L, y, W - R, y], fill=(225, 225, 225))
        d.text((8, y - 6), f"1e{e}", fill="black")
    for i in range(0, n, max(1, n // 10)):
        x, _ = xy(i, 10 ** lo)
        d.text((x - 8, H - B + 6), f"t={timesteps[i]}", fill="black")
    d.text((L, 12), title, fill="black")
    d.text((L, H - 22), "sampler step (noisiest left); per-step KL in nats, teacher-forced (log scale)", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for k, (name, c) in enumerate(curves.items()):
        col = colors[k % len(colors)]
        d.line([xy(i, v) for i, v in enumerate(c[:-1])], fill=col, width=2)
        d.text((L + 10, T + 8 + 14 * k), f"-- {name}", fill=col)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    from evaluate import CONFIGS, model_identity, quantize_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="a .safetensors UNet with a .json card (default: the shipped model)")
    p.add_argument("--configs", default="ptq4dm-w8a8,minmax-w8a8",
                   help="comma-separated tools/evaluate.py configurations (not fp)")
    p.add_argument("--n", type=int, default=32, help="chains (samples) to follow")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ddpm: per-step KL; ddim: per-step RMS of dx_{t-1} where a step has no noise (eta 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--ablate", action="store_true",
                   help="also each configuration with one part in float: " + ", ".join(ABLATIONS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib-n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of x_T and of the per-step noise")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    import dataclasses

    by_name = {c.name: c for c in CONFIGS}
    names = [s for s in args.configs.split(",") if s]
    bad = [s for s in names if s not in by_name or s == "fp"]
    if bad or not names:
        p.error(f"--configs: unknown or FP configurations {bad}; choose from {[c.name for c in CONFIGS if c.name != 'fp']}")
    if args.ablate:
        for base in list(names):
            for suffix, fields in ABLATIONS.items():
                by_name[f"{base}+{suffix}"] = dataclasses.replace(by_name[base], name=f"{base}+{suffix}", **fields)
                names.append(f"{base}+{suffix}")
    if args.n < 1 or args.steps < 1:
        p.error("--n and --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import ptq4dm
    from ptq4dm.models.loading import load_default_unet, load_unet, trained_schedule

    unet = load_default_unet() if args.weights is None else load_unet(None, args.weights)
    sampler = ptq4dm.make_sampler(args.sampler, num_inference_steps=args.steps,
                                   schedule=trained_schedule(args.weights),
                                   **({"eta": args.eta} if args.sampler == "ddim" else {}))
    step = ptq4dm.DiffusionStep(unet, sampler).eval()
    q_steps = {name: quantize_config(step, by_name[name], args.steps, args.calib_n, args.calib_seed,
                                     cache_dir=REPO / ".cache" / "calibration").graph for name in names}
    g = torch.Generator().manual_seed(args.seed)
    x_T = torch.randn(step.sample_shape(args.n), generator=g)
    variances: dict[str, list[float]] = {}
    errs = step_errors(step, q_steps, sampler, x_T, g, progress=True, variances=variances)
    deterministic = args.sampler == "ddim" and args.eta == 0
    summary = {name: summarize(e, deterministic=deterministic) for name, e in errs.items()}
    ts = sampler.timesteps.tolist()
    for name in errs:
        zeroed = [t for t, v, vq in zip(ts, variances["reference"], variances[name]) if v > 1e-12 and vq == 0]
        summary[name]["variance_rounded_to_zero_at_t"] = zeroed
        summary[name]["variance_max_ratio"] = max(
            (vq / v for v, vq in zip(variances["reference"], variances[name]) if v > 1e-12), default=1.0)
    key = "path_mse" if deterministic else "path_kl"
    fmt = "{:8.2e}" if deterministic else "{:8.2f}"
    print(f"{'configuration':<44} {key:>10}  by tenth of the steps (noisiest first){'':>32}last-step RMS")
    for name, s in summary.items():
        print(f"{name:<44} {fmt.format(s[key]):>10}  " + " ".join(fmt.format(v) for v in s["by_slice"])
              + f"  {s['last_step_rms']:.4f}")
    for name, s in summary.items():
        if s["variance_rounded_to_zero_at_t"] or abs(s["variance_max_ratio"] - 1) > 0.05:
            print(f"{name}: the sampler's variance rounds to 0 at t = {s['variance_rounded_to_zero_at_t']}, "
                  f"and up to {s['variance_max_ratio']:.2f}x the FP step's elsewhere")
    model = model_identity(args.weights, unet)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "model": model,
            "sampler": sampler.config(), "n": args.n, "seed": args.seed, "calib_n": args.calib_n,
            "command": "python tools/step_error.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.out_json:
        atomic_write_json(args.out_json, {"meta": meta, "timesteps": sampler.timesteps.tolist(),
                                          "per_step": errs, "variance": variances, "summary": summary})
    if args.png:
        plot_png(errs, sampler.timesteps.tolist(), Path(args.png),
                 f"{model['weights']}: x_(t-1) error per step, N = {args.n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
