"""(docs/results/w4/chain_screen.py) A loss over short unrolled chains for the 4-bit step (issue 26), a screen.

The hand-off probe (details.md, "Where the chain loses the samples") found the 4-bit samples lost in the noisy
quarter of the chain, and every layer-wise loss (weighted by the chain or not) misranked the chain. Here the
per-channel gains of the 4-bit weights (a factor exp(a) on each output channel's learned scale: the codes stay, so
the result is still exactly a 4-bit per-channel weight) are fitted against the float chain itself: from float
chain states x_k at steps k drawn in START (the noisy steps), the quantized step runs K steps with the float chain's
noise, and the loss is the squared distance of its states from the float chain's over those K steps. Only the gains
learn (one per output channel, about 1e4 unknowns against the network phase's 1e6 binary ones that overfit).

DDPM-100, the default model, W4A8 recommended policy, NDTC n=256 (--calib-seed), reconstruct{scales=true,n=0,
refit=float} + bias_correct{groups=10} (issue 26's rows), then per variant (JSON: start, K, iters, lr, chains,
batch, seed; {} is the graph without the chain phase) the chain phase on a copy and PSNR vs FP of 100 samples from
two sampling seeds (21, 500); the training chains come from seed 7000 + calib seed (disjoint from both).
Rows appended to docs/results/w4/chain-screen-<date>.jsonl. A variant {"random": r, "seed": s} instead multiplies
every 4-bit per-channel scale by exp(a), a ~ N(0, r^2): how far the samples move for a perturbation the size of
what the chain phase learns (the screen's noise floor). {"pass": {...}} runs the pass that landed from this screen,
passes/chain_gains.py, with those options (it holds a quarter of the chains out and keeps its gains only if their
loss falls; the rows of the in-script "chain phase" above trained on all 64 chains).

    python docs/results/w4/chain_screen.py --calib-seed 31 '{}' '{"start":[0,25],"K":4}'
"""
import argparse, copy, datetime, json, pathlib, sys, time
import torch
sys.path.insert(0, "docs/results/w4")
from screen_setup import ddpm100_w4  # noqa: E402  (puts tools/ on the path)
import ptq4dm  # noqa: E402
from ptq4dm.ir.graph import StepGraph  # noqa: E402
from ptq4dm.ir.quant import QParams, _expand  # noqa: E402
from ptq4dm.models.metrics import psnr  # noqa: E402
from ptq4dm.passes import NDTC, DEFAULT_PIPELINE, PassContext, Reconstruct, BiasCorrect, ChainGains  # noqa: E402
from ptq4dm.passes.bias_correct import FLOAT_WEIGHT, _attr  # noqa: E402
from ptq4dm.passes.observe import QTENSOR  # noqa: E402
from ptq4dm.passes.reconstruct import FQ  # noqa: E402
from torch import fx  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("variants", nargs="+")
ap.add_argument("--calib-seed", type=int, default=31)
ap.add_argument("--calib-n", type=int, default=256)
ap.add_argument("--sample-seeds", default="21,500")
ap.add_argument("--samples", type=int, default=100)
ap.add_argument("--out", default=f"docs/results/w4/chain-screen-{datetime.date.today()}.jsonl")
args = ap.parse_args()
unet, sampler, step, shape, policy, cache = ddpm100_w4()
sseeds = [int(s) for s in args.sample_seeds.split(",")]
with torch.no_grad():
    ref = {s: ptq4dm.sample(step, sampler, (args.samples, *shape), seed=s).float() for s in sseeds}
t0 = time.time()
res = ptq4dm.quantize(step, calibration=NDTC(n=args.calib_n, seed=args.calib_seed), policy=policy, progress=False,
                      cache_dir=cache, pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=4,weights=false}")
cs = res.calibration_set
g0 = res.graph
base_file = pathlib.Path(f".cache/chain-screen-base-c{args.calib_seed}-n{args.calib_n}.pt")
wnames = [str(n.target) for n in g0.graph.nodes if n.op == "get_attr" and FLOAT_WEIGHT in n.meta]
ctx = PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False)
if base_file.exists():   # the reconstructed weights and scales of an earlier run on the same calibration draw
    bufs, qps = torch.load(base_file, weights_only=False)
    with torch.no_grad():
        for k, v in bufs.items():
            _attr(g0.gm, k).copy_(v)
    g0.meta["qparams"].update(qps)
else:
    Reconstruct(scales=True, n=0, refit="float").run(g0, ctx)
    torch.save(({k: _attr(g0.gm, k).detach().clone() for k in wnames}, dict(g0.meta["qparams"])),
               base_file.with_suffix(".tmp"))
    base_file.with_suffix(".tmp").replace(base_file)
BiasCorrect(groups=10).run(g0, PassContext(options={"calibration_set": cs, "fp_step": step}, progress=False))
base_s = time.time() - t0
print(f"base graph: {base_s:.0f} s", flush=True)


def clone(g):
    meta = dict(g.meta)
    meta["qparams"] = copy.deepcopy(dict(meta["qparams"]))
    return StepGraph(copy.deepcopy(g.gm), g.example_inputs, meta, g.dynamic_batch)


def float_chains(m: int, seed: int):
    """m float chains from seed: their states (S + 1, m, ...) (index k: the input of step k) and noise (S, m, ...)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((m, *shape), generator=gen)
    xs, ns = [x], []
    with torch.no_grad():
        for t_val in sampler.timesteps.tolist():
            t = torch.full((m,), t_val, dtype=torch.long)
            n = torch.randn((m, *shape), generator=gen)
            x = step(x, t, n)[0]
            xs.append(x)
            ns.append(n)
    return torch.stack(xs), torch.stack(ns)


def random_gains(g, random, seed=0):
    """The screen's noise floor: every 4-bit weight's per-channel scale times exp(a), a ~ N(0, random^2) (seeded);
    the codes stay, as in the chain phase."""
    qparams, gen, moved = g.meta["qparams"], torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for n in g.graph.nodes:
            if n.op != "get_attr" or FLOAT_WEIGHT not in n.meta:
                continue
            qp = qparams[n.meta[QTENSOR].key]
            if qp.qmax != 7 or qp.axis is None:
                continue
            buf = _attr(g.gm, str(n.target))
            a = torch.randn(buf.shape[qp.axis], generator=gen) * random
            buf.copy_(buf * _expand(torch.exp(a), buf, qp.axis))
            qparams[n.meta[QTENSOR].key] = QParams(qp.scale * torch.exp(a).reshape(qp.scale.shape), qp.zero_point,
                                                   qp.qmin, qp.qmax, qp.axis, qp.groups)
            moved.append(a)
    a = torch.cat(moved)
    return {"gain_abs_mean": float(a.abs().mean()), "gain_abs_max": float(a.abs().max()), "gains": int(a.numel())}


def chain_phase(g, start=(0, 25), K=4, iters=200, lr=1e-3, chains=64, batch=16, seed=0):
    nodes = list(g.graph.nodes)
    out = next(n for n in nodes if n.op == "output")
    prev = out.args[0][0]
    places = [n for n in nodes if n.op == "placeholder"]
    acts = {n for n in nodes if n.op == "call_function" and n.target is FQ and QTENSOR in n.meta}
    qparams = g.meta["qparams"]
    weights = [n for n in nodes if n.op == "get_attr" and FLOAT_WEIGHT in n.meta
               and qparams[n.meta[QTENSOR].key].qmax == 7 and qparams[n.meta[QTENSOR].key].axis is not None]
    consts = {n: _attr(g.gm, str(n.target)).detach() for n in nodes if n.op == "get_attr"}
    gains = {w: torch.zeros(consts[w].shape[qparams[w.meta[QTENSOR].key].axis], requires_grad=True) for w in weights}
    body = [n for n in nodes if n.op != "output"]

    def gained(w):
        return consts[w] * _expand(torch.exp(gains[w]), consts[w], qparams[w.meta[QTENSOR].key].axis)

    def run(x, t, n):   # reconstruct's _interpret, with the step's call_module / call_method nodes too
        env = dict(zip(places, (x, t, n)))
        look = lambda a: env[a]
        for v in body:
            if v.op == "placeholder":
                continue
            if v.op == "get_attr":
                env[v] = gained(v) if v in gains else consts[v]
                continue
            a_, k_ = fx.node.map_arg(v.args, look), fx.node.map_arg(v.kwargs, look)
            if v.op == "call_module":
                env[v] = g.gm.get_submodule(v.target)(*a_, **k_)
            elif v.op == "call_method":
                env[v] = getattr(a_[0], v.target)(*a_[1:], **k_)
            elif v in acts:   # quantize forward, identity backward
                env[v] = a_[0] + (v.target(*a_, **k_) - a_[0]).detach()
            else:
                env[v] = v.target(*a_, **k_)
        return env[prev]

    xs, ns = float_chains(chains, 7000 + args.calib_seed + seed)
    ts = sampler.timesteps
    S = len(ts)
    lo, hi = start
    hi = min(hi, S - K + 1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(list(gains.values()), lr=lr)
    losses = []
    for i in range(iters):
        c = torch.randint(0, chains, (batch,), generator=gen)
        k = torch.randint(lo, hi, (batch,), generator=gen)
        x = xs[k, c]
        loss = 0.0
        for j in range(K):
            t = ts[k + j].long()
            x = run(x, t, ns[k + j, c])
            tgt = xs[k + j + 1, c]
            loss = loss + (x - tgt).pow(2).mean() / K
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if i % 25 == 0 or i == iters - 1:
            print(f"  iter {i}: loss {losses[-1]:.4e}", flush=True)
    with torch.no_grad():   # the gains into the buffers and the scales: the codes stay
        for w in weights:
            buf = _attr(g.gm, str(w.target))
            buf.copy_(gained(w).to(buf.dtype))
            qp = qparams[w.meta[QTENSOR].key]
            qparams[w.meta[QTENSOR].key] = QParams(qp.scale * torch.exp(gains[w]).reshape(qp.scale.shape).to(qp.scale.dtype),
                                                   qp.zero_point, qp.qmin, qp.qmax, qp.axis, qp.groups)
    a = torch.cat([v.detach() for v in gains.values()])
    tenth = max(iters // 10, 1)
    return {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "gain_abs_mean": float(a.abs().mean()), "gain_abs_max": float(a.abs().max()), "gains": int(a.numel()),
            "weights": len(weights)}


for spec in args.variants:
    kw = json.loads(spec)
    g, t1 = clone(g0), time.time()
    if "pass" in kw:   # the pass that landed (passes/chain_gains.py) with these options
        c2 = PassContext(options={"fp_step": step}, progress=False)
        ChainGains(**kw["pass"]).run(g, c2)
        info = c2.results["chain_gains"]
    else:
        info = (random_gains(g, **kw) if "random" in kw else chain_phase(g, **kw)) if kw else {}
    sec = time.time() - t1
    with torch.no_grad():
        p = {str(s): float(psnr(ptq4dm.sample(g, sampler, (args.samples, *shape), seed=s).float(), ref[s]))
             for s in sseeds}
    row = dict(spec=spec, calib_seed=args.calib_seed, calib_n=args.calib_n, psnr=p, chain_s=round(sec, 1),
               base_s=round(base_s, 1), info=info, date=str(datetime.date.today()))
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
