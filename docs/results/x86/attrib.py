"""(docs/results/x86/attrib.py) Which part of the shipped pipeline costs time in the compiled int8 step? Interleaved timing,
one run: ours (recommended-fast) and variants with one feature removed or a lower option set
(``full:split16=false``, ``full:mixed_bf16=false``), pt2e and bf16 anchors."""
import sys, copy, json, time, statistics, argparse, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tools"))
import ptq4dm, bench
from ptq4dm.passes import NDTC, QuantPolicy, PAPER_PIPELINE
ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("batch", type=int)
ap.add_argument("--variants", default="full,no-bc,no-widen,paper,pt2e,bf16")
ap.add_argument("--rounds", type=int, default=5); ap.add_argument("--iters", type=int, default=5)
ap.add_argument("--calib-n", type=int, default=32); ap.add_argument("--steps", type=int, default=100); ap.add_argument("--out", default=None)
a = ap.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
unet = (ptq4dm.load_default_unet() if a.model == "default" else ptq4dm.build_unet(a.model)).eval()
sampler = ptq4dm.make_sampler("ddpm", variance_type="learned_range" if unet.config.out_channels == 2 * unet.config.in_channels else "fixed_small", num_inference_steps=a.steps)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
POL = QuantPolicy(output_bits=16, keep_first_last_fp=True, time_path_fp=True)
PIPES = {"full": PAPER_PIPELINE + ",sensitivity{widen=4,weights=false},bias_correct{groups=10}",
         "no-bc": PAPER_PIPELINE + ",sensitivity{widen=4,weights=false}",
         "no-widen": PAPER_PIPELINE + ",bias_correct{groups=10}",
         "paper": PAPER_PIPELINE}
dev = torch.device("cpu")
b = a.batch
shape = step.sample_shape(b)
g = torch.Generator().manual_seed(b)
x = torch.randn(shape, generator=g); noise = torch.randn(shape, generator=g)
t = torch.full((b,), int(sampler.timesteps[0]))
built = {}
for v in a.variants.split(","):
    t0 = time.time()
    extra = v.split(":")[1:]; base = v.split(":")[0]
    with torch.no_grad():
        if base == "pt2e":
            fn = bench.build_pt2e(step, b, dev, a.calib_n); dt, fmt = torch.float32, torch.contiguous_format
        elif base == "bf16":
            fn, dt, fmt = bench.build("bf16-compile", step, b, dev, a.calib_n)
        else:
            m = copy.deepcopy(step)
            graph = ptq4dm.capture_step(m, batch=max(b, 2) if b > 1 else 1, dynamic_batch=b > 1)
            res = ptq4dm.quantize(m, calibration=NDTC(n=a.calib_n, batch_size=a.calib_n), progress=False, graph=graph,
                                  pipeline=PIPES[base], policy=POL)
            opts = dict(kv.split("=") for kv in extra)   # lower options, e.g. full:mixed_bf16=false
            opts = {k: (v2 == "true") if v2 in ("true", "false") else int(v2) for k, v2 in opts.items()}
            info = ptq4dm.lower(res.graph, **opts)
            print(v, info["counts"], "kept", len(info["kept"]), "folded", info.get("folded_tables"),
                  "mixed_bf16", info.get("mixed_bf16"), flush=True)
            fn = ptq4dm.compile_step(res.graph)
            dt, fmt = torch.float32, torch.contiguous_format
        args = (x.to(dt).contiguous(memory_format=fmt), t, noise.to(dt).contiguous(memory_format=fmt))
        fn(*args)
    built[v] = (fn, args)
    print(f"built {v} in {time.time()-t0:.0f}s", flush=True)
rounds = {v: [] for v in built}
order = list(built)
with torch.no_grad():
    for v in order:
        for _ in range(2): built[v][0](*built[v][1])
    for r in range(a.rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            fn, args = built[v]
            ts = []
            for _ in range(a.iters):
                t0 = time.perf_counter(); fn(*args); ts.append((time.perf_counter() - t0) * 1e3)
            rounds[v].append(statistics.median(ts))
res = {v: statistics.median(r) for v, r in rounds.items()}
for v in order:
    print(f"{v:28s} {res[v]:8.1f} ms   rounds {[round(z,1) for z in rounds[v]]}")
if a.out:
    json.dump({"model": a.model, "batch": b, "ms": res, "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M")}, open(a.out, "w"), indent=1)
