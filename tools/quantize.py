#!/usr/bin/env python
"""Quantize a diffusion model with PTQ4DM: capture, mark, NDTC-calibrate, MSE-solve, fake-quant;
save the int8 artifact, sample a grid, print a summary.

    python tools/quantize.py --demo                        # the default MNIST model, W8A8 (+ bias correction)
    python tools/quantize.py --model path/to/unet_folder --sampler ddim --steps 100 \\
        --calibration ndtc --mu 0.4 --sigma 0.5 --n 1024 --out runs/my.ptq4dm.safetensors
    python tools/quantize.py --passes "decompose_attention,mark,observe,calibrate,solve{p=2.4},fakequant" \\
        --dump-ir-after mark
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, atomic_write_json, atomic_write_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="default",
                   help="'default' (the shipped MNIST DDPM), a built-in architecture name (random weights), "
                        "a .safetensors file or a diffusers UNet folder")
    m.add_argument("--arch", default=None, help="architecture for a .safetensors file without a .json card")
    s = p.add_argument_group("sampler")
    s.add_argument("--sampler", default=None, choices=["ddim", "ddpm"],
                   help="default: ddim (--demo: ddpm, the sampler docs/results.md measures)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (respaced from T = 1000); default 50 (--demo: 100)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--variance", default="fixed_small", choices=["fixed_small", "fixed_large", "learned_range"])
    c = p.add_argument_group("calibration")
    c.add_argument("--calibration", default="ndtc", choices=["ndtc", "uniform", "single", "random"])
    c.add_argument("--mu", type=float, default=0.4, help="NDTC mean, fraction of T (paper: <= 0.5)")
    c.add_argument("--sigma", type=float, default=0.5, help="NDTC std, fraction of T (paper: 0.5)")
    c.add_argument("--calib-n", "--n", dest="n", type=int, default=256,
                   help="calibration samples (paper: 1024); under torchrun write --calib-n (torchrun's own parser "
                        "rejects --n as ambiguous)")
    c.add_argument("--calib-batch", type=int, default=128)
    c.add_argument("--calib-per-chain", type=int, default=1, metavar="K",
                   help="samples taken from one calibration chain, each at its own drawn step (ndtc / uniform; "
                        "default 1, the paper's); K times the samples for the chains' compute, for the large "
                        "sets reconstruct learns on; K must divide --calib-batch")
    c.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where calibration sets are cached (default .cache/calibration in the repository)")
    c.add_argument("--seed", type=int, default=0)
    q = p.add_argument_group("quantization")
    q.add_argument("--solver", default="mse", choices=["mse", "minmax"])
    q.add_argument("--p", type=float, default=2.0, help="Lp norm of the range search (paper: 2; reference code: 2.4)")
    q.add_argument("--weight-bits", type=int, default=8)
    q.add_argument("--act-bits", type=int, default=8)
    q.add_argument("--attn-bits", type=int, default=8)
    q.add_argument("--pipeline", default="recommended", choices=["recommended", "recommended-fast", "ptq4dm-paper"],
                   help="recommended (default): the paper's passes + sensitivity{widen=4,weights=false} + reconstruct + "
                        "bias_correct{groups=10}, conv_in / conv_out and the time embedding in float, mean / variance / "
                        "x_{t-1} at 16 bits (docs/results/history.md, 'DDIM: where the W8A8 error comes from'); recommended-fast: the same without reconstruct "
                        "(~2 minutes less on the default model, further from FP on DDIM); ptq4dm-paper: the "
                        "paper's full setting, all at 8 bits")
    q.add_argument("--output-bits", type=int, default=None,
                   help="bits of mean / variance / x_{t-1} (default: 16 recommended, 8 ptq4dm-paper)")
    q.add_argument("--act-symmetric", action="store_true")
    q.add_argument("--fp-outputs", action="store_true", help="leave mean / variance / x_{t-1} in float")
    q.add_argument("--keep-first-last-fp", action=argparse.BooleanOptionalAction, default=None,
                   help="conv_in / conv_out in float (default: on for recommended, off for ptq4dm-paper)")
    q.add_argument("--time-path-fp", action=argparse.BooleanOptionalAction, default=None,
                   help="layers whose input depends on t alone (the time embedding) in float "
                        "(default: on for recommended, off for ptq4dm-paper)")
    q.add_argument("--per-step", action="store_true", help="one activation range per sampler step (beyond the paper)")
    q.add_argument("--share-xt-range", action="store_true",
                   help="convs reading x_t use the range x_{t-1} was quantized to one step earlier (no second rounding)")
    q.add_argument("--bias-correct", action=argparse.BooleanOptionalAction, default=None,
                   help="the bias_correct pass: fold each quantized layer's mean error into its bias (not in the paper; "
                        "in the recommended pipeline, per 1/10 of the steps; --no-bias-correct removes it)")
    q.add_argument("--bias-groups", type=int, default=None, metavar="G",
                   help="bias_correct{groups=G}: a correction per 1/G of the sampler's steps (default 10)")
    q.add_argument("--reconstruct", nargs="?", const="reconstruct", default=None, metavar="OPTIONS",
                   help="learned rounding of the weights (AdaRound, layer by layer) before bias correction (in the "
                        "recommended pipeline already); optionally with options, e.g. --reconstruct "
                        "'reconstruct{iters=600}' (docs/passes.md)")
    q.add_argument("--no-reconstruct", action="store_true",
                   help="drop the reconstruct pass from the pipeline (weights rounded to nearest; faster to quantize)")
    q.add_argument("--error-feedback", nargs="?", const="error_feedback", default=None, metavar="OPTIONS",
                   help="carry x_{t-1}'s rounding residual into the next step (with --output-bits 8: the paper's 8-bit "
                        "outputs that hold on DDIM; the residual is sampler state, float32 or e.g. "
                        "'error_feedback{residual_bits=2}'; the graph is not lowered; docs/passes.md)")
    q.add_argument("--chain-gains", nargs="?", const="chain_gains", default=None, metavar="OPTIONS",
                   help="then fit each 4-bit weight's per-channel scale (codes fixed) against short unrolled float chains "
                        "from the noisiest quarter of the steps (~3 minutes on the default model; with 4-bit weights: "
                        "--weight-bits 4 or --weight-budget), e.g. 'chain_gains{iters=300}' (docs/passes.md)")
    q.add_argument("--weight-budget", type=float, default=None, metavar="BITS",
                   help="mixed 4- to 8-bit weights, at most BITS bits per weight on average, each weight's width chosen "
                        "from its measured error (sensitivity{budget=BITS}); the recommended pipeline then learns their rounding")
    q.add_argument("--weight-widths", choices=("ends", "all"), default=None,
                   help="with --weight-budget: each weight at any width from 4 to 8, each measured (all, the default; "
                        "sensitivity{widths=all}) or at 4 or at 8 bits only (ends; docs/passes.md)")
    q.add_argument("--passes", default=None, help="pipeline string (default: the full PTQ4DM pipeline)")
    q.add_argument("--dump-ir-after", action="append", default=[], metavar="PASS")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="artifact path (.safetensors); default runs/<model>-w8a8.ptq4dm.safetensors")
    o.add_argument("--sample", type=int, default=16, help="samples to draw for the grid (0: none)")
    o.add_argument("--grid", default=None, help="PNG grid path (default: beside the artifact)")
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None,
                   help="time one step (batch 64) on this machine: FP32 eager, FP32 torch.compile and the int8 graph "
                        "(lower + compile; cpu: Inductor + oneDNN int8). Default: on with --demo")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--demo", action="store_true", help="the README demo: default model, DDPM 100 steps, W8A8 NDTC + MSE + "
                        "bias_correct{groups=10}, grid + report + FP32 vs int8 ms per step")
    return p


def parse_args(argv):
    p = build_parser()
    return p.parse_args(argv), p


def check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".ptq4dm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to {path.parent} ({e.strerror}); choose another --out")


def step_speed(step, graph, batch: int = 64, iters: int = 10) -> dict:
    """Median ms per step of FP32 eager, FP32 compiled and our int8 graph (a lowered, compiled copy
    of ``graph``), side by side on this machine; the lowering's report."""
    import copy
    import statistics

    import torch

    import ptq4dm

    lowered = ptq4dm.StepGraph(copy.deepcopy(graph.gm), graph.example_inputs, dict(graph.meta), graph.dynamic_batch)
    info = ptq4dm.lower(lowered)
    fns = {"fp32 eager": step, "fp32 compile": ptq4dm.compile_step(ptq4dm.capture_step(step, batch=batch)),
           "int8 (ptq4dm)": ptq4dm.compile_step(lowered)}
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(step.sample_shape(batch), generator=g), torch.randn(step.sample_shape(batch), generator=g)
    t = torch.full((batch,), int(step.sampler.timesteps[0]))
    out = {}
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(3):   # the first call compiles
                fn(x, t, noise)
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn(x, t, noise)
                ts.append((time.perf_counter() - t0) * 1e3)
            out[name] = statistics.median(ts)
    return {"ms": out, "batch": batch, "lower": info}


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    if args.sampler is None:
        args.sampler = "ddpm" if args.demo else "ddim"
    if args.steps is None:
        args.steps = 100 if args.demo else 50
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    from ptq4dm.passes import PRESETS

    preset_passes, preset_policy = PRESETS[args.pipeline]
    if args.output_bits is None:
        args.output_bits = preset_policy.output_bits
    if args.keep_first_last_fp is None:
        args.keep_first_last_fp = preset_policy.keep_first_last_fp
    if args.time_path_fp is None:
        args.time_path_fp = preset_policy.time_path_fp
    for f in ("weight_bits", "act_bits", "attn_bits", "output_bits"):
        if not 2 <= getattr(args, f) <= 16:
            parser.error(f"--{f.replace('_', '-')} must be in [2, 16]")
    if args.bias_correct is None:
        args.bias_correct = "bias_correct" in (args.passes or preset_passes) or (args.demo and args.passes is None)
    if args.bias_groups is not None and args.bias_groups < 1:
        parser.error("--bias-groups must be >= 1")
    if args.bias_groups is not None and not args.bias_correct:
        parser.error("--bias-groups is an option of bias_correct: add --bias-correct")
    args.bias_groups = 10 if args.bias_groups is None else args.bias_groups
    model_tag = "mnist" if args.model == "default" else Path(args.model).stem
    out = Path(args.out) if args.out else REPO / "runs" / ("demo" if args.demo else model_tag) / f"{model_tag}-w{args.weight_bits}a{args.act_bits}.ptq4dm.safetensors"
    check_writable(out)
    if args.dump_ir_after:
        check_writable(out.parent / "ir" / "x")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import ptq4dm
    from ptq4dm import distributed

    # torchrun (WORLD_SIZE > 1): the calibration chains, observers and bias_correct split over the
    # ranks; rank 0 writes the artifact, the report and the grid
    distributed.init_from_env()
    from ptq4dm import artifact
    from ptq4dm.ir.capture import CaptureError
    from ptq4dm.models.loading import WeightsError, load_default_unet, load_unet, trained_schedule
    from ptq4dm.models.unets import ARCHITECTURES
    from ptq4dm.passes import MSE, NDTC, MinMax, PipelineError, QuantPolicy, RandomNoise, Single, Uniform

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        if args.model == "default":
            unet = load_default_unet()
        elif args.model in ARCHITECTURES:
            torch.manual_seed(args.seed)
            unet = load_unet(args.model)
            print(f"note: {args.model} has random weights (give a weights path for a trained model)")
        else:
            unet = load_unet(args.arch, args.model)
        # the sampler uses the betas the weights were trained on (their card says; random weights: linear)
        schedule = "linear" if args.model in ARCHITECTURES else trained_schedule(
            None if args.model == "default" else args.model)
        kw = {"num_inference_steps": args.steps, "schedule": schedule}
        sampler = (ptq4dm.make_sampler("ddim", eta=args.eta, **kw) if args.sampler == "ddim"
                   else ptq4dm.make_sampler("ddpm", variance_type=args.variance, **kw))
        step = ptq4dm.DiffusionStep(unet, sampler).eval()
        k = args.calib_per_chain
        if k != 1 and args.calibration not in ("ndtc", "uniform"):
            raise SystemExit(f"--calib-per-chain {k} needs --calibration ndtc or uniform (the {args.calibration} "
                             f"calibration has no chain to take several samples from)")
        calib = {"ndtc": NDTC(mu=args.mu, sigma=args.sigma, n=args.n, batch_size=args.calib_batch, seed=args.seed,
                              per_chain=k),
                 "uniform": Uniform(n=args.n, batch_size=args.calib_batch, seed=args.seed, per_chain=k),
                 "single": Single(n=args.n, batch_size=args.calib_batch, seed=args.seed),
                 "random": RandomNoise(n=args.n, batch_size=args.calib_batch, seed=args.seed)}[args.calibration]
        calib.validate()
        solver = MSE(p=args.p) if args.solver == "mse" else MinMax(p=args.p)
        solver.validate()
        policy = QuantPolicy(weight_bits=args.weight_bits, act_bits=args.act_bits, attn_bits=args.attn_bits,
                             output_bits=args.output_bits, act_symmetric=args.act_symmetric,
                             quantize_outputs=not args.fp_outputs, keep_first_last_fp=args.keep_first_last_fp,
                             time_path_fp=args.time_path_fp,
                             timestep_groups=args.steps if args.per_step else 1, share_xt_range=args.share_xt_range)
        stages["load"] = time.perf_counter() - t0
        from ptq4dm.passes.base import _split_top, parse_pipeline

        # items split at top-level commas only ('sensitivity{widen=4,weights=false}' is one item)
        passes_ = [s.strip() for s in _split_top(args.passes or preset_passes) if not s.strip().startswith("bias_correct")]
        if args.weight_budget is not None:
            if not 4 <= args.weight_budget <= args.weight_bits:
                parser.error(f"--weight-budget is an average in [4, --weight-bits={args.weight_bits}] bits per weight "
                             f"(4: every weight at 4 bits), got {args.weight_budget:g}")
            sens = next((i for i, s_ in enumerate(passes_) if s_.startswith("sensitivity")), None)
            opts = dict(parse_pipeline(passes_[sens])[0][1]) if sens is not None else {}
            opts.update(weights="true", weight_bits=4, budget=f"{args.weight_budget:g}",
                        widths=args.weight_widths or "all")
            item = "sensitivity{" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                             for k, v in opts.items()) + "}"
            if sens is not None:
                passes_[sens] = item
            else:
                fq = next((i for i, s_ in enumerate(passes_) if s_.startswith("fakequant")), None)
                if fq is None:
                    parser.error("--weight-budget needs 'fakequant' in the pipeline (the sensitivity pass measures "
                                 "the fake-quantized graph)")
                passes_.insert(fq + 1, item)
        elif args.weight_widths is not None:
            parser.error("--weight-widths chooses among the widths of a --weight-budget: give --weight-budget BITS too")
        if args.reconstruct and args.no_reconstruct:
            parser.error("--reconstruct and --no-reconstruct contradict each other: give one")
        if args.no_reconstruct:
            passes_ = [s_ for s_ in passes_ if not s_.startswith("reconstruct")]
        if args.reconstruct:
            if not args.reconstruct.startswith("reconstruct"):
                parser.error(f"--reconstruct takes the pass with its options, e.g. 'reconstruct{{iters=600}}', "
                             f"got {args.reconstruct!r}")
            passes_ = [s for s in passes_ if not s.startswith("reconstruct")] + [args.reconstruct]
        pipeline = ",".join(passes_)
        if args.bias_correct:
            pipeline += ",bias_correct" if args.bias_groups == 1 else f",bias_correct{{groups={args.bias_groups}}}"
        if args.error_feedback:
            if not args.error_feedback.startswith("error_feedback"):
                parser.error(f"--error-feedback takes the pass with its options, e.g. "
                             f"'error_feedback{{residual_bits=2}}', got {args.error_feedback!r}")
            if policy.output_bits > 8 or not policy.quantize_outputs:
                parser.error("--error-feedback corrects the rounding of an 8-bit x_{t-1}; give --output-bits 8 "
                             f"(x_{{t-1}} is {'float' if not policy.quantize_outputs else f'{policy.output_bits}-bit'} here)")
            pipeline += "," + args.error_feedback
            # widen must not hand x_{t-1} its 16 bits back
            pipeline = pipeline.replace("sensitivity{", "sensitivity{outputs=false,", 1) if "sensitivity{" in pipeline \
                else pipeline
        if args.chain_gains:
            if not args.chain_gains.startswith("chain_gains"):
                parser.error(f"--chain-gains takes the pass with its options, e.g. 'chain_gains{{iters=300}}', "
                             f"got {args.chain_gains!r}")
            pipeline += "," + args.chain_gains
        result = ptq4dm.quantize(step, calibration=calib, solver=solver, policy=policy,
                                 pipeline=pipeline, progress=not args.no_progress,
                                 cache_dir=Path(args.cache_dir) if args.cache_dir else REPO / ".cache" / "calibration", dump_after=tuple(args.dump_ir_after),
                                 dump_dir=out.parent / "ir")
    except (FileNotFoundError, WeightsError, PipelineError, CaptureError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except distributed.RankFailed as e:
        print(f"error (rank {distributed.rank()}): {e}", file=sys.stderr)
        return 1
    stages.update(result.report.timings)
    if not distributed.is_main():
        return 0
    if "fakequant" not in pipeline:
        print(result.report.table(limit=20))
        print(f"pipeline stopped before fakequant: no artifact written")
        return 0
    t1 = time.perf_counter()
    size = artifact.save(result, step, out, extra={"calibration": {k: v for k, v in result.report.calibration.get("config", {}).items()}})
    stages["save"] = time.perf_counter() - t1
    report = result.report.to_dict()
    atomic_write_json(out.with_suffix(".report.json"), report)
    atomic_write_text(out.with_suffix(".report.txt"), result.report.table() + (
        "\n\nsensitivity (each tensor alone quantized)\n" + result.report.sensitivity_table()
        if result.report.sensitivity else "") + (
        "\n\nmixed weight precision\n" + result.report.bits_table() if result.report.sensitivity.get("mixed") else ""))
    grid = None
    if args.sample:
        t1 = time.perf_counter()
        fp = ptq4dm.sample(step, sampler, step.sample_shape(args.sample), seed=args.seed, progress=not args.no_progress)
        qs = ptq4dm.sample(result.graph, sampler, step.sample_shape(args.sample), seed=args.seed, progress=not args.no_progress)
        stages["sample"] = time.perf_counter() - t1
        from evaluate import grid_png
        from ptq4dm.models.metrics import psnr

        grid = Path(args.grid) if args.grid else out.with_suffix(".png")
        bc = result.report.bias_correction
        label = f"{policy.describe()} PTQ4DM" + (f" + bias corr. 1/{bc['groups']}" if bc and bc["groups"] > 1
                                                 else " + bias corr." if bc else "")
        grid_png([("FP32", fp), (label, qs)], grid)
        report["psnr_vs_fp_db"] = psnr(qs, fp)
        atomic_write_json(out.with_suffix(".report.json"), report)
    fp_bytes = sum(p.numel() * 4 for p in unet.parameters())
    print(result.report.table(limit=12))
    print()
    print("summary")
    print(f"  model            {args.model} ({sum(p.numel() for p in unet.parameters()):,} parameters), "
          f"{sampler.kind} {args.steps} steps")
    print(f"  quantized        {len(result.report.tensors)} tensors {result.report.counts}; "
          f"{len(result.report.left_in_float)} node(s) left in float")
    gain = result.report.total_error_minmax / max(result.report.total_error, 1e-30)
    print(f"  error vs min-max {result.report.total_error:.4g} vs {result.report.total_error_minmax:.4g} "
          f"(MSE solver {gain:.2f}x lower)")
    sens = result.report.sensitivity
    if sens:
        top = ", ".join(f"{r['key'].split(':')[-1]} {100 * r['share']:.0f}%" for r in sens["rows"][:3])
        wide = (f"; widened to 16 bits: {len(sens['widened'])} activations, x_{{t-1}} error {sens['error_all']:.3g} -> "
                f"{sens['error_all_widened']:.3g}" if sens.get("widened") else "")
        print(f"  sensitivity      costliest: {top} of the step's error{wide} (table: {out.with_suffix('.report.txt')})")
        if sens.get("mixed"):
            m = sens["mixed"]
            print(f"  mixed precision  {sum(r['bits'] < r['own_bits'] for r in m['layers'])} of {len(m['layers'])} weights "
                  f"at fewer bits, {m['average_bits']:.2f} bits per weight (budget {m['budget']:g}, "
                  + ("each weight at 4 or 8 bits" if m.get("widths") == "ends" else "every width from 4 up")
                  + f"): "
                  f"{m['bytes'] / 1e3:,.1f} kB of weight codes instead of {m['bytes_at_own_bits'] / 1e3:,.1f} kB")
    rc = result.report.reconstruct
    if rc:
        moved = sum(r["moved"] for r in rc["layers"]) / len(rc["layers"])
        unit = "blocks / lone layers" if rc.get("blocks") else "layers"
        print(f"  reconstruct      {len(rc['layers'])} {unit}, {rc['iters']} steps each on {rc['n']} samples: summed "
              f"output error {rc['error_before']:.3g} -> {rc['error_after']:.3g}, {100 * moved:.1f}% of codes "
              f"rounded the other way ({stages.get('reconstruct', 0):.0f} s)")
    cg = result.report.chain_gains
    if cg:
        print(f"  chain gains      {cg['gains']} channel gains of {cg['weights']} weights fitted on {cg['unroll']}-step "
              f"unrolls from the first {cg['start_steps']} steps: held-out chains' loss {cg['held_before']:.3g} -> "
              f"{cg['held_after']:.3g}, " + (f"kept (mean |log gain| {cg['gain_abs_mean']:.3f})" if cg["kept"]
                                              else "not kept (the weights as before)")
              + f" ({stages.get('chain_gains', 0):.0f} s)")
    bc = result.report.bias_correction
    if bc:
        rel = [x["mean_abs_shift"] / max(x["bias_mean_abs"], 1e-12) for x in bc["shifts"]]
        per = f", per 1/{bc['groups']} of the steps" if bc["groups"] > 1 else ""
        print(f"  bias correction  {bc['layers']} conv / linear biases corrected{per} on {bc['samples']} calibration "
              f"samples (mean |shift| / mean |bias|: median {sorted(rel)[len(rel) // 2]:.3g}, max {max(rel):.3g})")
    print(f"  artifact         {out} ({size / 1e6:.2f} MB; fp32 weights {fp_bytes / 1e6:.2f} MB, "
          f"bf16 {fp_bytes / 2e6:.2f} MB)")
    if grid:
        print(f"  samples          {grid} (PSNR vs FP on the same seeds: {report['psnr_vs_fp_db']:.2f} dB)")
    print(f"  report           {out.with_suffix('.report.json')}")
    if (args.speed if args.speed is not None else args.demo) and result.graph.meta.get("error_feedback"):
        print("  speed            not measured: error_feedback's residual is Python-side sampler state that the "
              "int8 backends do not compile (docs/passes.md)")
    elif args.speed if args.speed is not None else args.demo:
        t1 = time.perf_counter()
        sp = step_speed(step, result.graph)
        stages["speed"] = time.perf_counter() - t1
        ms, info = sp["ms"], sp["lower"]
        bits = f", weights at {info['weight_bits']} bits (no VNNI)" if info.get("weight_bits") == 7 else ""
        print(f"  speed (batch {sp['batch']}) " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
              + f" per step: int8 {ms['fp32 compile'] / ms['int8 (ptq4dm)']:.2f}x fp32 compile, "
              f"{ms['fp32 eager'] / ms['int8 (ptq4dm)']:.2f}x fp32 eager ({info['backend']}: {info['counts']}{bits})")
        report["speed"] = {"batch": sp["batch"], "ms_per_step": ms, "lower_counts": info["counts"]}
        atomic_write_json(out.with_suffix(".report.json"), report)
    print("  time per stage   " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        from ptq4dm import distributed
        distributed.shutdown()
    sys.exit(rc)
