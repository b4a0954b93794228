"""(docs/results/x86/crossover.py) Where does int8-mixed-bf16 pay, and what does Inductor's C++ wrapper
save? Interleaved timing in one process of the shipped x86 int8 step (recommended-fast pipeline,
calibration N = 8) lowered with mixed_bf16 forced on ("mixed") or off ("fp32out"), each compiled
with the Python wrapper or, suffix ":cpp", the C++ wrapper, beside bf16-compile ("bf16", ":cpp")
and PT2E ("pt2e"); further ``:key=value`` parts are lower options (``mixed:cpp:split16=false``). Every variant is built first, then timed in rotating rounds of 30 calls.

    python docs/results/x86/crossover.py default 1 mixed,fp32out,mixed:cpp,fp32out:cpp,bf16,bf16:cpp,pt2e --rounds 8

What it measured on 2026-12-05 is in docs/results.md, Speed ("When int8-mixed-bf16 pays") and in
crossover-2026-12-05.log beside this file."""
import argparse, copy, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import bench  # noqa: E402
import ptq4dm  # noqa: E402
from ptq4dm.passes import NDTC  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("batch", type=int); ap.add_argument("variants")
ap.add_argument("--rounds", type=int, default=8); ap.add_argument("--iters", type=int, default=30)
a = ap.parse_args()
torch.set_num_threads(2); torch.manual_seed(0)
unet = (ptq4dm.load_default_unet() if a.model == "default" else ptq4dm.build_unet(a.model)).eval()
learned = unet.config.out_channels == 2 * unet.config.in_channels
sampler = ptq4dm.make_sampler("ddpm", variance_type="learned_range" if learned else "fixed_small", num_inference_steps=100)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
b, dev = a.batch, torch.device("cpu")
shape = step.sample_shape(b); g = torch.Generator().manual_seed(b)
x = torch.randn(shape, generator=g); noise = torch.randn(shape, generator=g)
t = torch.full((b,), int(sampler.timesteps[0]))
built = {}
for v in a.variants.split(","):
    base, *extra = v.split(":")
    cpp = "cpp" in extra
    opts = dict(e.split("=") for e in extra if "=" in e)   # lower options, e.g. mixed:cpp:split16=false
    opts = {k: (w == "true") if w in ("true", "false") else int(w) if w.isdigit() else w for k, w in opts.items()}
    t0 = time.time()
    with torch.no_grad():
        if base == "bf16":
            fn, dt, fmt = bench.build("bf16-compile-cpp" if cpp else "bf16-compile", step, b, dev, 8)
            args = (x.to(dt).contiguous(memory_format=fmt), t, noise.to(dt).contiguous(memory_format=fmt))
        elif base == "pt2e":
            fn, args = bench.build_pt2e(step, b, dev, 8), (x, t, noise)
        elif base in ("mixed", "fp32out"):
            m = copy.deepcopy(step)
            graph = ptq4dm.capture_step(m, batch=max(b, 2) if b > 1 else 1, dynamic_batch=b > 1)
            res = ptq4dm.quantize(m, calibration=NDTC(n=8, batch_size=8), progress=False, graph=graph,
                                  pipeline=bench.BENCH_PIPELINE)
            ptq4dm.lower(res.graph, mixed_bf16=base == "mixed", **opts)
            fn, args = ptq4dm.compile_step(res.graph, cpp_wrapper=cpp), (x, t, noise)
        else:
            raise SystemExit(f"unknown variant {v!r}: mixed, fp32out, bf16, pt2e, optionally with :cpp")
        fn(*args); fn(*args)
    built[v] = (fn, args)
    print(f"built {v} in {time.time() - t0:.0f}s", flush=True)
rounds = {v: [] for v in built}
order = list(built)
with torch.no_grad():
    for r in range(a.rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            fn, args = built[v]
            ts = []
            for _ in range(a.iters):
                t0 = time.perf_counter(); fn(*args); ts.append((time.perf_counter() - t0) * 1e3)
            rounds[v].append(statistics.median(ts))
print(f"{a.model} batch {b}, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}")
for v in order:
    print(f"{v:14s} {statistics.median(rounds[v]):8.2f} ms  rounds {[round(z, 2) for z in rounds[v]]}", flush=True)
