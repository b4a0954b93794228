"""chain_gains: each low-bit weight's per-channel scale fitted against short unrolled float chains.

reads:  the fake-quantized graph (after ``reconstruct`` / ``bias_correct``); ``ctx.options['fp_step']`` (the
        float step) and ``graph.meta['sampler']`` (``ptq4dm.quantize`` sets both)
writes: the weight buffers of the weights of at most ``max_bits`` bits, each output channel times exp(a_c), and
        their qparams' scales times the same factor (the integer codes do not change, so the artifact stores and
        ``lower`` packs the same codes on the new scales); ``ctx.results['chain_gains']``

Every loss the other passes minimise is one step's: a layer's output (``reconstruct``), the UNet's output
(``reconstruct{network}``), x_{t-1} (``sensitivity``). On the default model at 4 bits those misrank what the sampling
chain does (docs/results/details.md, "4-bit weights: a lottery"), and the samples are lost in the noisiest
quarter of the chain: quantized there only, they land as far from FP as quantized everywhere ("Where the chain
loses the samples"). So this pass fits against the chain itself, where it is lost: ``chains`` float chains of the
graph's sampler from ``chain_seed``, their states and noise kept; from a state x_k at a step k among the first
``steps`` share of the sampler's steps (the noisiest), the quantized step runs ``unroll`` steps with the float
chain's noise, and the loss is the mean squared distance of its states from the float chain's over those steps.
Only the per-channel gains learn (one unknown per output channel: about 3e3 on the default model, where the
network-wise rounding's 1e6 binary unknowns fitted the one-step loss and lost the chain); the activation
quantizers stay on with a straight-through gradient. Adam, ``iters`` steps of ``batch_size`` (chain, start)
pairs, seeded. A quarter of the chains is held out: the gains are kept only if the held-out chains' loss falls
(over every other start step), else the weights stay as they were.

Cost: the float chains once, then per Adam step ``unroll`` quantized steps forward and backward at ``batch_size``
(about 1.2 s on 2 cores for the default model, so ~3 minutes at the defaults). Memory: the chains' states and noise
(``chains`` x (steps + 1) x one sample each, 64 x 101 x 1 x 28 x 28 floats = 20 MB on the default model) plus one
unroll's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import StepGraph
from ptq4dm.ir.quant import QParams, _expand, fake_quant

from .base import PassContext, register_pass
from .bias_correct import FLOAT_WEIGHT, _attr
from .observe import QTENSOR

FQ = torch.ops.ptq4dm.fake_quant.default


class _SoftStep(fx.Interpreter):
    """The step graph with the gained weights in place of their buffers and straight-through activation
    quantizers (quantize forward, identity backward)."""

    def __init__(self, gm, acts: set, weights: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.acts, self.weights = acts, weights

    def run_node(self, n):
        if n.op == "get_attr" and n in self.weights:
            return self.weights[n]()
        if n in self.acts:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return args[0] + (n.target(*args, **kwargs) - args[0]).detach()
        return super().run_node(n)


@register_pass
@dataclass
class ChainGains:
    name = "chain_gains"
    reads = "fake-quantized graph; ctx.options['fp_step']; graph.meta['sampler']"
    writes = "the low-bit weights' buffers and per-channel scales times exp(a_c) (codes unchanged); ctx.results['chain_gains']"
    preserves_semantics = False

    steps: float = 0.25     # the share of the sampler's steps (the noisiest) where an unroll starts
    unroll: int = 4         # quantized steps per unroll
    iters: int = 150        # Adam steps
    batch_size: int = 16    # (chain, start) pairs per Adam step
    lr: float = 1e-3        # Adam's step on a_c (the log of the gain)
    chains: int = 64        # float chains (a quarter of them held out)
    chain_seed: int = 7_007
    seed: int = 0           # the (chain, start) draws
    max_bits: int = 4       # the weights of at most this many bits get gains (8: every quantized weight)

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        fp_step, sampler = ctx.options.get("fp_step"), graph.meta.get("sampler")
        if fp_step is None or sampler is None:
            raise ValueError("chain_gains fits against float chains of the graph's sampler: it needs "
                             "ctx.options['fp_step'] and graph.meta['sampler'] (ptq4dm.quantize sets both)")
        S = int(sampler.S)
        starts = max(1, min(round(self.steps * S), S - self.unroll + 1))
        if (not 0 < self.steps <= 1 or not 1 <= self.unroll <= S or self.iters < 1 or self.batch_size < 1
                or self.lr <= 0 or self.chains < 4 or self.max_bits < 2):
            raise ValueError(f"chain_gains: steps in (0, 1], 1 <= unroll <= the sampler's {S} steps, iters >= 1, "
                             f"batch_size >= 1, lr > 0, chains >= 4 (a quarter held out) and max_bits >= 2; got "
                             f"steps={self.steps}, unroll={self.unroll}, iters={self.iters}, "
                             f"batch_size={self.batch_size}, lr={self.lr}, chains={self.chains}, "
                             f"max_bits={self.max_bits}")
        gm, qparams = graph.gm, graph.meta["qparams"]
        nodes = list(graph.graph.nodes)
        weights = []
        for n in nodes:
            if n.op != "get_attr" or FLOAT_WEIGHT not in n.meta:
                continue
            qp = qparams[n.meta[QTENSOR].key]
            if qp.axis is not None and (qp.qmax - qp.qmin).bit_length() <= self.max_bits:
                weights.append(n)
        if not weights:
            raise ValueError(f"chain_gains found no per-channel quantized weight of at most {self.max_bits} bits: "
                             f"run it after 'fakequant' (raise max_bits to 8 for 8-bit weights)")
        acts = {n for n in nodes if n.op == "call_function" and n.target is FQ and QTENSOR in n.meta}
        base = {w: _attr(gm, str(w.target)).detach().clone() for w in weights}
        axis = {w: qparams[w.meta[QTENSOR].key].axis for w in weights}
        gains = {w: torch.zeros(base[w].shape[axis[w]], device=base[w].device, requires_grad=True) for w in weights}
        soft = _SoftStep(gm, acts, {w: (lambda w=w: base[w] * _expand(torch.exp(gains[w]), base[w], axis[w]))
                                    for w in weights})

        ex = graph.example_inputs[0]
        b = self.batch_size if graph.dynamic_batch else int(ex.shape[0])
        gen = torch.Generator().manual_seed(self.chain_seed)
        x_T = torch.randn((self.chains, *ex.shape[1:]), generator=gen).to(ex.device)
        states, noises = [x_T], []
        noise_gen = torch.Generator().manual_seed(self.chain_seed + 1)
        with torch.no_grad():   # the float chains: the states (input of step k at k) and each step's noise, drawn once
            for t_val in sampler.timesteps.tolist():
                t = torch.full((self.chains,), t_val, dtype=torch.long, device=ex.device)
                noises.append(torch.randn(x_T.shape, generator=noise_gen).to(ex.device))
                states.append(fp_step(states[-1], t, noises[-1])[0].float())
        xs, ns, ts = torch.stack(states), torch.stack(noises), sampler.timesteps.to(ex.device).long()
        held = self.chains // 4
        train = self.chains - held
        if not graph.dynamic_batch and held * len(range(0, starts, 2)) < b:
            raise ValueError(f"chain_gains: the graph was captured for batch {b}, and the {held} held-out chains x "
                             f"{len(range(0, starts, 2))} start steps make less than one batch: raise chains")

        def unroll(c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            x, loss = xs[k, c], 0.0
            for j in range(self.unroll):
                x = soft.run(x, ts[k + j], ns[k + j, c])[0]
                loss = loss + (x.float() - xs[k + j + 1, c]).pow(2).mean() / self.unroll
            return loss

        def held_loss() -> float:
            pairs = [(c, k) for k in range(0, starts, 2) for c in range(train, self.chains)]
            end = len(pairs) if graph.dynamic_batch else len(pairs) - len(pairs) % b   # static batch: whole batches
            total = 0.0
            with torch.no_grad():
                for i in range(0, end, b):
                    c, k = (torch.tensor(v) for v in zip(*pairs[i:i + b]))
                    total += float(unroll(c, k)) * c.numel()
            return total / end

        before = held_loss()
        draw = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(list(gains.values()), lr=self.lr)
        it = range(self.iters)
        if ctx.progress:
            from tqdm import tqdm

            it = tqdm(it, desc="chain_gains", unit="step", leave=False)
        losses = []
        for i in it:
            c = torch.randint(0, train, (b,), generator=draw)
            k = torch.randint(0, starts, (b,), generator=draw)
            loss = unroll(c, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        old_qp = {w: qparams[w.meta[QTENSOR].key] for w in weights}
        with torch.no_grad():   # the gains into the scales and the buffers (the same codes on the new grid), judged as
            for w in weights:   # they will run
                qp = old_qp[w]
                f = torch.exp(gains[w].detach()).reshape(qp.scale.shape).to(qp.scale)
                new = QParams(qp.scale * f, qp.zero_point, qp.qmin, qp.qmax, qp.axis, qp.groups)
                qparams[w.meta[QTENSOR].key] = new
                _attr(gm, str(w.target)).copy_(fake_quant(base[w] * _expand(f, base[w], qp.axis), new.scale,
                                                          new.zero_point, new.qmin, new.qmax, new.axis))
        soft.weights = {}
        after = held_loss()
        keep = after < before
        a = torch.cat([g.detach().reshape(-1) for g in gains.values()])
        if not keep:
            with torch.no_grad():
                for w in weights:
                    qparams[w.meta[QTENSOR].key] = old_qp[w]
                    _attr(gm, str(w.target)).copy_(base[w])
        tenth = max(len(losses) // 10, 1)
        ctx.results["chain_gains"] = {
            "weights": len(weights), "gains": int(a.numel()), "kept": keep, "held_before": before, "held_after": after,
            "held_chains": held, "start_steps": starts, "unroll": self.unroll, "iters": self.iters,
            "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "gain_abs_mean": float(a.abs().mean()) if keep else 0.0, "gain_abs_max": float(a.abs().max()) if keep else 0.0}
