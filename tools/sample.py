#!/usr/bin/env python
"""Load a ptq4dm artifact, rebuild its quantized graph, and write a PNG grid of samples.

    python tools/sample.py runs/demo/mnist-w8a8.ptq4dm.safetensors --n 16 --out samples.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default: beside the artifact)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lower", action=argparse.BooleanOptionalAction, default=None,
                   help="lower to int8 and compile (cpu: Inductor + oneDNN int8, cuda: Triton); default on for cuda, "
                        "off for cpu (the first step compiles, tens of seconds); --no-lower samples the fake-quant graph")
    p.add_argument("--check-weights", default=None,
                   help="FP weights the artifact must have been made from ('default' or a path)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    import torch

    import ptq4dm
    from evaluate import grid_png
    from ptq4dm.artifact import load
    from ptq4dm.ir.serialize import ArtifactError
    from ptq4dm.models.loading import WeightsError, load_default_unet, load_unet

    try:
        expect = None
        if args.check_weights:
            expect = load_default_unet() if args.check_weights == "default" else load_unet(None, args.check_weights)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        graph, step, header = load(args.artifact, expect_fp_weights=expect, device=device)
    except (ArtifactError, FileNotFoundError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ef = header.get("error_feedback")
    lower = args.lower if args.lower is not None else (device == "cuda" and not ef)
    if lower and ef:
        print(f"error: {args.artifact} was quantized with error_feedback, whose residual is Python-side sampler "
              "state that the int8 backends do not compile; sample it with --no-lower", file=sys.stderr)
        return 2
    fn = graph
    if lower:
        info = ptq4dm.lower(graph)
        print(f"lowered ({info['backend']}): {info['counts']}; kept in float: {len(info['kept'])}"
              + (f"; weights at {info['weight_bits']} bits" if "weight_bits" in info else ""))
        fn = ptq4dm.compile_step(graph)
    x = ptq4dm.sample(fn, step.sampler, step.sample_shape(args.n), seed=args.seed, device=device, progress=True)
    out = Path(args.out) if args.out else Path(args.artifact).with_suffix(".samples.png")
    pol = header["policy"]
    grid_png([(f"W{pol['weight_bits']}A{pol['act_bits']} ({'int8 ops' if lower else 'fake-quant'})", x.float().cpu())], out)
    print(f"wrote {out} ({args.n} samples, {header['sampler']['kind']} {header['sampler']['num_inference_steps']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
