#!/usr/bin/env python
"""Benchmark one denoising step (and a short sampling chain) side by side, in one run.

    python tools/bench.py --models ddpm-cifar10,iddpm-imagenet64 --batches 1,16,64,256      # on a GPU
    python tools/bench.py --models tiny --batches 2 --configs fp32-eager,bf16-eager,ptq4dm-w8a8 --iters 3

    python tools/bench.py --models ddpm-cifar10,default --batches "ddpm-cifar10=1,8,32;default=1,64,256" --device cpu

Configs (each times the whole step, UNet + sampler): fp32-eager (the paper's baseline),
fp32-compile, bf16-eager, bf16-compile (torch.compile, channels-last), bf16-compile-cpp (the same
with Inductor's C++ wrapper, which ours uses on the CPU: the float anchor with equal dispatch), torchao-int8dyn-compile
(torchao Int8DynamicActivationInt8WeightConfig + compile), pt2e-x86-int8 (the CPU anchor:
torchao's X86InductorQuantizer + prepare_pt2e / convert_pt2e on the UNet, calibrated on the same
NDTC set, compiled), ptq4dm-w8a8 (ours: ``ptq4dm.quantize`` with the recommended pipeline less
``reconstruct`` (preset "recommended-fast": reconstruct learns other weight codes on the same
grids, so the lowered graph and its speed are the same, and it would add minutes per model), ``lower``
for the device (x86: Inductor + oneDNN int8; cuda: Triton), compiled). On the CPU every
compiled config is compiled with Inductor's freezing (weights as constants: what the int8
rewrites need, and fair to the float ones). Model ``default`` is the shipped MNIST UNet.
Records: JSON list with device (the CPU model and its ISA flags on the CPU), threads, torch /
torchao versions, model, batch, config, ms_per_step (median), ms_sample (end-to-end, --chain
steps), speedups vs fp32-eager, fp32-compile, bf16-compile, bf16-compile-cpp and pt2e-x86-int8 of the same run;
timing is interleaved: every config of a (model, batch) is built first, then ``--rounds`` rounds
time each in turn (``--iters`` calls, the order rotating), and a config's time is the median of its
round medians, with the rounds kept (``ms_rounds``) to show the noise;
a Markdown table; a per-op profile of ours vs bf16; weight bytes (fp32, bf16, int8 artifact).
A config that fails is recorded with its error, not hidden.
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

CONFIGS = ["fp32-eager", "fp32-compile", "bf16-eager", "bf16-compile", "bf16-compile-cpp", "torchao-int8dyn-compile",
           "pt2e-x86-int8", "ptq4dm-w8a8"]
DEFAULT_CONFIGS = {"cuda": ["fp32-eager", "bf16-eager", "bf16-compile", "torchao-int8dyn-compile", "ptq4dm-w8a8"],
                   "cpu": ["fp32-eager", "fp32-compile", "bf16-compile", "bf16-compile-cpp", "pt2e-x86-int8", "ptq4dm-w8a8"]}
# ours as timed: the recommended pipeline without reconstruct (the same graph and grids; other weight codes)
BENCH_PIPELINE = "recommended-fast"
RATIO_TO = ("fp32-eager", "fp32-compile", "bf16-compile", "bf16-compile-cpp", "pt2e-x86-int8")


def _compile(m, dev, mode=None, cpp_wrapper=False):
    """torch.compile; on the CPU with Inductor's freezing and under no_grad, set while it compiles
    (and with Inductor's C++ wrapper where asked: the kernel calls in C++ rather than Python)."""
    fn = torch.compile(m, mode=mode)
    if dev.type != "cpu":
        return fn

    def run(*args):
        with torch.no_grad(), torch._inductor.config.patch(freezing=True, cpp_wrapper=cpp_wrapper):
            return fn(*args)
    return run


class _FloatT(torch.nn.Module):
    """The UNet with t cast to float before it: PT2E's observers cannot watch an int64 input
    ("histogram_cpu not implemented for 'Long'"), and the time embedding casts it anyway."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        out = self.unet(x, t.float())
        return out.sample if hasattr(out, "sample") else out


def build_pt2e(step, batch: int, dev, calib_n: int):
    """PT2E's own x86 flow on the step's UNet: export, X86InductorQuantizer (static, per-channel
    weights), calibrate on NDTC (x_t, t) pairs of the real FP chain, convert; the step around it."""
    import ptq4dm
    from ptq4dm.passes import NDTC, make_calibration_set
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    m = copy.deepcopy(step).to(dev)
    shape = step.sample_shape(batch)
    x = torch.randn(shape, device=dev)
    t = torch.full((batch,), int(step.sampler.timesteps[0]), device=dev)
    ep = torch.export.export(_FloatT(m.unet), (x, t)).module()
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(ep, q)
    cs = make_calibration_set(m, m.sampler, NDTC(n=calib_n, batch_size=calib_n), shape, progress=False, device=dev)
    with torch.no_grad():
        for i in range(0, cs.x.shape[0], batch):
            xb, tb = cs.x[i:i + batch].to(dev), cs.t[i:i + batch].to(dev)
            if xb.shape[0] == batch:   # exported for this batch
                prepared(xb, tb)
    converted = convert_pt2e(prepared)
    step_q = ptq4dm.DiffusionStep(torch.nn.Identity(), m.sampler)
    step_q.unet = converted   # assigned after construction: an exported module refuses .eval() / .train()
    return _compile(step_q, dev)


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
    from ptq4dm.passes import NDTC

    if config == "fp32-eager":
        m = copy.deepcopy(step).to(dev)
        return m, torch.float32, torch.contiguous_format
    if config == "fp32-compile":
        return _compile(copy.deepcopy(step).to(dev), dev, compile_mode), torch.float32, torch.contiguous_format
    if config == "pt2e-x86-int8":
        return build_pt2e(step, batch, dev, calib_n), torch.float32, torch.contiguous_format
    if config in ("bf16-eager", "bf16-compile", "bf16-compile-cpp"):
        m = copy.deepcopy(step).to(dev)
        m.unet.to(torch.bfloat16)
        if config != "bf16-eager":
            m.unet.to(memory_format=torch.channels_last)
            return (_compile(m, dev, compile_mode, cpp_wrapper=config == "bf16-compile-cpp"), torch.bfloat16,
                    torch.channels_last)
        return m, torch.bfloat16, torch.contiguous_format
    if config == "torchao-int8dyn-compile":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = copy.deepcopy(step).to(dev)
        m.unet.to(torch.bfloat16)
        quantize_(m.unet, Int8DynamicActivationInt8WeightConfig())
        return _compile(m, dev, compile_mode), torch.bfloat16, torch.contiguous_format
    if config == "ptq4dm-w8a8":
        m = copy.deepcopy(step).to(dev)
        graph = ptq4dm.capture_step(m, batch=max(batch, 2) if batch > 1 else 1, device=dev, dynamic_batch=batch > 1)
        res = ptq4dm.quantize(m, calibration=NDTC(n=calib_n, batch_size=calib_n), progress=False, graph=graph,
                              pipeline=BENCH_PIPELINE)
        info = ptq4dm.lower(res.graph)
        build.last_lower = {"backend": info["backend"], "counts": info["counts"], "kept": len(info["kept"]),
                            **{k: info[k] for k in ("weight_bits", "mixed_bf16", "mixed_bf16_min_batch", "folded_tables")
                               if k in info}}
        if dev.type == "cuda":
            return torch.compile(res.graph.gm, mode=compile_mode), torch.float32, torch.contiguous_format
        return ptq4dm.compile_step(res.graph), torch.float32, torch.contiguous_format
    raise ValueError(f"unknown config {config!r}; known: {CONFIGS}")


def weight_bytes(step, calib_n: int) -> dict:
    import tempfile

    import ptq4dm
    from ptq4dm import artifact
    from ptq4dm.passes import NDTC

    n = sum(p.numel() for p in step.unet.parameters())
    res = ptq4dm.quantize(step, calibration=NDTC(n=calib_n, batch_size=calib_n), progress=False, pipeline=BENCH_PIPELINE)
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


def write_results(records: list[dict], extras: dict, args, argv, dev, dev_name: str, isa, ao_version) -> str:
    """Ratios within the run, then the JSON records, the extras and the Markdown table, written
    atomically; called after every (model, batch), so an interrupted run keeps what it measured."""
    # ratios within the run
    for r in records:
        same = {q["config"]: q.get("ms_per_step") for q in records if q["model"] == r["model"] and q["batch"] == r["batch"]}
        if r.get("ms_per_step"):
            for ref in RATIO_TO:
                if same.get(ref):
                    r[f"speedup_vs_{ref.replace('-', '_')}"] = same[ref] / r["ms_per_step"]
            bf16 = [v for k, v in same.items() if k.startswith("bf16") and v]
            if bf16:
                r["speedup_vs_best_bf16"] = min(bf16) / r["ms_per_step"]
    default_name = f"bench-{dev_name.split(' (')[0].replace(' ', '_')}.json" if dev.type == "cuda" else "bench-cpu.json"
    out_json = Path(args.out_json) if args.out_json else REPO / "docs" / "results" / default_name
    atomic_write_json(out_json, records)
    atomic_write_json(out_json.with_suffix(".extras.json"), extras)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    isa_s = f", ISA {' '.join(isa['flags'])}" if isa else ""
    lines = [f"Device {dev_name}{isa_s}, torch {torch.__version__}, torchao {ao_version}, "
             f"{datetime.date.today().isoformat()}. Command: `{command}`", "",
             "| model | batch | config | ms / step | ms / sample chain | vs fp32 eager | vs fp32 compile | vs bf16 compile "
             "| vs bf16 compile (C++ wrapper) | vs pt2e int8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, ref):
        v = r.get(f"speedup_vs_{ref.replace('-', '_')}")
        return f"{v:.2f}x" if v else "—"
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['ms_per_step']:.3f} | "
                     f"{r.get('ms_sample', float('nan')):.1f} | " + " | ".join(ratio(r, ref) for ref in RATIO_TO) + " |")
    lines += ["", "| model | params | fp32 bytes | bf16 bytes | int8 artifact bytes |", "|---|---|---|---|---|"]
    for m, w in extras["weights"].items():
        lines.append(f"| {m} | {w['params']:,} | {w['fp32_bytes']:,} | {w['bf16_bytes']:,} | {w['int8_artifact_bytes']:,} |")
    md = "\n".join(lines)
    atomic_write_text(Path(args.out_md) if args.out_md else out_json.with_suffix(".md"), md + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ddpm-cifar10")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--configs", default=None, help="comma-separated, of: " + ",".join(CONFIGS)
                   + "; default: " + "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_CONFIGS.items()))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed calls per config per round")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds over all configs, interleaved; a config's time is the median of its round medians")
    p.add_argument("--chain", type=int, default=10, help="sampling steps for the end-to-end time, the sampler's "
                   "first ones (0: skip)")
    p.add_argument("--sampler-steps", type=int, default=100,
                   help="the DDPM sampler's steps: what ours is calibrated and bias-corrected on (the shipped setting)")
    p.add_argument("--calib-n", type=int, default=8, help="calibration samples for ours (speed does not depend on them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode for the compiled configs; reduce-overhead = CUDA graphs (launch-bound small batches)")
    p.add_argument("--profile", action="store_true", help="per-op profile of ours vs bf16 at the largest batch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    configs = args.configs.split(",") if args.configs else DEFAULT_CONFIGS["cuda" if dev.type == "cuda" else "cpu"]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; known: {CONFIGS}")
    models = args.models.split(",")
    try:   # "1,8,32" for every model, or per model: "ddpm-cifar10=1,8,32;default=1,64,256"
        if "=" in args.batches:
            per = dict(part.split("=", 1) for part in args.batches.split(";"))
            batches_of = {m: [int(b) for b in per[m].split(",")] for m in models}
        else:
            batches_of = {m: [int(b) for b in args.batches.split(",")] for m in models}
    except (ValueError, KeyError) as e:
        p.error(f"--batches: comma-separated integers, or MODEL=B,B;MODEL=B,B naming every model ({e})")
    if min(min(v) for v in batches_of.values()) < 1:
        p.error("--batches must be >= 1")
    if args.sampler_steps < 1 or args.chain < 0:
        p.error(f"--sampler-steps must be >= 1 and --chain >= 0 (got {args.sampler_steps}, {args.chain})")

    import ptq4dm

    try:
        import torchao
        ao_version = torchao.__version__
    except Exception:
        ao_version = None
    if dev.type == "cuda":
        dev_name, isa = torch.cuda.get_device_name(dev), None
    else:
        from ptq4dm.backends.x86 import cpu_isa

        isa = cpu_isa()
        dev_name = f"{isa['cpu']} ({torch.get_num_threads()} threads)"
    records, extras = [], {"weights": {}, "profile": {}, "lower": {}}
    for model in models:
        batches = batches_of[model]
        torch.manual_seed(0)
        unet = (ptq4dm.load_default_unet() if model == "default" else ptq4dm.build_unet(model)).eval()
        sampler = ptq4dm.make_sampler("ddpm", variance_type="learned_range" if unet.config.out_channels == 2 * unet.config.in_channels else "fixed_small",
                                      num_inference_steps=args.sampler_steps)
        step = ptq4dm.DiffusionStep(unet, sampler).eval()
        extras["weights"][model] = weight_bytes(step, args.calib_n)
        for batch in batches:
            shape = step.sample_shape(batch)
            torch._dynamo.reset()   # each batch compiles afresh (no dynamic-shape recompile of the previous
            #                         batch's frozen graphs); within a batch every config stays built
            built = {}              # config -> (fn, args, record)
            for config in configs:
                rec = {"device": dev_name, "model": model, "batch": batch, "config": config,
                       "threads": torch.get_num_threads(), **({"isa_flags": isa["flags"]} if isa else {}),
                       "torch": torch.__version__, "torchao": ao_version, "date": datetime.date.today().isoformat(),
                       "sampler_steps": args.sampler_steps,
                       "compile_mode": (args.compile_mode or "default") if "compile" in config or config == "ptq4dm-w8a8" else None}
                records.append(rec)
                try:
                    with torch.no_grad():
                        build.last_lower = None
                        fn, dtype, fmt = build(config, step, batch, dev, args.calib_n, args.compile_mode)
                        t_build = time.perf_counter()
                        g = torch.Generator().manual_seed(batch)
                        x = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
                        noise = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
                        t = torch.full((batch,), int(sampler.timesteps[0]), device=dev)
                        fn(x, t, noise)   # the first call compiles
                        rec["first_call_s"] = time.perf_counter() - t_build
                        if build.last_lower:
                            rec["lower"] = build.last_lower
                        built[config] = (fn, (x, t, noise), dtype)
                except Exception as e:  # recorded, never hidden: the table shows the failure
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                    print(f"{model:<18} b={batch:<4} {config:<24} {rec['error']}", flush=True)
            # timing: rounds over all configs, interleaved (the order rotates each round), so that a
            # machine whose speed drifts during the run (shared hosts: 10-25% measured) moves every
            # config alike; a config's time is the median over rounds of its per-round median
            rounds = {c: [] for c in built}
            order = list(built)
            with torch.no_grad():
                for c in order:
                    fn, a, _ = built[c]
                    for _ in range(args.warmup):
                        fn(*a)
                for r_i in range(args.rounds):
                    for c in order[r_i % len(order):] + order[:r_i % len(order)]:
                        fn, a, _ = built[c]
                        rounds[c].append(time_fn(fn, a, dev, 1, args.iters))
            for rec in records[-len(configs):]:
                c = rec["config"]
                if c not in built:
                    continue
                rec["ms_per_step"] = statistics.median(rounds[c])
                rec["ms_rounds"] = [round(v, 3) for v in rounds[c]]
                fn, (x, t, noise), dtype = built[c]
                try:
                    with torch.no_grad():
                        if args.chain:
                            def chain(x0, fn=fn, noise=noise, dtype=dtype):
                                xc = x0
                                for tv in sampler.timesteps.tolist()[:args.chain]:
                                    xc = fn(xc, torch.full((batch,), tv, device=dev), noise)[0].to(dtype)
                                return xc
                            rec["ms_sample"] = time_fn(chain, (x,), dev, 1, max(1, args.iters // 5))
                            rec["chain_steps"] = min(args.chain, sampler.S)
                        if args.profile and batch == max(batches) and c in ("bf16-compile", "bf16-eager", "ptq4dm-w8a8"):
                            extras["profile"][f"{model}/{c}/b{batch}"] = profile_ops(fn, (x, t, noise), dev)
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                ms = rec["ms_per_step"]
                spread = f"  (rounds {min(rounds[c]):.1f}-{max(rounds[c]):.1f})"
                print(f"{model:<18} b={batch:<4} {c:<24} {ms:9.3f} ms/step{spread}", flush=True)
            del built
            write_results(records, extras, args, argv, dev, dev_name, isa, ao_version)
    md = write_results(records, extras, args, argv, dev, dev_name, isa, ao_version)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
