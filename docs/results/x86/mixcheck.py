"""(docs/results/x86/mixcheck.py) One step of the default model: the int8 graph with and without
int8-mixed-bf16 against the fake-quant graph it was lowered from (RMS / max deviation over the output range)."""
import copy, torch, ptq4dm
from ptq4dm.passes import NDTC
torch.set_num_threads(2); torch.manual_seed(0)
unet = ptq4dm.load_default_unet().eval()
sampler = ptq4dm.make_sampler("ddpm", variance_type="fixed_small", num_inference_steps=100)
step = ptq4dm.DiffusionStep(unet, sampler).eval()
graph = ptq4dm.capture_step(step, batch=8, dynamic_batch=True)
res = ptq4dm.quantize(step, calibration=NDTC(n=32, batch_size=32), progress=False, graph=graph, pipeline="recommended-fast")
fq = res.graph.gm
fns = {}
for mixed in ("false", "true"):
    g = copy.deepcopy(res.graph)
    info = ptq4dm.lower(g, mixed_bf16=mixed); print(mixed, info.get("mixed_bf16"), info["counts"])
    fns[mixed] = ptq4dm.compile_step(g)
x = torch.randn(step.sample_shape(8)); noise = torch.randn_like(x)
with torch.no_grad():
  for tv in (990, 500, 100, 10):
    t = torch.full((8,), tv)
    ref = fq(x, t, noise); fp = step(x, t, noise)
    for k, fn in fns.items():
        out = fn(x, t, noise)
        for i, (o, r, f) in enumerate(zip(out, ref, fp)):
            if not torch.is_tensor(o) or not o.is_floating_point(): continue
            rng = (r.max() - r.min()).item()
            print(f"t={tv} mixed={k} out{i} {o.dtype} max|int8-fq|/range {((o-r).abs().max()/rng).item():.2e} rms {((o-r).pow(2).mean().sqrt()/rng).item():.2e}   rms fq-fp {((f-r).pow(2).mean().sqrt()/rng).item():.2e}")
