"""int8-mixed-bf16, tried (2026-12-03): the lowered x86 graph compiled as is vs compiled and run under
CPU autocast(bf16) (PT2E's documented int8-mixed-bf16 recipe; the export's _assert_tensor_metadata
nodes, which pin float32, are removed first), against bf16-compile, in one process, in the order
given (repeat names to interleave). Prints the qconv / qlinear count of the generated code, the
largest x_{t-1} difference from the fake-quant graph, and ms per step.

    python docs/results/x86/mixed_bf16.py default 64 ours,ours-amp,bf16-compile,ours,ours-amp,bf16-compile
"""
import sys, copy, re, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tools"))
import bench, ptq4dm
from ptq4dm.passes import NDTC
torch.set_num_threads(2)
model, batch = sys.argv[1], int(sys.argv[2])
names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["ours", "ours-amp", "bf16-compile", "pt2e-x86-int8", "pt2e-amp"]
torch.manual_seed(0)
unet = (ptq4dm.load_default_unet() if model == "default" else ptq4dm.build_unet(model)).eval()
sampler = ptq4dm.make_sampler("ddpm", variance_type="fixed_small", num_inference_steps=1)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
dev = torch.device("cpu")
shape = step.sample_shape(batch)
g = torch.Generator().manual_seed(batch)
x = torch.randn(shape, generator=g); noise = torch.randn(shape, generator=g)
t = torch.full((batch,), int(sampler.timesteps[0]))

def amp(fn):
    def run(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*a)
    return run

ref = None
for name in names:
    torch._dynamo.reset()
    with torch.no_grad():
        if name.startswith("ours"):
            m = copy.deepcopy(step)
            graph = ptq4dm.capture_step(m, batch=max(batch, 2), device=dev, dynamic_batch=batch > 1)
            res = ptq4dm.quantize(m, calibration=NDTC(n=8, batch_size=8), progress=False, graph=graph, pipeline="recommended-fast")
            if ref is None:
                ref = res.graph(x, t, noise)[0]
            info = ptq4dm.lower(res.graph)
            if name == "ours-amp":
                gg = res.graph.graph
                for nd in list(gg.nodes):
                    if nd.op == "call_function" and nd.target is torch.ops.aten._assert_tensor_metadata.default:
                        gg.erase_node(nd)
                res.graph.gm.recompile()
            cs = ptq4dm.compile_step(res.graph)
            import contextlib
            from torch._inductor.utils import run_and_get_code
            ac = torch.autocast("cpu", dtype=torch.bfloat16) if name == "ours-amp" else contextlib.nullcontext()
            with torch.no_grad(), torch._inductor.config.patch(freezing=True), ac:
                out, code = run_and_get_code(cs._fn, x, t, noise)
            fn = amp(cs) if name == "ours-amp" else cs
            code = "\n".join(code)
                        print(name, "qconv", len(re.findall(r"qconv", code)), "qlinear", len(re.findall(r"qlinear", code)),
                  "bf16 mentions", code.count("bfloat16"), flush=True)
            d = (out[0].float() - ref).abs()
            print(name, "max |x_{t-1} - fakequant|", float(d.max()), "mean", float(d.mean()), flush=True)
        elif name == "pt2e-amp":
            fn = amp(bench.build("pt2e-x86-int8", step, batch, dev, 8)[0])
        else:
            fn, dtype, fmt = bench.build(name, step, batch, dev, 8)
            if dtype != torch.float32:
                fn_ = fn; fn = lambda a, b, c: fn_(a.to(dtype).contiguous(memory_format=fmt), b, c.to(dtype).contiguous(memory_format=fmt))
        fn(x, t, noise)
        ms = bench.time_fn(fn, (x, t, noise), dev, 2, 7)
        print(f"== {model} b{batch} {name}: {ms:.1f} ms/step", flush=True)
