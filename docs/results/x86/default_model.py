"""The default model, W8A8 + bias_correct{groups=10}, lowered to x86 and compiled, against the
fake-quant graph (mean output, batch 64, three timesteps), beside the fake-quant graph compiled in
float (float rounding alone), then with 7-bit weights against its own eager q/dq graph.
(docs/results/details.md, "Lowering"; the auto weight bits of the CPU it runs on)

    python docs/results/x86/default_model.py [8 | 7]     # weight bits (default: auto)
"""
import copy, sys
import torch
torch.set_num_threads(1)
import ptq4dm
from ptq4dm.models.loading import load_default_unet
from ptq4dm.passes import NDTC
from ptq4dm.ir.graph import StepGraph
unet = load_default_unet()
step = ptq4dm.DiffusionStep(unet, ptq4dm.make_sampler("ddim", num_inference_steps=20)).eval()
res = ptq4dm.quantize(step, calibration=NDTC(n=32, batch_size=32), progress=False, pipeline=ptq4dm.DEFAULT_PIPELINE+",bias_correct{groups=10}")
fq = copy.deepcopy(res.graph.gm)
ptq4dm.lower(res.graph, weight_bits=int(sys.argv[1]) if len(sys.argv) > 1 else "auto")
B=64; g = torch.Generator().manual_seed(1)
with torch.no_grad():
    cq = ptq4dm.compile_step(res.graph)
    cf = torch.compile(fq)
    for tv in (900, 500, 50):
        x = torch.randn(B, 1, 28, 28, generator=g); t = torch.full((B,), tv); nz = torch.randn(B,1,28,28, generator=g)
        ref = fq(x, t, nz)[1]; a = cq(x, t, nz)[1]; b = cf(x, t, nz)[1]
        for name, o in (("int8-compiled", a), ("fq-compiled", b)):
            d = (o - ref).abs()
            print(tv, name, "max", float(d.max()), "mean", float(d.mean()), "frac>1e-3", float((d > 1e-3).float().mean()))
    eag = res.graph.gm
    for tv in (900, 500, 50):
        x = torch.randn(B, 1, 28, 28, generator=g); t = torch.full((B,), tv); nz = torch.randn(B,1,28,28, generator=g)
        ref = eag(x, t, nz)[1]; a = cq(x, t, nz)[1]; f = fq(x, t, nz)[1]
        d = (a - ref).abs(); d2 = (ref - f).abs()
        print(tv, "int8-compiled vs eager dq", float(d.max()), float(d.mean()), "| eager-dq(W7) vs fq(W8)", float(d2.max()), float(d2.mean()))
