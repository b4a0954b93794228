#!/usr/bin/env python
"""Benchmark one denoising step (and a short sampling chain) side by side, in one run.

    python tools/bench.py --models ddpm-cifar10,iddpm-imagenet64 --batches 1,16,64,256      # on a GPU
    python tools/bench.py --models tiny --batches 2 --configs fp32-eager,bf16-eager,ptq4dm-w8a8 --iters 3

Configs: fp32-eager (the paper's baseline), bf16-eager, bf16-compile (torch.compile, channels-last),
torchao-int8dyn-compile (torchao Int8DynamicActivationInt8WeightConfig + compile), ptq4dm-w8a8
(our lowered int8 graph; compiled on CUDA). Records: JSON list with device, model, batch, config,
ms_per_step (median), ms_sample (end-to-end, --chain steps), speedups vs fp32-eager and vs the
best bf16 config of the same run; a Markdown table; a per-op profile of ours vs bf16; weight
bytes (fp32, bf16, int8 artifact). A config that fails is recorded with its error, not hidden.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, atomic_write_json, atomic_write_text  # noqa: E402

CONFIGS = ["fp32-eager", "bf16-eager", "bf16-compile", "torchao-int8dyn-compile", "ptq4dm-w8a8"]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, args, dev, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(*args)
    _sync(dev)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args)
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(config: str, step, batch: int, dev, calib_n: int, compile_mode: str | None = None):
    """A callable (x, t, noise) -> outputs for ``config``, and its input dtype / memory format."""
    import ptq4dm
    from ptq4dm.passes import NDTC, PassContext, PassManager

    if config == "fp32-eager":
        m = copy.deepcopy(step).to(dev)
        return m, torch.float32, torch.contiguous_format
    if config in ("bf16-eager", "bf16-compile"):
        m = copy.deepcopy(step).to(dev)
        m.unet.to(torch.bfloat16)
        if config == "bf16-compile":
            m.unet.to(memory_format=torch.channels_last)
            m = torch.compile(m, mode=compile_mode)
            return m, torch.bfloat16, torch.channels_last
        return m, torch.bfloat16, torch.contiguous_format
    if config == "torchao-int8dyn-compile":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = copy.deepcopy(step).to(dev)
        m.unet.to(torch.bfloat16)
        quantize_(m.unet, Int8DynamicActivationInt8WeightConfig())
        return torch.compile(m, mode=compile_mode), torch.bfloat16, torch.contiguous_format
    if config == "ptq4dm-w8a8":
        m = copy.deepcopy(step).to(dev)
        graph = ptq4dm.capture_step(m, batch=max(batch, 2) if batch > 1 else 1, device=dev, dynamic_batch=batch > 1)
        res = ptq4dm.quantize(m, calibration=NDTC(n=calib_n, batch_size=calib_n), progress=False, graph=graph)
        PassManager.from_pipeline("lower").run(res.graph, PassContext(progress=False))
        gm = res.graph.gm
        if dev.type == "cuda":
            gm = torch.compile(gm, mode=compile_mode)
        return gm, torch.float32, torch.contiguous_format
    raise ValueError(f"unknown config {config!r}; known: {CONFIGS}")


def weight_bytes(step, calib_n: int) -> dict:
    import tempfile

    import ptq4dm
    from ptq4dm import artifact
    from ptq4dm.passes import NDTC

    n = sum(p.numel() for p in step.unet.parameters())
    res = ptq4dm.quantize(step, calibration=NDTC(n=calib_n, batch_size=calib_n), progress=False)
    with tempfile.TemporaryDirectory() as d:
        size = artifact.save(res, step, Path(d) / "a.safetensors")
    return {"params": n, "fp32_bytes": 4 * n, "bf16_bytes": 2 * n, "int8_artifact_bytes": size}


def profile_ops(fn, args, dev, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn(*args)
        _sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:top]
    return [{"op": e.key, "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ddpm-cifar10")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--chain", type=int, default=10, help="sampling steps for the end-to-end time (0: skip)")
    p.add_argument("--calib-n", type=int, default=8, help="calibration samples for ours (speed does not depend on them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode for the compiled configs; reduce-overhead = CUDA graphs (launch-bound small batches)")
    p.add_argument("--profile", action="store_true", help="per-op profile of ours vs bf16 at the largest batch")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; known: {CONFIGS}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error("--batches must be comma-separated integers")
    if min(batches) < 1:
        p.error("--batches must be >= 1")

    import ptq4dm

    dev = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    records, extras = [], {"weights": {}, "profile": {}}
    for model in args.models.split(","):
        torch.manual_seed(0)
        unet = ptq4dm.build_unet(model).eval()
        sampler = ptq4dm.make_sampler("ddpm", variance_type="learned_range" if unet.config.out_channels == 2 * unet.config.in_channels else "fixed_small",
                                      num_inference_steps=max(args.chain, 1))
        step = ptq4dm.DiffusionStep(unet, sampler).eval()
        extras["weights"][model] = weight_bytes(step, args.calib_n)
        for batch in batches:
            shape = step.sample_shape(batch)
            for config in configs:
                rec = {"device": dev_name, "model": model, "batch": batch, "config": config,
                       "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                       "compile_mode": (args.compile_mode or "default") if "compile" in config or config == "ptq4dm-w8a8" else None}
                try:
                    with torch.no_grad():
                        fn, dtype, fmt = build(config, step, batch, dev, args.calib_n, args.compile_mode)
                        g = torch.Generator().manual_seed(batch)
                        x = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
                        noise = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
                        t = torch.full((batch,), int(sampler.timesteps[0]), device=dev)
                        rec["ms_per_step"] = time_fn(fn, (x, t, noise), dev, args.warmup, args.iters)
                        if args.chain:
                            def chain(x0):
                                xc = x0
                                for tv in sampler.timesteps.tolist():
                                    xc = fn(xc, torch.full((batch,), tv, device=dev), noise)[0].to(dtype)
                                return xc
                            rec["ms_sample"] = time_fn(chain, (x,), dev, 1, max(1, args.iters // 5))
                            rec["chain_steps"] = sampler.S
                        if args.profile and batch == max(batches) and config in ("bf16-compile", "bf16-eager", "ptq4dm-w8a8"):
                            extras["profile"][f"{model}/{config}/b{batch}"] = profile_ops(fn, (x, t, noise), dev)
                except Exception as e:  # recorded, never hidden: the table shows the failure
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                records.append(rec)
                ms = rec.get("ms_per_step")
                print(f"{model:<18} b={batch:<4} {config:<24} " + (f"{ms:9.3f} ms/step" if ms is not None else rec["error"]), flush=True)
    # ratios within the run
    for r in records:
        same = {q["config"]: q.get("ms_per_step") for q in records if q["model"] == r["model"] and q["batch"] == r["batch"]}
        if r.get("ms_per_step"):
            if same.get("fp32-eager"):
                r["speedup_vs_fp32_eager"] = same["fp32-eager"] / r["ms_per_step"]
            bf16 = [v for k, v in same.items() if k.startswith("bf16") and v]
            if bf16:
                r["speedup_vs_best_bf16"] = min(bf16) / r["ms_per_step"]
    out_json = Path(args.out_json) if args.out_json else REPO / "docs" / "results" / f"bench-{dev_name.split(' (')[0].replace(' ', '_')}.json"
    atomic_write_json(out_json, records)
    atomic_write_json(out_json.with_suffix(".extras.json"), extras)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Device {dev_name}, torch {torch.__version__}, {datetime.date.today().isoformat()}. Command: `{command}`", "",
             "| model | batch | config | ms / step | ms / sample chain | vs fp32 eager | vs best bf16 |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | failed: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['ms_per_step']:.3f} | "
                     f"{r.get('ms_sample', float('nan')):.1f} | {r.get('speedup_vs_fp32_eager', float('nan')):.2f}x | "
                     f"{r.get('speedup_vs_best_bf16', float('nan')):.2f}x |")
    lines += ["", "| model | params | fp32 bytes | bf16 bytes | int8 artifact bytes |", "|---|---|---|---|---|"]
    for m, w in extras["weights"].items():
        lines.append(f"| {m} | {w['params']:,} | {w['fp32_bytes']:,} | {w['bf16_bytes']:,} | {w['int8_artifact_bytes']:,} |")
    md = "\n".join(lines)
    atomic_write_text(Path(args.out_md) if args.out_md else out_json.with_suffix(".md"), md + "\n")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
