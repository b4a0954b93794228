"""(docs/results/x86/prof_step.py) Per-op profile (torch.profiler, Inductor kernel profiling on) of a
model's step: ours (recommended-fast, lowered, Python wrapper) and bf16 compile, 20 calls each.

    python docs/results/x86/prof_step.py [MODEL] BATCH mixed|fp32 [KEY=VALUE ...]

MODEL: default (the embedded model, the default) or a bench model (ddpm-cifar10); KEY=VALUE: lower options.
"""
import sys, copy, time, torch
sys.path.insert(0, "tools")
import ptq4dm, bench
from ptq4dm.passes import NDTC, QuantPolicy, PAPER_PIPELINE
torch.set_num_threads(2); torch.manual_seed(0)
torch._inductor.config.cpp.enable_kernel_profile = True
argv = sys.argv[1:]
model = "default" if argv[0].isdigit() else argv.pop(0)
b = int(argv[0]); mixed = argv[1] == "mixed"
opts = {k: {"true": True, "false": False}.get(v, v) for k, v in (kv.split("=", 1) for kv in argv[2:])}
unet = (ptq4dm.load_default_unet() if model == "default" else ptq4dm.build_unet(model)).eval()
learned = unet.config.out_channels == 2 * unet.config.in_channels
sampler = ptq4dm.make_sampler("ddpm", variance_type="learned_range" if learned else "fixed_small", num_inference_steps=100)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
POL = QuantPolicy(output_bits=16, keep_first_last_fp=True, time_path_fp=True)
PIPE = PAPER_PIPELINE + ",sensitivity{widen=4,weights=false},bias_correct{groups=10}"
shape = step.sample_shape(b); g = torch.Generator().manual_seed(b)
x = torch.randn(shape, generator=g); noise = torch.randn(shape, generator=g)
t = torch.full((b,), int(sampler.timesteps[0]))
m = copy.deepcopy(step)
graph = ptq4dm.capture_step(m, batch=max(b, 2) if b > 1 else 1, dynamic_batch=b > 1)
res = ptq4dm.quantize(m, calibration=NDTC(n=8, batch_size=8), progress=False, graph=graph, pipeline=PIPE, policy=POL)
info = ptq4dm.lower(res.graph, mixed_bf16=mixed, **opts)
print(info["counts"], "kept", len(info["kept"]), flush=True)
fn = ptq4dm.compile_step(res.graph, cpp_wrapper=False)
bf, dt, fmt = bench.build("bf16-compile", step, b, torch.device("cpu"), 8)
xb, nb = x.to(dt).contiguous(memory_format=fmt), noise.to(dt).contiguous(memory_format=fmt)
with torch.no_grad():
    for _ in range(3): fn(x, t, noise); bf(xb, t, nb)
    for name, f, a in (("ours", fn, (x, t, noise)), ("bf16", bf, (xb, t, nb))):
        with torch.profiler.profile() as p:
            for _ in range(20): f(*a)
        print(name); print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=110))
        cats = {}   # ms per step by kind: oneDNN / aten externs, Inductor's kernels with and without a GroupNorm
        for e in p.key_averages():
            k = e.key
            kind = ("kernel: group_norm" if "group_norm" in k else "kernel: other") if "cpp_fused" in k else \
                   (k if k.startswith(("onednn::", "mkldnn::", "aten::bmm", "aten::_scaled_dot", "aten::mm", "aten::addmm")) else "rest")
            cats[kind] = cats.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / 20
        print(name, "ms per step by kind:", {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}, flush=True)
if len(sys.argv) > 1 and __import__("os").environ.get("PROF_CODE"):   # PROF_CODE=path: ours' generated code
    from ptq4dm.backends.x86 import compiled_code
    open(__import__("os").environ["PROF_CODE"], "w").write(compiled_code(fn, x, t, noise))
