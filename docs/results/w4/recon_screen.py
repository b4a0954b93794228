"""(docs/results/w4/recon_screen.py) Variants of the reconstruct pass on one quantized graph, DDPM-100, the default
model: the pipeline up to sensitivity runs once (W4A8 recommended policy, NDTC n=256 calibration seed 31; --mix: the
<= 5 bits per weight budget), then each variant (JSON: {"rec": Reconstruct options, "nc": add noise_correct, "group": G})
runs reconstruct + bias_correct{groups=10} on a copy and reports the x_{t-1} error against FP on the calibration set
(train_err) and on a second NDTC draw (seed 99, held_err), and PSNR vs FP of 100 samples (seed 21; the FP samples
that docs/results/ddim/ablate.py caches for the same sampler and seeds). Rows: docs/results/w4/recon-screen-2026-12-05.jsonl.

"group": G (2026-12-08): every 4-bit weight gets a scale per group of G consecutive weights of an output channel,
m * s_c / 16 with an integer m in 1..16 chosen by least squared error (group_screen.py's int8-exact grid: the
codes m * q stay in [-112, 112], an int8 per-channel weight of scale s_c / 16); the buffers start at that grid's
nearest rounding, and reconstruct learns the rounding (and the per-channel scale, scales=true) on it, m fixed.

    python docs/results/w4/recon_screen.py [--mix] [--calib-seed=31] '{"rec":{"scales":true}}' ...
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
CSEED = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--calib-seed=")), 31))
res = ptq4dm.quantize(step, calibration=NDTC(n=256, seed=CSEED), policy=pol, progress=False,
    pipeline=DEFAULT_PIPELINE + (",sensitivity{widen=4,budget=5}" if "--mix" in sys.argv else ",sensitivity{widen=4,weights=false}"), cache_dir=".cache/calibration")
cs = res.calibration_set
shape = step.sample_shape(1)[1:]
held = make_calibration_set(step, sampler, NDTC(n=256, seed=99), (1, *shape), progress=False,
                            cache_dir=__import__("pathlib").Path(".cache/calibration"), model_hash=weights_hash(unet))
fpf = __import__("pathlib").Path(".cache/ddim-ablate-fp-ddpm100-eta0.0-n100-s21.pt")
if not fpf.exists():   # drawn as ablate.py draws it (one batch of 100, seed 21)
    with torch.no_grad():
        torch.save(ptq4dm.sample(step, sampler, (100, *shape), seed=21).float(), fpf.with_suffix(".tmp"))
    fpf.with_suffix(".tmp").replace(fpf)
xf = torch.load(fpf)
def clone(g):   # qparams copied too: reconstruct{scales=true} replaces entries of the dict (until 2026-12-08 the
    #             variants of one run shared it, so a variant after a scales=true one started from its learned scales)
    meta = dict(g.meta); meta["qparams"] = dict(meta["qparams"])
    return StepGraph(copy.deepcopy(g.gm), g.example_inputs, meta, g.dynamic_batch)
base = clone(res.graph)
def err(g, s):
    n = torch.randn(s.x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = g(s.x, s.t, n); b = step(s.x, s.t, n)
        a = a[0] if isinstance(a, tuple) else a; b = b[0] if isinstance(b, tuple) else b
    return float((a - b).pow(2).sum() / b.pow(2).sum())
from ptq4dm.passes import NoiseCorrect
import ptq4dm.passes.reconstruct as R
from ptq4dm.passes.bias_correct import FLOAT_WEIGHT, _attr
from ptq4dm.passes.observe import QTENSOR
from ptq4dm.ir.quant import QParams
_Plain = R._Rounding
sys.path.insert(0, "docs/results/w4")
from group_screen import group_int, group_multipliers   # the grid of the 2026-12-06 screen


class GroupRounding(_Plain):
    """AdaRound on the grid m * s_c / 16 (m fixed per group): codes m * q, scale s_c / 16 (x exp(g), per channel)."""
    G = 32

    def __init__(self, w_fp, qp, towards=None, learn_scale=False):
        w = w_fp.detach().float()
        s_c = R._expand(qp.scale.detach().float(), w, qp.axis)
        self.m = group_multipliers(w, qp.scale.detach().float().reshape(-1), self.G)
        zp = R._expand(qp.zero_point.detach().float(), w, qp.axis)
        super().__init__(w_fp, QParams(s_c * self.m / 16, zp, qp.qmin, qp.qmax, None, qp.groups), towards, False)
        self.qp = qp
        self.sc = s_c / 16
        self.g = torch.zeros_like(self.sc).requires_grad_(True) if learn_scale else None

    def scale(self):
        return self.sc if self.g is None else self.sc * torch.exp(self.g)

    def codes(self, h=None):
        return super().codes(h) * self.m


def rounding_for(g):
    def make(w_fp, qp, towards=None, learn_scale=False):
        if qp.qmax != 7 or qp.axis is None:   # 4-bit per-channel weights only
            return _Plain(w_fp, qp, towards, learn_scale)
        GroupRounding.G = g
        return GroupRounding(w_fp, qp, towards, learn_scale)
    return make


def group_nearest(gr, g):
    """The buffers of the 4-bit weights at the group grid's nearest rounding; how many weights changed."""
    qparams, changed = gr.meta["qparams"], 0
    for n in gr.graph.nodes:
        if n.op != "get_attr" or FLOAT_WEIGHT not in n.meta:
            continue
        qp = qparams[n.meta[QTENSOR].key]
        if qp.qmax != 7 or qp.axis is None:
            continue
        wf = _attr(gr.gm, n.meta[FLOAT_WEIGHT]).detach().float()
        with torch.no_grad():
            buf = _attr(gr.gm, str(n.target))
            buf.copy_(group_int(wf, qp.scale.float().reshape(-1), g).to(buf.dtype))
        changed += 1
    return changed


for spec in [a for a in sys.argv[1:] if not a.startswith("--")]:
    kw = json.loads(spec)
    g = clone(base); t0 = time.time(); net = None
    ctx = PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False)
    R._Rounding = rounding_for(kw["group"]) if kw.get("group") else _Plain
    if kw.get("group"):
        group_nearest(g, kw["group"])
    if kw.get("rec") is not None:
        Reconstruct(**kw["rec"]).run(g, ctx); net = ctx.results["reconstruct"].get("network")
    R._Rounding = _Plain
    tr, he = err(g, cs), err(g, held)
    BiasCorrect(groups=10).run(g, ctx)
    if kw.get("nc"):
        NoiseCorrect(groups=10).run(g, ctx)
    with torch.no_grad(): x = ptq4dm.sample(g, sampler, (100, *shape), seed=21).float()
    print(json.dumps(dict(spec=spec, calib_seed=CSEED, mix="--mix" in sys.argv, train_err=tr, held_err=he, psnr=psnr(x, xf), sec=time.time() - t0,
          net={k: v for k, v in (net or {}).items()})), flush=True)
