"""(docs/results/w4/recon_screen.py) Variants of the reconstruct pass on one quantized graph, DDPM-100, the default
model: the pipeline up to sensitivity runs once (W4A8 recommended policy, NDTC n=256 calibration seed 31; --mix: the
<= 5 bits per weight budget), then each variant (JSON: {"rec": Reconstruct options, "nc": add noise_correct}) runs
reconstruct + bias_correct{groups=10} on a copy and reports the x_{t-1} error against FP on the calibration set
(train_err) and on a second NDTC draw (seed 99, held_err), and PSNR vs FP of 100 samples (seed 21; the FP samples
that docs/results/ddim/ablate.py caches for the same sampler and seeds). Rows: docs/results/w4/recon-screen-2026-12-05.jsonl.

    python docs/results/w4/recon_screen.py [--mix] '{"rec":{"scales":true}}' ...
"""
import copy, json, sys, time, torch
sys.path.insert(0, "tools")
import ptq4dm
from ptq4dm.ir.graph import StepGraph
from ptq4dm.passes import NDTC, QuantPolicy, DEFAULT_PIPELINE, PassContext, Reconstruct, BiasCorrect
from ptq4dm.passes.calibrate import make_calibration_set
from ptq4dm.models.loading import load_default_unet, trained_schedule
from ptq4dm.models.metrics import psnr
from ptq4dm.api import weights_hash
torch.set_num_threads(2)
unet = load_default_unet()
sampler = ptq4dm.make_sampler("ddpm", num_inference_steps=100, schedule=trained_schedule(None), variance_type="fixed_small")
step = ptq4dm.DiffusionStep(unet, sampler).eval()
pol = QuantPolicy(weight_bits=8 if "--mix" in sys.argv else 4, output_bits=16, keep_first_last_fp=True, time_path_fp=True)
res = ptq4dm.quantize(step, calibration=NDTC(n=256, seed=31), policy=pol, progress=False,
    pipeline=DEFAULT_PIPELINE + (",sensitivity{widen=4,budget=5}" if "--mix" in sys.argv else ",sensitivity{widen=4,weights=false}"), cache_dir=".cache/calibration")
cs = res.calibration_set
shape = step.sample_shape(1)[1:]
held = make_calibration_set(step, sampler, NDTC(n=256, seed=99), (1, *shape), progress=False,
                            cache_dir=__import__("pathlib").Path(".cache/calibration"), model_hash=weights_hash(unet))
xf = torch.load(".cache/ddim-ablate-fp-ddpm100-eta0.0-n100-s21.pt")
def clone(g): return StepGraph(copy.deepcopy(g.gm), g.example_inputs, dict(g.meta), g.dynamic_batch)
base = clone(res.graph)
def err(g, s):
    n = torch.randn(s.x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = g(s.x, s.t, n); b = step(s.x, s.t, n)
        a = a[0] if isinstance(a, tuple) else a; b = b[0] if isinstance(b, tuple) else b
    return float((a - b).pow(2).sum() / b.pow(2).sum())
from ptq4dm.passes import NoiseCorrect
for spec in [a for a in sys.argv[1:] if not a.startswith("--")]:
    kw = json.loads(spec)
    g = clone(base); t0 = time.time(); net = None
    ctx = PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False)
    if kw.get("rec") is not None:
        Reconstruct(**kw["rec"]).run(g, ctx); net = ctx.results["reconstruct"].get("network")
    tr, he = err(g, cs), err(g, held)
    BiasCorrect(groups=10).run(g, ctx)
    if kw.get("nc"):
        NoiseCorrect(groups=10).run(g, ctx)
    with torch.no_grad(): x = ptq4dm.sample(g, sampler, (100, *shape), seed=21).float()
    print(json.dumps(dict(spec=spec, train_err=tr, held_err=he, psnr=psnr(x, xf), sec=time.time() - t0,
          net={k: v for k, v in (net or {}).items()})), flush=True)
