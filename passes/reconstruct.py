"""reconstruct: learned rounding of conv / linear weights against their float outputs (AdaRound).

reads:  the fake-quantized graph (``fakequant``'s output, before ``bias_correct``); the float
        weights (``meta['ptq4dm.float_weight']``); ``ctx.options['calibration_set']``
writes: the fake-quantized weight buffers (the same grid and qparams, other roundings), so that
        the artifact stores and ``lower`` packs the learned codes; ``ctx.results['reconstruct']``:
        per layer the output error before / after and the share of codes that moved.

Rounding to nearest minimises each weight's own error, not the layer output's. AdaRound (Nagel
et al., 2020) learns, per weight, whether to round down or up: ``w = s * clamp(floor(w / s) + h(V)
+ z, qmin, qmax) - z * s`` with ``h`` a rectified sigmoid, ``V`` trained with Adam on
``||layer(x_q; w) - layer_fp(x_fp)||^2 + reg * sum(1 - |2 h(V) - 1|^beta)``, ``beta`` annealed
from 20 to 2 after a warm-up so that ``h`` ends at 0 or 1. As in Q-Diffusion / BRECQ the inputs
``x_q`` come from the already-quantized model (every quantizer on, the layers before this one
already reconstructed) and the targets from the float model on the same calibration samples, so
a layer also absorbs the error its quantized inputs bring. Layers go in graph order; this is the
layer-wise form (BRECQ's block-wise form reconstructs a whole resnet block's output at once:
not built).

Memory: one layer at a time. Its quantized inputs and float outputs on the ``n`` calibration
samples are recomputed by running the graph up to that layer (nothing is cached on disk), so
memory is two activations of one layer over ``n`` samples (about 100 MB for the default model at
n = 256). Seeded and deterministic (the minibatch order comes from ``seed``). Inside a process
group every rank runs the same reconstruction (the same samples and seed: the same result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import StepGraph
from ptq4dm.ir.quant import _expand

from .base import PassContext, register_pass
from .bias_correct import FLOAT_WEIGHT, _attr
from .observe import QTENSOR

aten = torch.ops.aten
FQ = torch.ops.ptq4dm.fake_quant.default
LAYERS = {aten.conv2d.default, aten.linear.default}
ZETA, GAMMA = 1.1, -0.1   # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly



class _Stop(Exception):
    pass


class _Probe(fx.Interpreter):
    """Runs the graph up to ``layer`` and returns what it needs: in quantized mode the layer's
    evaluated arguments (its input after its quantizer, the bias, ...), in float mode (every
    fake-quant bypassed, every weight float) the layer's output."""

    def __init__(self, gm, acts: set, floats: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.acts, self.floats = acts, floats
        self.layer, self.quantized, self.got = None, True, None

    def run_node(self, n):
        if not self.quantized:
            if n in self.acts:
                return self.env[n.args[0]]
            if n in self.floats:
                return self.floats[n]
        if n is self.layer and self.quantized:
            self.got = self.fetch_args_kwargs_from_env(n)[0]
            raise _Stop
        out = super().run_node(n)
        if n is self.layer:
            self.got = out
            raise _Stop
        return out

    def probe(self, layer, quantized: bool, *inputs):
        self.layer, self.quantized, self.got = layer, quantized, None
        try:
            self.run(*inputs)
        except _Stop:
            pass
        finally:
            self.env.clear()
        return self.got


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


@register_pass
@dataclass
class Reconstruct:
    name = "reconstruct"
    reads = "fake-quantized graph (before bias_correct); float weights; ctx.options['calibration_set']"
    writes = "fake-quantized weight buffers (learned rounding, same qparams); ctx.results['reconstruct']"
    preserves_semantics = False

    iters: int = 300        # Adam steps per layer
    batch_size: int = 32    # calibration samples per step
    n: int = 256            # calibration samples used (evenly spaced over the set; 0: all)
    lr: float = 1e-2        # Adam's step on V (AdaRound: 1e-3 over 10-20k steps; fewer steps here)
    reg: float = 0.01       # weight of the rounding regulariser (AdaRound / Q-Diffusion)
    warmup: float = 0.2     # share of the steps without the regulariser
    beta_start: float = 20.0  # the regulariser's exponent, annealed linearly after the warm-up ...
    beta_end: float = 2.0     # ... to this
    min_bits: int = 0       # only weights of at most this many bits (0: all quantized weights)
    seed: int = 0

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        cs = ctx.options.get("calibration_set")
        if cs is None:
            raise ValueError("reconstruct needs the calibration set: run it after 'calibrate' and 'fakequant' in the "
                             "same pipeline (e.g. '...,calibrate,solve,fakequant,reconstruct,bias_correct')")
        if graph.meta.get("bias_corrected"):
            raise ValueError("reconstruct must run before bias_correct (the corrected bias is fitted to the final "
                             "weights): put it between 'fakequant' and 'bias_correct'")
        if self.iters < 1 or self.batch_size < 1 or self.n < 0 or not 0 <= self.warmup < 1 or self.lr <= 0:
            raise ValueError(f"reconstruct: iters and batch_size must be >= 1, n >= 0, warmup in [0, 1) and lr > 0; "
                             f"got iters={self.iters}, batch_size={self.batch_size}, n={self.n}, "
                             f"warmup={self.warmup}, lr={self.lr}")
        gm, qparams = graph.gm, graph.meta["qparams"]
        acts = {n for n in graph.graph.nodes if n.op == "call_function" and n.target is FQ and QTENSOR in n.meta}
        wq = [n for n in graph.graph.nodes if n.op == "get_attr" and FLOAT_WEIGHT in n.meta]
        if not wq:
            raise ValueError("reconstruct found no fake-quantized weights: run 'fakequant' before it")
        floats = {n: _attr(gm, n.meta[FLOAT_WEIGHT]) for n in wq}
        layers = []
        for w in wq:
            qp = qparams[w.meta[QTENSOR].key]
            bits = (qp.qmax - qp.qmin).bit_length()
            if self.min_bits and bits > self.min_bits:
                continue
            for u in w.users:
                if u.op == "call_function" and u.target in LAYERS and u.args[1] is w:
                    layers.append((u, w))
        if not layers:
            raise ValueError(f"reconstruct: no conv / linear reads a quantized weight of at most {self.min_bits} bits")
        order = {n: i for i, n in enumerate(graph.graph.nodes)}
        layers.sort(key=lambda lw: order[lw[0]])

        total = cs.x.shape[0]
        idx = (torch.arange(total) if not self.n or self.n >= total
               else torch.linspace(0, total - 1, self.n).round().long().unique())
        device = graph.example_inputs[0].device
        chunk = 64 if graph.dynamic_batch else int(graph.example_inputs[0].shape[0])
        noise = torch.randn((idx.numel(), *cs.x.shape[1:]), generator=torch.Generator().manual_seed(self.seed))
        data = [(cs.x[idx[i:i + chunk]].to(device), cs.t[idx[i:i + chunk]].to(device), noise[i:i + chunk].to(device))
                for i in range(0, idx.numel(), chunk)]
        if not graph.dynamic_batch:
            data = [d for d in data if d[0].shape[0] == chunk]
        probe = _Probe(gm, acts, floats)
        gen = torch.Generator().manual_seed(self.seed)
        it = layers
        if ctx.progress:
            from tqdm import tqdm

            it = tqdm(layers, desc="reconstruct", unit="layer", leave=False)
        rows = []
        for layer, w in it:
            with torch.no_grad():
                args = [probe.probe(layer, True, *d) for d in data]
                target = torch.cat([probe.probe(layer, False, *d).float() for d in data])
            x = torch.cat([a[0].float() for a in args])
            rest = args[0][2:]   # bias and the conv's stride / padding / ...: the same for every chunk
            row = self._layer(gm, w, qparams[w.meta[QTENSOR].key], floats[w], layer.target, x, rest, target, gen)
            row["layer"] = layer.name
            rows.append(row)
            if ctx.progress:
                it.set_postfix(layer=layer.name, gain=f"{row['error_before'] / max(row['error_after'], 1e-30):.2f}x")
        ctx.results["reconstruct"] = {"layers": rows, "iters": self.iters, "batch_size": self.batch_size,
                                      "n": int(idx.numel()),
                                      "error_before": sum(r["error_before"] for r in rows),
                                      "error_after": sum(r["error_after"] for r in rows)}

    def _layer(self, gm, w_node, qp, w_fp, op, x, rest, target, gen) -> dict:
        w = w_fp.detach().float()
        s, z = _expand(qp.scale.float(), w, qp.axis), _expand(qp.zero_point.float(), w, qp.axis)
        floor = torch.floor(w / s)
        frac = (w / s - floor).clamp(1e-4, 1 - 1e-4)
        v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).requires_grad_(True)   # h(v) = frac at the start

        def weight(h):
            return (torch.clamp(floor + h + z, qp.qmin, qp.qmax) - z) * s

        def out_error(wt) -> float:
            with torch.no_grad():
                return float(sum((op(x[i:i + 256], wt, *rest) - target[i:i + 256]).pow(2).sum()
                                 for i in range(0, x.shape[0], 256)) / max(float(target.pow(2).sum()), 1e-30))

        w_rtn = _attr(gm, str(w_node.target)).detach().float()
        before = out_error(w_rtn)
        opt = torch.optim.Adam([v], lr=self.lr)
        warm = int(self.warmup * self.iters)
        b0, b1 = self.beta_start, self.beta_end
        ch = 1 if op is aten.conv2d.default else -1   # output channels: summed, as BRECQ's loss does
        for i in range(self.iters):
            sel = torch.randint(0, x.shape[0], (min(self.batch_size, x.shape[0]),), generator=gen)
            h = _h(v)
            pred = op(x[sel], weight(h), *rest)
            rec = (pred - target[sel]).pow(2).sum(ch).mean()
            if i >= warm:
                beta = b1 + (b0 - b1) * (1 - (i - warm) / max(self.iters - warm, 1))
                loss = rec + self.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
            else:
                loss = rec
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            w_new = weight((v >= 0).float())
        after = out_error(w_new)
        if after > before:   # keep nearest rounding where learning did not help this layer
            w_new = w_rtn
        moved = float((w_new != w_rtn).float().mean())
        buf = _attr(gm, str(w_node.target))
        buf.copy_(w_new.to(buf.dtype))
        return {"error_before": before, "error_after": min(after, before), "moved": moved,
                "kept_nearest": after > before}
