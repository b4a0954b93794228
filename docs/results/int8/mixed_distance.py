"""(docs/results/int8/mixed_distance.py) How far does each int8 execution's chain land from the
fake-quant graph's, and does keeping the layers that stay float in fp32 under int8-mixed-bf16 bring
it closer? DDPM-100 chains of N samples from one seed, the recommended config (calibration N = 256,
calibration seed = SEED, the cached draw of tools/evaluate.py), then per variant the graph lowered
and compiled: fp32 (mixed_bf16=false), mixed (mixed_bf16=true), mixed:out / mixed:tail / mixed:float
(int8-mixed-bf16 with conv_out / the float layers with no int8 layer downstream / every float conv /
linear wrapped in an autocast-off region with fp32 inputs: this script's own rewrite, not a lower
option). Prints the PSNR of the whole sample set vs the fake-quant samples and vs FP, the median
per-sample PSNR, and the share of samples the digit classifier labels differently from the
fake-quant sample.

    python docs/results/int8/mixed_distance.py N SEED [variants]

Run and reading: docs/results/details.md, "How far int8-mixed-bf16 lands from the simulation"."""
import sys, copy, time, torch
sys.path.insert(0, "tools")
import ptq4dm, evaluate
from torch import fx
from ptq4dm.models.metrics import psnr
torch.set_num_threads(2)
aten = torch.ops.aten
N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 100
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["fp32", "mixed", "mixed:tail", "mixed:float"]
unet = ptq4dm.load_default_unet().eval()
sampler = ptq4dm.make_sampler("ddpm", variance_type="fixed_small", num_inference_steps=100)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
cfg = next(c for c in evaluate.CONFIGS if c.name == "recommended")
from pathlib import Path
res = evaluate.quantize_config(step, cfg, 100, 256, SEED, cache_dir=Path(".cache/calibration"))
shape = (N, *step.sample_shape(1)[1:])
with torch.no_grad():
    fp = ptq4dm.sample(step, sampler, shape, seed=SEED)
    fq = ptq4dm.sample(res.graph, sampler, shape, seed=SEED)
from ptq4dm.models.classifier import load_classifier
from ptq4dm.models.metrics import classifier_stats
net = load_classifier()
lab = lambda x: classifier_stats(net, x)["logits"].argmax(1)
lfq = lab(fq)
def per(x, ref):
    mse = ((x.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).median())
print(f"fake-quant vs FP {psnr(fq, fp):.2f} dB", flush=True)

def reaches(n, hit):
    """Whether a node downstream of n satisfies hit."""
    seen, todo = set(), [n]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                if hit(u):
                    return True
                seen.add(u)
                todo.append(u)
    return False


def wrap_fp32(graph, which):
    """The float convs / linears of a lowered graph (weights not dequantized int8 codes) in
    autocast-off regions with fp32 inputs: all ("float"), those with no conv / linear downstream
    ("out"), those with no int8 layer downstream ("tail")."""
    g = graph.graph
    layers = (aten.conv2d.default, aten.linear.default)
    is_dq = lambda m: m.op == "call_function" and "dequantize" in str(m.target)
    wrap = [n for n in g.nodes if n.op == "call_function" and n.target in layers and not is_dq(n.args[1])]
    if which == "out":
        wrap = [n for n in wrap if not reaches(n, lambda u: u.op == "call_function" and u.target in layers)]
    elif which == "tail":
        wrap = [n for n in wrap if not reaches(n, is_dq)]
    for n in wrap:
        with g.inserting_before(n):
            ctx = g.call_function(torch.amp.autocast_mode._enter_autocast, ("cpu", None, False, None))
            n.args = tuple(g.call_function(aten.to.dtype, (a, torch.float32)) if i < 3 and isinstance(a, fx.Node) else a
                           for i, a in enumerate(n.args))
        with g.inserting_after(n):
            g.call_function(torch.amp.autocast_mode._exit_autocast, (ctx,))
    graph.gm.recompile()
    return [n.name for n in wrap]


for v in variants:
    parts = v.split(":")
    gr = copy.deepcopy(res.graph)
    info = ptq4dm.lower(gr, mixed_bf16="false" if parts[0] == "fp32" else "true")
    wrapped = wrap_fp32(gr, parts[1]) if len(parts) > 1 else []
    fn = ptq4dm.compile_step(gr)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = ptq4dm.sample(fn, sampler, shape, seed=SEED)
    dt = time.perf_counter() - t0
    print(f"{v:<14} vs fake-quant {psnr(x, fq):.2f} dB  vs FP {psnr(x, fp):.2f} dB  median per-sample {per(x, fq):.2f} dB, digit differs {float((lab(x) != lfq).float().mean()):.3f}  ({dt:.1f} s incl. compile)"
          + (f"  fp32 layers: {wrapped}" if wrapped else ""), flush=True)
