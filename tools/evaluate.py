#!/usr/bin/env python
"""The quality table: FP vs W8A8 PTQ4DM vs the paper's baselines, on the default model.

    python tools/evaluate.py --n 1000 --steps 50            # writes runs/evaluate/{results.md, quality.json, samples.png}
    python tools/evaluate.py ... --out-md docs/results.md --out-json docs/results/quality.json --grid docs/img/samples.png

Every configuration samples from the same seeds (batch i uses seed ``--seed + i``), so
fidelity to FP (PSNR of the final samples) is measured sample by sample. FID / IS / sFID are
computed with the project's MNIST classifier (models/classifier.py): MNIST-classifier FID,
not comparable with Inception FID. FID is against all 5,000 real digits. With ``--inception
PATH`` (a local TorchScript Inception, inception-2015-12-05.pt) the table adds standard FID / IS.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

from ptq4dm.passes.mark import OUTPUT_ROLES  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    calibration: str = "ndtc"      # ndtc | uniform | single | random; "" for FP
    solver: str = "mse"
    weight_bits: int = 8
    act_bits: int = 8
    attn_bits: int = 8
    output_bits: int = 8
    solver_p: float = 2.0           # the MSE solver's exponent (the paper's reference code used 2.4)
    quantize_attention: bool = True
    quantize_outputs: bool = True
    output_roles: tuple[str, ...] = OUTPUT_ROLES   # QuantPolicy.output_roles
    per_step: bool = False          # one activation / output range per sampler step (ours)
    keep_first_last: bool = False   # conv_in / conv_out in float
    share_xt: bool = False          # conv_in reads x_t with x_{t-1}'s range (QuantPolicy.share_xt_range)
    output_groups: int = 1          # > 1: mean / variance / x_{t-1} ranges per group of sampler steps (ours)
    bias_correct: bool = False      # the bias_correct pass after fakequant (Nagel et al. 2019; not PTQ4DM's)
    bias_groups: int = 1            # > 1: bias_correct{groups=G}, a correction per group of sampler steps (ours)
    preset: str = ""                # a named pipeline (ptq4dm.passes.PRESETS) with its own policy: the fields above are ignored
    passes: str = ""                # with preset: this pass list instead of the preset's (its policy kept)
    policy_overrides: tuple = ()    # with preset: ((QuantPolicy field, value), ...) changed in the preset's policy


CONFIGS = [
    Config("fp", "FP32", calibration=""),
    Config("recommended", "W8A8 recommended (PTQ4DM + widen 4 + reconstruct + bias corr. 1/10; conv_in/out + time emb. "
           "FP, outputs 16-bit)", preset="recommended"),
    Config("recommended-fast", "W8A8 recommended without reconstruct (the default of 2026-12-03)",
           preset="recommended-fast"),
    Config("recommended-widen0", "W8A8 recommended without the sensitivity pass (no activation widened)",
           preset="recommended", passes="decompose_attention,mark,observe,calibrate,solve,fakequant,bias_correct{groups=10}"),
    Config("recommended-widen8", "W8A8 recommended, 8 activations widened to 16 bits",
           preset="recommended",
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=8,weights=false},"
                  "bias_correct{groups=10}"),
    Config("paper", "W8A8 PTQ4DM, the paper's full setting (pipeline 'ptq4dm-paper')", preset="ptq4dm-paper"),
    # issue 25: the paper's full setting (8-bit mean / variance / x_{t-1}) on the recommended passes, with and
    # without error feedback on x_{t-1}'s rounding (widen may not pick the outputs)
    Config("recommended-out8", "W8A8 recommended passes, mean / variance / x_{t-1} at 8 bits (the paper's full setting)",
           preset="recommended", policy_overrides=(("output_bits", 8),),
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,"
                  "sensitivity{widen=4,weights=false,outputs=false},reconstruct,bias_correct{groups=10}"),
    Config("recommended-out8-ef", "W8A8 recommended passes, 8-bit mean / variance / x_{t-1} + error feedback "
           "(float residual)", preset="recommended", policy_overrides=(("output_bits", 8),),
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,"
                  "sensitivity{widen=4,weights=false,outputs=false},reconstruct,bias_correct{groups=10},error_feedback"),
    Config("recommended-out8-ef2", "W8A8 recommended passes, 8-bit mean / variance / x_{t-1} + error feedback "
           "(2-bit residual)", preset="recommended", policy_overrides=(("output_bits", 8),),
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,"
                  "sensitivity{widen=4,weights=false,outputs=false},reconstruct,bias_correct{groups=10},"
                  "error_feedback{residual_bits=2}"),
    # issue 26: 4-bit weights on the recommended preset, nearest rounding vs learned rounding (reconstruct)
    Config("w4a8", "W4A8 recommended preset, weights rounded to nearest", preset="recommended-fast", weight_bits=4),
    Config("w4a8-reconstruct", "W4A8 recommended preset + reconstruct (AdaRound)", preset="recommended", weight_bits=4,
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,weights=false},"
                  "reconstruct,bias_correct{groups=10}"),
    # the recommended preset's pass list, spelled out (the rows measured before it became the preset)
    Config("w8a8-reconstruct", "W8A8 recommended + reconstruct (AdaRound)", preset="recommended",
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,weights=false},"
                  "reconstruct,bias_correct{groups=10}"),
    Config("w4a8-brecq", "W4A8 recommended preset + block-wise reconstruct (BRECQ)", preset="recommended",
           weight_bits=4,
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,weights=false},"
                  "reconstruct{blocks=true},bias_correct{groups=10}"),
    # mixed weight precision: each weight at 4 or 8 bits, <= 5 bits per weight on average (sensitivity budget;
    # widths=ends named: the pass's default became widths=all on 2026-12-07, these rows measured 4 or 8)
    Config("mixed5", "W4/8 mixed, <= 5 bits per weight (sensitivity budget), A8 recommended", preset="recommended",
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,budget=5,widths=ends},"
                  "bias_correct{groups=10}"),
    Config("mixed5-reconstruct", "W4/8 mixed, <= 5 bits per weight + reconstruct, A8 recommended", preset="recommended",
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,budget=5,widths=ends},"
                  "reconstruct,bias_correct{groups=10}"),
    # ... with each weight's per-channel scale learned with its rounding (reconstruct{scales=true})
    Config("w4a8-reconstruct-scales", "W4A8 recommended preset + reconstruct, rounding and scales learned",
           preset="recommended", weight_bits=4,
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,weights=false},"
                  "reconstruct{scales=true},bias_correct{groups=10}"),
    # ... reconstruct learning on every calibration sample (n=0) instead of 256 of them (the lever for large sets)
    Config("w4a8-reconstruct-scales-all", "W4A8 recommended preset + reconstruct (rounding and scales) on every "
           "calibration sample", preset="recommended", weight_bits=4,
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,weights=false},"
                  "reconstruct{scales=true,n=0},bias_correct{groups=10}"),
    Config("mixed5-reconstruct-scales", "W4/8 mixed, <= 5 bits per weight + reconstruct (rounding and scales), A8 "
           "recommended", preset="recommended",
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,budget=5,widths=ends},"
                  "reconstruct{scales=true},bias_correct{groups=10}"),
    Config("mixed5-reconstruct-scales-all", "W4/8 mixed, <= 5 bits per weight + reconstruct (rounding and scales) on "
           "every calibration sample, A8 recommended", preset="recommended",
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,budget=5,widths=ends},"
                  "reconstruct{scales=true,n=0},bias_correct{groups=10}"),
    # the 5-bit budget spent evenly (every weight at 5 bits) or over every width from 4 to 8 (sensitivity
    # widths=all), against the 4 / 8 mix (docs/results/details.md, "Five bits per weight")
    Config("w5a8", "W5A8 recommended preset, weights rounded to nearest", preset="recommended-fast", weight_bits=5),
    Config("w5a8-reconstruct-refit", "W5A8 recommended preset + reconstruct (rounding and scales, refitted on float "
           "inputs) on every calibration sample", preset="recommended", weight_bits=5,
           passes="decompose_attention,mark,observe,calibrate,solve,fakequant,sensitivity{widen=4,weights=false},"
                  "reconstruct{scales=true,n=0,refit=float},bias_correct{groups=10}"),
    Config("ptq4dm-w8a8", "W8A8 PTQ4DM (NDTC + MSE)"),
    Config("ptq4dm-w8a8-per-step", "W8A8 PTQ4DM + per-step act. ranges", per_step=True),
    Config("ptq4dm-w8a8-per-step-shared", "W8A8 PTQ4DM + per-step, x_t range shared", per_step=True, share_xt=True),
    Config("ptq4dm-w8a8-per-step-fl", "W8A8 PTQ4DM + per-step, conv_in/out FP", per_step=True, keep_first_last=True),
    Config("minmax-w8a8", "W8A8 NDTC + min-max ranges", solver="minmax"),
    Config("ptq4dm-w8a8-bc", "W8A8 PTQ4DM + bias correction", bias_correct=True),
    Config("minmax-w8a8-bc", "W8A8 NDTC + min-max ranges + bias correction", solver="minmax", bias_correct=True),
    Config("ptq4dm-w8a8-bc-g10", "W8A8 PTQ4DM + bias correction per 1/10 of the steps", bias_correct=True, bias_groups=10),
    Config("minmax-w8a8-bc-g10", "W8A8 NDTC + min-max ranges + bias corr. per 1/10 of the steps", solver="minmax",
           bias_correct=True, bias_groups=10),
    Config("ptq4dm-w8a8-bc-g10-xt-only", "W8A8 PTQ4DM + bias corr. per 1/10 of the steps, mean/variance in FP",
           bias_correct=True, bias_groups=10, output_roles=("prev_sample",)),
    Config("uniform-w8a8", "W8A8 uniform-t calibration + MSE", calibration="uniform"),
    Config("single-w8a8", "W8A8 single-t calibration + MSE", calibration="single"),
    Config("random-w8a8", "W8A8 random N(0,I) calibration + MSE", calibration="random"),
    Config("ptq4dm-w8a8-xt-only", "W8A8 PTQ4DM, x_{t-1} 8-bit, mean/variance in FP", output_roles=("prev_sample",)),
    Config("ptq4dm-w8a8-fp-outputs", "W8A8 PTQ4DM, mean/variance/x_{t-1} in FP", quantize_outputs=False),
    Config("ptq4dm-w8a8-fp-outputs-fl", "W8A8 PTQ4DM, outputs + conv_in/out FP", quantize_outputs=False,
           keep_first_last=True),
    # ablations: where W8A8 PTQ4DM's distance from FP comes from (docs/results/history.md, "Where W8A8 PTQ4DM's distance from FP comes from")
    Config("ptq4dm-w8a16", "W8A16 PTQ4DM (weights' share)", act_bits=16, attn_bits=16, output_bits=16),
    Config("ptq4dm-w16a8", "W16A8 PTQ4DM (activations' share)", weight_bits=16),
    Config("ptq4dm-w8a8-attn-fp", "W8A8 PTQ4DM, attention matmuls in FP", quantize_attention=False),
    Config("ptq4dm-w8a8-fl", "W8A8 PTQ4DM, conv_in/out in FP", keep_first_last=True),
    Config("ptq4dm-w8a8-mean-fp", "W8A8 PTQ4DM, mean in FP", output_roles=("variance", "prev_sample")),
    Config("ptq4dm-w8a8-variance-fp", "W8A8 PTQ4DM, variance in FP", output_roles=("mean", "prev_sample")),
    Config("ptq4dm-w8a8-p2.4", "W8A8 PTQ4DM, MSE p = 2.4", solver_p=2.4),
    Config("ptq4dm-w8a8-out-g10", "W8A8 PTQ4DM + output ranges per 1/10 of the steps", output_groups=10),
    Config("ptq4dm-w4a8", "W4A8 PTQ4DM", weight_bits=4),
    Config("ptq4dm-w4a8-per-step", "W4A8 PTQ4DM + per-step act. ranges", weight_bits=4, per_step=True),
]
# the 4-bit configs that learn on every sample, as four reconstructions (seeds 0-3), the one whose 64 held-out
# chains land closest to FP kept (reconstruct's restarts)
CONFIGS += [dataclasses.replace(c, name=c.name.replace("-scales-all", "-restarts"), label=c.label + ", best of 4 restarts",
                                passes=c.passes.replace("reconstruct{scales=true,n=0}", "reconstruct{scales=true,n=0,restarts=4}"))
            for c in CONFIGS if c.name.endswith("-reconstruct-scales-all")]
# ... and with each channel's scale then refitted by least squares on the float model's inputs (reconstruct{refit=float}:
# no shrinkage from the quantized inputs' noise, docs/results/details.md, "The learned gains")
CONFIGS += [dataclasses.replace(c, name=c.name.replace("-scales-all", "-refit"), label=c.label + ", scales refitted on "
                                "float inputs", passes=c.passes.replace("reconstruct{scales=true,n=0}",
                                                                        "reconstruct{scales=true,n=0,refit=float}"))
            for c in CONFIGS if c.name.endswith("-reconstruct-scales-all")]
# ... with the budget spent over every width from 4 to 8 (sensitivity widths=all), not 4 or 8
CONFIGS += [dataclasses.replace(c, name="mixed5all-reconstruct-refit", label=c.label.replace("W4/8 mixed", "W4-8 mixed (every width)"),
                                passes=c.passes.replace("budget=5,widths=ends}", "budget=5,widths=all}"))
            for c in CONFIGS if c.name == "mixed5-reconstruct-refit"]
# ... and the UNet's output then corrected per step by noise_correct fitted along 64 chains of the quantized sampler
# itself (fit=chains: the one-signed drift measured where it accumulates, docs/results/details.md, "Where the chain
# loses the samples; a correction fitted on the quantized chains")
CONFIGS += [dataclasses.replace(c, name=c.name + "-nc", label=c.label + " + output correction per step fitted on "
                                "its own chains", passes=c.passes + ",noise_correct{fit=chains,groups=1000}")
            for c in CONFIGS if c.name.endswith("-reconstruct-refit")]
# ... and then each 4-bit weight's per-channel scale fitted against short unrolled float chains from the noisiest
# quarter of the steps (chain_gains: docs/results/details.md, "A loss over short unrolled chains")
CONFIGS += [dataclasses.replace(c, name=c.name + "-chain", label=c.label + " + gains fitted on unrolled float chains",
                                passes=c.passes + ",chain_gains")
            for c in CONFIGS if c.name.endswith("-reconstruct-refit")]
# the paper's baselines with the default model's pipeline (bias_correct{groups=10} after fakequant):
# only the calibration / outputs / bits differ from ptq4dm-w8a8-bc-g10
CONFIGS += [dataclasses.replace(c, name=c.name + "-bc-g10", label=c.label + " + bias corr. 1/10", bias_correct=True,
                                bias_groups=10)
            for c in CONFIGS if c.name in ("uniform-w8a8", "single-w8a8", "random-w8a8", "ptq4dm-w8a8-fp-outputs",
                                           "ptq4dm-w4a8")]


def policy_for(cfg: Config, steps: int):
    """The QuantPolicy a configuration quantizes with (``steps``: the sampler's, for per-step ranges)."""
    from ptq4dm.passes import PRESETS, QuantPolicy

    if cfg.preset:   # the preset's policy; weight_bits and policy_overrides are what a preset row may change
        return dataclasses.replace(PRESETS[cfg.preset][1], weight_bits=cfg.weight_bits, **dict(cfg.policy_overrides))

    return QuantPolicy(weight_bits=cfg.weight_bits, act_bits=cfg.act_bits, attn_bits=cfg.attn_bits,
                       output_bits=cfg.output_bits, quantize_attention=cfg.quantize_attention,
                       quantize_outputs=cfg.quantize_outputs, output_roles=cfg.output_roles,
                       timestep_groups=steps if cfg.per_step else cfg.output_groups,
                       grouped_roles=OUTPUT_ROLES if cfg.output_groups > 1 else None,
                       keep_first_last_fp=cfg.keep_first_last, share_xt_range=cfg.share_xt)


def quantize_config(step, cfg: Config, steps: int, calib_n: int, calib_seed: int, mu: float = 0.4,
                    sigma: float = 0.5, cache_dir=None, per_chain: int = 1):
    """``ptq4dm.quantize`` ``step`` as configuration ``cfg`` says: its calibration, solver and policy."""
    import ptq4dm
    from ptq4dm.passes import DEFAULT_PIPELINE, MSE, NDTC, MinMax, RandomNoise, Single, Uniform

    if cfg.preset:   # as a user gets it: the preset's passes and policy, the default solver
        from ptq4dm.passes import PRESETS

        own = cfg.passes or cfg.weight_bits != 8 or cfg.policy_overrides
        return ptq4dm.quantize(step, calibration=NDTC(mu=mu, sigma=sigma, n=calib_n, seed=calib_seed,
                                                      per_chain=per_chain),
                               pipeline=cfg.passes or cfg.preset, policy=policy_for(cfg, steps) if own else None,
                               cache_dir=cache_dir)
    calib = {"ndtc": lambda: NDTC(mu=mu, sigma=sigma, n=calib_n, seed=calib_seed, per_chain=per_chain),
             "uniform": lambda: Uniform(n=calib_n, seed=calib_seed, per_chain=per_chain), "single": lambda: Single(n=calib_n, seed=calib_seed),
             "random": lambda: RandomNoise(n=calib_n, seed=calib_seed)}[cfg.calibration]()
    solver = MSE(p=cfg.solver_p) if cfg.solver == "mse" else MinMax(p=cfg.solver_p)
    pipeline = DEFAULT_PIPELINE
    if cfg.bias_correct:
        pipeline += ",bias_correct" if cfg.bias_groups == 1 else f",bias_correct{{groups={cfg.bias_groups}}}"
    return ptq4dm.quantize(step, calibration=calib, solver=solver, policy=policy_for(cfg, steps), cache_dir=cache_dir,
                           pipeline=pipeline)


def model_identity(weights: str | None, unet: torch.nn.Module) -> dict:
    """Which checkpoint a table measured: path, training steps from its card, and the weights hash
    (``ptq4dm.weights_hash``, the ``fp_weights_sha256`` a quantized artifact of it records)."""
    import ptq4dm
    from ptq4dm.models.loading import DEFAULT_MODEL

    path = Path(weights) if weights is not None else DEFAULT_MODEL
    card_file = (path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path).with_suffix(".json")
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    try:
        shown = str(path.resolve().relative_to(REPO))
    except ValueError:
        shown = str(path)
    return {"weights": shown, "weights_sha256": ptq4dm.weights_hash(unet)[:16], "train_steps": card.get("steps")}


def grid_png(rows: list[tuple], path: Path, scale: int = 3) -> None:
    """A labelled grid: one row per (label, images in [-1, 1][, a caption per image])."""
    from PIL import Image, ImageDraw

    n = max(r[1].shape[0] for r in rows)
    h, w = rows[0][1].shape[-2:]
    label_w, cap_h = 260, (12 if any(len(r) > 2 for r in rows) else 0)
    row_h = h * scale + cap_h
    img = Image.new("L", (label_w + n * w * scale, len(rows) * row_h), 0)
    draw = ImageDraw.Draw(img)
    for r, (label, x, *caps) in enumerate(rows):
        draw.text((4, r * row_h + h * scale // 2 - 5), label, fill=255)
        arr = ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for i in range(x.shape[0]):
            tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (label_w + i * w * scale, r * row_h))
            if caps:
                draw.text((label_w + i * w * scale + 2, r * row_h + h * scale), caps[0][i], fill=200)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def doubt_rows(x: torch.Tensor, probs: torch.Tensor, real: torch.Tensor, real_probs: torch.Tensor,
               k: int = 16) -> list[tuple]:
    """Grid rows showing what 'conf >= 0.9' separates: confident FP samples, the FP samples the
    classifier is least sure of, and the real digits it is least sure of, each captioned
    '<predicted digit> <confidence>'."""
    def pick(imgs, pr, idx):
        conf, pred = pr[idx].max(1)
        return imgs[idx], [f"{int(d)} {float(c):.2f}" for d, c in zip(pred, conf)]

    conf, real_conf = probs.max(1).values, real_probs.max(1).values
    sure = (conf >= 0.9).nonzero().flatten()[:k]
    least = conf.argsort()[:k]
    real_least = real_conf.argsort()[:k]
    return [(f"FP, conf >= 0.9 ({float((conf >= 0.9).float().mean()):.1%}), first", *pick(x, probs, sure)),
            (f"FP, least sure of {x.shape[0]}", *pick(x, probs, least)),
            (f"real digits, least sure of {real.shape[0]}", *pick(real, real_probs, real_least))]


def _change_cell(row: dict, key: str) -> str:
    """A derived row's FID change against its reference (``key``: the absolute difference, and
    ``key + "_interval"``: the relative change's ~90% interval), as "+1.5% [-6.1, +9.1]"; "—" where
    the row has none."""
    if f"{key}_interval" not in row:
        return "—"
    lo, hi = row[f"{key}_interval"]
    return f"{100 * row[key] / (row['fid'] - row[key]):+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def resolve_configs(spec: str) -> list:
    """The configs that ``--configs`` names, in the order named, each once, with FP first (every row is
    compared with it); ``all``: the whole table in its order. ValueError naming the unknown ones."""
    names = [c.name for c in CONFIGS] if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in {c.name for c in CONFIGS}]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; known: {[c.name for c in CONFIGS]}")
    names = ["fp"] + [n for i, n in enumerate(names) if n != "fp" and n not in names[:i]]
    return [next(c for c in CONFIGS if c.name == n) for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", "--n", dest="n", type=int, default=200,
                   help="samples per configuration (under torchrun write --samples: torchrun's parser rejects --n)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, --sampler ddim only (default 0)")
    p.add_argument("--variance", default=None, choices=["fixed_small", "fixed_large"],
                   help="DDPM variance, --sampler ddpm only (default fixed_small)")
    p.add_argument("--calib-n", type=int, default=256, help="calibration samples (paper: 1024)")
    p.add_argument("--calib-per-chain", type=int, default=1, metavar="K",
                   help="calibration samples taken from one chain, each at its own drawn step (NDTC / uniform "
                        "calibration; default 1, the paper's: one per chain); K chains' worth of samples for the "
                        "compute of one, for large sets (K must divide 128, the chains' batch)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where calibration sets are cached (default .cache/calibration in the repository)")
    p.add_argument("--mu", type=float, default=0.4)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="sampling seeds: batch i uses seed + i")
    p.add_argument("--calib-seed", type=int, default=None,
                   help="seed of the calibration draw (default: --seed); vary it alone to separate calibration "
                        "noise from sample-set noise")
    p.add_argument("--configs", default="all", help="comma-separated names, run in that order (fp always first), "
                   "or all: " + ",".join(c.name for c in CONFIGS))
    p.add_argument("--weights", default=None, help="a .safetensors UNet with a .json card (default: the shipped model)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="a local TorchScript Inception (inception-2015-12-05.pt, StyleGAN3 / clean-fid): adds standard "
                        "FID / IS columns; nothing is downloaded")
    # under runs/ by default: an exploratory run (or a partial one) never rewrites the committed table;
    # the committed one is updated by naming it: --out-json docs/results/quality.json --out-md docs/results.md
    # --grid docs/img/samples.png
    p.add_argument("--out-json", default=str(REPO / "runs" / "evaluate" / "quality.json"))
    p.add_argument("--out-md", default=str(REPO / "runs" / "evaluate" / "results.md"),
                   help="the Markdown file whose quality-table section is (re)written (created if missing); "
                   "default runs/evaluate/results.md; docs/results.md to update the committed table")
    p.add_argument("--grid", default=str(REPO / "runs" / "evaluate" / "samples.png"))
    p.add_argument("--int8", action="store_true",
                   help="after each quantized configuration, a row for its int8 execution: the same graph through "
                        "ptq4dm.lower + ptq4dm.compile_step (CPU: Inductor + oneDNN int8; CUDA: Triton)")
    p.add_argument("--lower-opts", default="", metavar="KEY=VALUE,...",
                   help="options of the lower pass for the --int8 rows (e.g. drop_wide=false,split16=true); "
                        "default: its defaults")
    p.add_argument("--rounding-null", action="store_true",
                   help="after each quantized configuration, a row for the same fake-quant graph through torch.compile "
                        "(Inductor, fp32): the same arithmetic with another float rounding, so its distance from the "
                        "fake-quant row is what float rounding alone moves the samples and the FID (the null an "
                        "--int8 row is judged against: docs/results/details.md)")
    p.add_argument("--doubt-grid", default=None, metavar="PNG",
                   help="also draw the FP samples the classifier is least sure of, beside confident ones and the "
                        "least sure real digits, each captioned with its predicted digit and confidence")
    return p


def parse_lower_opts(text: str) -> dict:
    """``key=value,...`` -> the lower pass's options, checked against its fields before any sampling
    (true / false become bools, digits ints)."""
    import dataclasses as dc

    from ptq4dm.passes.lower import Lower

    known = {f.name for f in dc.fields(Lower)} - {"backend"}
    opts = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"--lower-opts: {item!r} is not key=value (e.g. drop_wide=false)")
        if key not in known:
            raise ValueError(f"--lower-opts: unknown option {key!r}; the lower pass has {sorted(known)}")
        opts[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return opts


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--samples must be >= 2 (FID needs a covariance)")
    try:
        args.lower_opts = parse_lower_opts(args.lower_opts)
    except ValueError as e:
        p.error(str(e))
    if args.lower_opts and not args.int8:
        p.error("--lower-opts sets how the --int8 rows are lowered; add --int8")
    if args.sampler == "ddpm" and args.eta is not None:
        p.error("--eta is a DDIM option; with --sampler ddpm choose --variance, or use --sampler ddim")
    if args.sampler == "ddim" and args.variance is not None:
        p.error("--variance is a DDPM option; with --sampler ddim choose --eta, or use --sampler ddpm")
    args.eta = 0.0 if args.eta is None else args.eta
    args.variance = args.variance or "fixed_small"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        configs = resolve_configs(args.configs)
    except ValueError as e:
        p.error(str(e))

    import ptq4dm
    from ptq4dm import distributed
    from ptq4dm.models.classifier import load_classifier
    from ptq4dm.models.loading import load_default_unet, load_unet, trained_schedule
    from ptq4dm.models.metrics import (InceptionNet, classifier_stats, fid_change_interval, frechet_distance,
                                       inception_score, inception_score_from_probs, psnr)
    sys.path.insert(0, str(REPO / "tools"))
    from train import load_digits

    # torchrun (WORLD_SIZE > 1): each rank samples every world_size-th batch and calibrates its share;
    # the samples are gathered in batch order, so every number is the single-process one; rank 0 writes
    distributed.init_from_env()
    if distributed.world_size() > 1 and args.device == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"
    main_rank = distributed.is_main()
    dev = torch.device(args.device)
    unet = (load_default_unet() if args.weights is None else load_unet(None, args.weights)).to(dev)
    skw = {"eta": args.eta} if args.sampler == "ddim" else {"variance_type": args.variance}
    sampler = ptq4dm.make_sampler(args.sampler, num_inference_steps=args.steps, schedule=trained_schedule(args.weights),
                                   **skw).to(dev)
    step = ptq4dm.DiffusionStep(unet, sampler).eval()
    model = model_identity(args.weights, unet)
    net = load_classifier()
    real, _, _ = load_digits()
    # the 5,000 real digits' features: 500-digit batches dealt over the ranks (the same batches
    # classifier_stats runs in one process, so the statistics are bit-equal), gathered in order
    chunks = distributed.gather_batches("real-digit features", lambda: {
        b: classifier_stats(net, real[i:i + 500]) for b, i in distributed.my_batches(range(0, real.shape[0], 500))})
    real_stats = {k: torch.cat([c[k] for c in chunks.values()]) for k in ("feat", "spatial", "logits")}
    real_probs = real_stats["logits"].softmax(1)
    real_confident = float((real_probs.max(1).values >= 0.9).float().mean())  # the bar's reference point
    inception = None
    if args.inception:
        try:
            inception = InceptionNet(args.inception, dev)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        real_incep = inception.stats(real)
    shape = step.sample_shape(1)[1:]

    def draw(fn, label):
        from tqdm import tqdm

        starts = list(range(0, args.n, args.batch))
        mine = distributed.my_batches(starts)   # batch b (seed + b) on rank b % world_size

        def share():
            out = {}
            for b, i in tqdm(mine, desc=f"sample {label}", unit="batch", leave=False):
                nb = min(args.batch, args.n - i)
                out[b] = ptq4dm.sample(fn, sampler, (nb, *shape), seed=args.seed + b, device=dev).float().cpu()
            return out

        parts = distributed.gather_batches(f"sample {label}", share)
        return torch.cat([parts[b] for b in range(len(starts))])

    cs = args.seed if args.calib_seed is None else args.calib_seed
    cache = Path(args.cache_dir) if args.cache_dir else REPO / ".cache" / "calibration"
    def write_outputs(rows, final: bool) -> str:
        if not main_rank:
            return ""
        fp_fid = rows[0]["fid"] if rows[0]["config"] == "fp" else None   # a run without the fp row: no "vs FP"
        command = "python tools/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = {"world_size": distributed.world_size(), "date": datetime.date.today().isoformat(), "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
                "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "ptq4dm": ptq4dm.__version__,
                "real_confident_frac": real_confident, "sampler": sampler.config(), "calib_n": args.calib_n, "calib_per_chain": args.calib_per_chain, "seed": args.seed, "calib_seed": cs, "mu": args.mu, "sigma": args.sigma, "command": command, "complete": final, "model": model}
        atomic_write_json(args.out_json, {"meta": meta, "rows": rows})
        steps = f"{model['train_steps']:,} training steps, " if model["train_steps"] else ""
        sampler_opt = f"eta {args.eta}" if args.sampler == "ddim" else f"{args.variance} variance"
        lines = [f"Date {meta['date']}, device {meta['device']} ({meta['cpu']}), torch {meta['torch']}, ptq4dm {meta['ptq4dm']}.",
                 f"Model `{model['weights']}` ({steps}weights sha256 {model['weights_sha256']}).",
                 f"Sampler {args.sampler} {args.steps} steps ({sampler_opt}); N = {args.n} samples per row from the same seeds; "
                 f"seed {args.seed}, calibration N = {args.calib_n}{f' ({args.calib_per_chain} per chain)' if args.calib_per_chain > 1 else ''}, seed {cs} (NDTC mu = {args.mu} T, sigma = {args.sigma} T).",
                 f"Real digits (all {real.shape[0]:,}) classified with confidence >= 0.9 by the same classifier: {real_confident:.3f}.",
                 "vs FP: the FID change; in brackets how far it moves with the sample set (paired random halves of the "
                 "N samples, scaled to N); another calibration draw moves a quantized row further.", "",
                 f"Command: `{command}`", "",
                 "| configuration | FID (MNIST-clf) | vs FP [sampling noise, ~90%] | sFID-like | IS analogue | conf >= 0.9 | PSNR vs FP (dB) | digit differs from FP |",
                 "|---|---|---|---|---|---|---|---|"]
        if inception is not None:
            lines[-2] += " Inception FID | Inception IS |"
            lines[-1] += "---|---|"
        derived = any("fid_vs_fakequant_interval" in r for r in rows)   # --int8 / --rounding-null rows
        if derived:
            lines[-2] += " vs its fake-quant row [~90%] |"
            lines[-1] += "---|"
        vs_null = any("fid_vs_rounding_null_interval" in r for r in rows)   # --int8 with --rounding-null
        if vs_null:
            lines[-2] += " vs the rounding null [~90%] |"
            lines[-1] += "---|"
        for r in rows:
            ps = "—" if r["psnr_vs_fp"] is None else f"{r['psnr_vs_fp']:.2f}"
            ch = "—" if r.get("label_changed_vs_fp") is None else f"{r['label_changed_vs_fp']:.3f}"
            incep = f" {r['inception_fid']:.3f} | {r['inception_is']:.3f} |" if inception is not None else ""
            vs = "—" if fp_fid is None else f"{100 * (r['fid'] - fp_fid) / fp_fid:+.1f}%"
            if r.get("fid_vs_fp_interval"):
                lo, hi = r["fid_vs_fp_interval"]
                vs += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            own = "".join(f" {_change_cell(r, key)} |" for key, on in (("fid_vs_fakequant", derived),
                                                                       ("fid_vs_rounding_null", vs_null)) if on)
            lines.append(f"| {r['label']} | {r['fid']:.3f} | {vs} | {r['sfid']:.3f} | "
                         f"{r['is']:.3f} | {r['confident_frac']:.3f} | {ps} | {ch} |" + incep + own)
        if not final:
            lines.append(f"\n(partial: {len(rows)} of {len(runs)} rows so far; the run was still going or was stopped)")
        table = "\n".join(lines)
        md = Path(args.out_md)
        begin, end = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
        text = md.read_text() if md.exists() else "# Results\n\n## Quality\n\n" + begin + "\n" + end + "\n"
        if begin not in text:
            text += f"\n## Quality\n\n{begin}\n{end}\n"
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        atomic_write_text(md, pre + begin + "\n" + table + "\n" + end + post)
        return table

    def _inception_cols(inc, x, real_inc):
        st = inc.stats(x)
        return {"inception_fid": frechet_distance(st["feat"], real_inc["feat"]),
                "inception_is": inception_score_from_probs(st["probs"])}

    # each quantized configuration: its fake-quant row, then (--rounding-null) the same graph compiled in
    # fp32, then (--int8) its lowered execution (lowering rewrites the graph, so it comes last)
    extra = (["compiled"] if args.rounding_null else []) + (["int8"] if args.int8 else [])
    runs = [r for c in configs for r in ([(c, None)] + ([(c, m) for m in extra] if c.name != "fp" else []))]
    rows, samples, labels, feats, shown = [], {}, {}, {}, []
    res = None
    for cfg, mode in runs:
        t0 = time.perf_counter()
        int8 = mode == "int8"
        if mode == "compiled":   # the graph just sampled as fake-quant, compiled as it is (float rounding only)
            fn = torch.compile(res.graph.gm)
            cfg = dataclasses.replace(cfg, name=cfg.name + "-compiled", label=cfg.label + " — the fake-quant graph "
                                      "compiled (Inductor, fp32): float rounding only")
            with torch.no_grad():
                x = draw(fn, cfg.name)
            qinfo = {}
        elif int8:   # the graph just sampled as fake-quant, lowered and compiled
            info = ptq4dm.lower(res.graph, **args.lower_opts)
            fn = ptq4dm.compile_step(res.graph)
            cfg = dataclasses.replace(cfg, name=cfg.name + "-int8", label=cfg.label + f" — int8 execution ({info['backend']}"
                                      + (f", weights at {info['weight_bits']} bits" if info.get("weight_bits", 8) != 8 else "")
                                      + (", int8-mixed-bf16" if info.get("mixed_bf16") else "")
                                      + "".join(f", {k}={str(v).lower()}" for k, v in args.lower_opts.items()) + ")")
            with torch.no_grad():
                x = draw(fn, cfg.name)
            qinfo = {"lower": {k: v for k, v in info.items() if k != "kept"}, "kept_in_float": len(info["kept"]),
                     "lower_opts": args.lower_opts}
        elif cfg.name == "fp":
            with torch.no_grad():
                x = draw(step, cfg.name)
            qinfo = {}
        else:
            res = quantize_config(step, cfg, args.steps, args.calib_n, cs, args.mu, args.sigma, cache,
                                  per_chain=args.calib_per_chain)
            tq = time.perf_counter() - t0
            with torch.no_grad():
                x = draw(res.graph, cfg.name)
            qinfo = {"tensors": len(res.report.tensors), "total_error": res.report.total_error,
                     "total_error_minmax": res.report.total_error_minmax, "quantize_seconds": tq}
            rc = getattr(res.report, "reconstruct", None) or {}
            if "restarts" in rc:   # reconstruct{restarts=k}: each restart's held-out PSNR, the one kept
                qinfo["reconstruct_restarts"] = rc["restarts"]
                qinfo["reconstruct_chosen_seed"] = rc["chosen_seed"]
        s = classifier_stats(net, x)
        conf, pred = s["logits"].softmax(1).max(1)
        row = {"config": cfg.name, "label": cfg.label, "n": args.n,
               "fid": frechet_distance(s["feat"], real_stats["feat"]),
               "sfid": frechet_distance(s["spatial"], real_stats["spatial"]),
               "is": inception_score(s["logits"]),
               "confident_frac": float((conf >= 0.9).float().mean()),
               "classes": int(pred.unique().numel()),
               "psnr_vs_fp": psnr(x, samples["fp"]) if "fp" in samples else None,
               # the sampling noise of the change vs FP (same seeds, paired halves): docs/cli.md
               "fid_vs_fp_interval": (fid_change_interval(s["feat"], feats["fp"], real_stats["feat"])
                                      if "fp" in feats and cfg.name != "fp" else None),
               "label_changed_vs_fp": float((pred != labels["fp"]).float().mean()) if "fp" in labels else None,
               **({} if inception is None else _inception_cols(inception, x, real_incep)),
               "seconds": time.perf_counter() - t0, **qinfo}
        if cfg.name == "fp":
            row["unconfident_by_predicted_digit"] = torch.bincount(pred[conf < 0.9], minlength=10).tolist()
            if args.doubt_grid and main_rank:
                grid_png(doubt_rows(x, s["logits"].softmax(1), real, real_probs), Path(args.doubt_grid))
        if mode is not None:   # the execution against the fake-quant graph it came from, sample by sample
            parent = cfg.name.rsplit("-", 1)[0]
            def versus(ref: str, key: str) -> dict:   # this row against the row ``ref``, sample by sample
                return {f"psnr_vs_{key}": psnr(x, samples[ref]),
                        f"label_changed_vs_{key}": float((pred != labels[ref]).float().mean()),
                        f"fid_vs_{key}": row["fid"] - next(r["fid"] for r in rows if r["config"] == ref),
                        f"fid_vs_{key}_interval": fid_change_interval(s["feat"], feats[ref], real_stats["feat"])}

            row.update(versus(parent, "fakequant"))
            null = parent + "-compiled"
            if int8 and null in feats:   # against the rounding null: both are re-executions of one graph
                row.update(versus(null, "rounding_null"))
            if main_rank:
                for ref, key in ((parent, "fakequant"), (null, "rounding_null")):
                    if f"fid_vs_{key}" in row:
                        print(f"{cfg.name:<26} vs {ref}: PSNR {row[f'psnr_vs_{key}']:.2f} dB, digit differs "
                              f"{row[f'label_changed_vs_{key}']:.3f}, FID {_change_cell(row, f'fid_vs_{key}')}", flush=True)
        samples[cfg.name], labels[cfg.name], feats[cfg.name] = x, pred, s["feat"]
        shown.append(cfg)
        rows.append(row)
        if main_rank:
            print(f"{cfg.name:<26} FID {row['fid']:8.3f}  sFID {row['sfid']:8.3f}  IS {row['is']:6.3f}  "
                f"conf>=0.9 {row['confident_frac']:.3f}  classes {row['classes']}  "
                f"PSNR {row['psnr_vs_fp'] if row['psnr_vs_fp'] is not None else float('nan'):6.2f}  "
                f"digit differs {row['label_changed_vs_fp'] if row['label_changed_vs_fp'] is not None else float('nan'):.3f}  "
                f"({row['seconds']:.0f}s" + (f", quantize {row['quantize_seconds']:.0f}s)" if "quantize_seconds" in row else ")"),
                flush=True)
        write_outputs(rows, final=False)  # a run cut short keeps the rows it finished

    table = write_outputs(rows, final=True)
    if not main_rank:
        return 0
    # a label that does not fit names its row by config (the derived rows differ only at the label's end)
    grid_rows = [(c.label if len(c.label) <= 38 else c.name, samples[c.name][:16]) for c in shown]
    grid_png(grid_rows, Path(args.grid))
    print(f"\nwrote {args.out_json}, {args.out_md}, {args.grid}" + (f", {args.doubt_grid}" if args.doubt_grid else ""))
    print(table)
    return 0


if __name__ == "__main__":
    from ptq4dm import distributed
    try:
        rc = main()
    except distributed.RankFailed as e:
        print(f"error (rank {distributed.rank()}): {e}", file=sys.stderr)
        rc = 1
    finally:
        distributed.shutdown()
    sys.exit(rc)
