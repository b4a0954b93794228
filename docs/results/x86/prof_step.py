"""(docs/results/x86/prof_step.py) Per-op profile (torch.profiler, Inductor kernel profiling on) of the default
model's step: ours (recommended-fast, lowered, Python wrapper) and bf16 compile, 20 calls each.

    python docs/results/x86/prof_step.py BATCH mixed|fp32
"""
import sys, copy, time, torch
sys.path.insert(0, "tools")
import ptq4dm, bench
from ptq4dm.passes import NDTC, QuantPolicy, PAPER_PIPELINE
torch.set_num_threads(2); torch.manual_seed(0)
torch._inductor.config.cpp.enable_kernel_profile = True
b = int(sys.argv[1]); mixed = sys.argv[2] == "mixed"
unet = ptq4dm.load_default_unet().eval()
sampler = ptq4dm.make_sampler("ddpm", variance_type="fixed_small", num_inference_steps=100)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
POL = QuantPolicy(output_bits=16, keep_first_last_fp=True, time_path_fp=True)
PIPE = PAPER_PIPELINE + ",sensitivity{widen=4,weights=false},bias_correct{groups=10}"
shape = step.sample_shape(b); g = torch.Generator().manual_seed(b)
x = torch.randn(shape, generator=g); noise = torch.randn(shape, generator=g)
t = torch.full((b,), int(sampler.timesteps[0]))
m = copy.deepcopy(step)
graph = ptq4dm.capture_step(m, batch=max(b, 2) if b > 1 else 1, dynamic_batch=b > 1)
res = ptq4dm.quantize(m, calibration=NDTC(n=8, batch_size=8), progress=False, graph=graph, pipeline=PIPE, policy=POL)
info = ptq4dm.lower(res.graph, mixed_bf16=mixed)
fn = ptq4dm.compile_step(res.graph, cpp_wrapper=False)
bf, dt, fmt = bench.build("bf16-compile", step, b, torch.device("cpu"), 8)
xb, nb = x.to(dt).contiguous(memory_format=fmt), noise.to(dt).contiguous(memory_format=fmt)
with torch.no_grad():
    for _ in range(3): fn(x, t, noise); bf(xb, t, nb)
    for name, f, a in (("ours", fn, (x, t, noise)), ("bf16", bf, (xb, t, nb))):
        with torch.profiler.profile() as p:
            for _ in range(20): f(*a)
        print(name); print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
