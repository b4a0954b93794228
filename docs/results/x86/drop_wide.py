"""(docs/results/x86/drop_wide.py) What the 16-bit fake-quant in front of the float layers costs on an AMX CPU:
the default model's step, ours (recommended-fast, lowered with its defaults, compiled with the C++ wrapper)
("fq": lowered with drop_wide=false, the 16-bit fake-quant in every call) against variants where the 4 float layers' 16-bit fake-quant nodes are replaced by a clamp ("clamp") or
removed ("drop"), and bf16 compile ("bf16", "bf16cpp": with the C++ wrapper); built first, then timed in
rotating rounds. Logs beside this file: drop-wide-*.log (drop-wide-widex256.log: "ours" there was
today's "fq", run before drop_wide=bf16 became the default).

    python docs/results/x86/drop_wide.py BATCH VARIANTS ROUNDS ITERS   # e.g. 256 ours,clamp,drop,bf16,bf16cpp 5 5
"""
import sys, copy, time, statistics, torch
sys.path.insert(0, "tools")   # run from the repository root
import ptq4dm, bench
from ptq4dm.passes import NDTC
aten = torch.ops.aten
torch.set_num_threads(2); torch.manual_seed(0)
b = int(sys.argv[1]); variants = sys.argv[2].split(","); rounds = int(sys.argv[3]); iters = int(sys.argv[4])
unet = ptq4dm.load_default_unet().eval()
sampler = ptq4dm.make_sampler("ddpm", variance_type="fixed_small", num_inference_steps=100)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
shape = step.sample_shape(b); g = torch.Generator().manual_seed(b)
x = torch.randn(shape, generator=g); noise = torch.randn(shape, generator=g)
t = torch.full((b,), int(sampler.timesteps[0]))
def wide(gm, mode):
    FQ = torch.ops.ptq4dm.fake_quant.default
    n_done = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is FQ and n.args[3] == -32768 and all(u.target is aten.conv2d.default for u in n.users):
            s = float(getattr(gm, n.args[1].target)); z = float(getattr(gm, n.args[2].target))
            if mode == "drop":
                n.replace_all_uses_with(n.args[0])
            else:
                with gm.graph.inserting_before(n):
                    c = gm.graph.call_function(aten.clamp.default, (n.args[0], (-32768 - z) * s, (32767 - z) * s))
                c.meta.update(n.meta); n.replace_all_uses_with(c)
            gm.graph.erase_node(n); n_done += 1
    gm.graph.eliminate_dead_code(); gm.recompile(); print(mode, n_done)
built = {}
with torch.no_grad():
    for v in variants:
        if v.startswith("bf16"):
            fn, dt, fmt = bench.build("bf16-compile-cpp" if v == "bf16cpp" else "bf16-compile", step, b, torch.device("cpu"), 8)
            args = (x.to(dt).contiguous(memory_format=fmt), t, noise.to(dt).contiguous(memory_format=fmt))
        else:
            m = copy.deepcopy(step)
            graph = ptq4dm.capture_step(m, batch=max(b, 2), dynamic_batch=True)
            res = ptq4dm.quantize(m, calibration=NDTC(n=8, batch_size=8), progress=False, graph=graph, pipeline="recommended-fast")
            # ours: the defaults (drop_wide=bf16); fq: drop_wide=false (the 16-bit fake-quant in every call,
            # the default before 2026-12-06); clamp / drop: that graph with the fake-quant replaced / removed
            ptq4dm.lower(res.graph, **({} if v == "ours" else {"drop_wide": False}))
            if v in ("clamp", "drop"): wide(res.graph.gm, v)
            fn, args = ptq4dm.compile_step(res.graph), (x, t, noise)
        fn(*args); fn(*args); built[v] = (fn, args); print("built", v, flush=True)
    rs = {v: [] for v in built}; order = list(built)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            fn, args = built[v]; t0 = time.perf_counter()
            for _ in range(iters): fn(*args)
            rs[v].append((time.perf_counter() - t0) / iters * 1000)
for v in built: print(f"{v:10s} {statistics.median(rs[v]):8.2f} ms  {[round(a,1) for a in rs[v]]}")
