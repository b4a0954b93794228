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
layer-wise form. With ``blocks=true`` it is BRECQ's block-wise form (Li et al., 2021), the one
Q-Diffusion uses: the layers of one residual block / attention module (``block_types``, found from
the modules the graph was captured from) learn their roundings together against the block's float
output, so that one layer's rounding can make up for another's; the activation quantizers inside
the block stay on, with a straight-through gradient. Layers in no such block (the down / up
sampling convs, ...) are reconstructed on their own, as in the layer-wise form.

Restarts (``restarts=k``, ours): at 4 bits the learned rounding's outcome over a sampling chain is a
lottery that the one-step loss does not see (on the default model, DDPM-100, the minibatch seed alone
moved the samples' PSNR from FP by 4 dB while the calibration loss moved by 1%). So ``k`` reconstructions
with seeds ``seed .. seed + k - 1`` start from the same nearest rounding, each is judged by
``select_samples`` held-out chains of the graph's sampler (from ``select_seed``; the quantized step
against the float one from the same x_T and noise, PSNR of x_0), and the best one is kept. ``k`` times
the cost, plus the chains.

Chain weights (``t_weight=g``, ours, layer-wise): each calibration sample's squared error (loss, keep-nearest
check, refit) weighted by ``s_k ** g``, ``s_k`` how much an error in the UNet's output at the sample's step moves
the final sample along float chains (``ptq4dm.models.step.chain_sensitivity``). Measured worse than uniform
weights for g = 1, 0.5 and -0.5 on the default model (docs/results/details.md); off by default.

Memory: one layer (block) at a time. Its quantized inputs and float outputs on the ``n``
calibration samples are recomputed by running the graph up to that layer (nothing is cached on
disk), so memory is the inputs and outputs of one layer (block) over ``n`` samples (about 100 MB
for the default model at n = 256). Seeded and deterministic (the minibatch order comes from ``seed``). Inside a process
group every rank runs the same reconstruction (the same samples and seed: the same result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import StepGraph
from ptq4dm.ir.quant import QParams, _expand

from .base import PassContext, register_pass
from .bias_correct import FLOAT_WEIGHT, _attr, calibration_before_bias_correct
from .observe import QTENSOR

aten = torch.ops.aten
FQ = torch.ops.ptq4dm.fake_quant.default
LAYERS = {aten.conv2d.default, aten.linear.default}
# the modules whose layers ``blocks=true`` reconstructs together (diffusers' names; a module's class
# name is read from the graph's nn_module_stack)
BLOCK_TYPES = ("ResnetBlock2D", "Attention")
ZETA, GAMMA = 1.1, -0.1   # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly



class _Stop(Exception):
    pass


class _Probe(fx.Interpreter):
    """Runs the graph up to ``layer`` and returns what it needs: in quantized mode the layer's
    evaluated arguments (its input after its quantizer, the bias, ...), in float mode (every
    fake-quant bypassed, every weight float) the layer's output. ``grab`` instead: in quantized
    mode the values of ``nodes`` (the inputs of a block) when ``layer`` (the block's first node)
    is reached, in float mode the values of ``nodes`` (the block's outputs) once ``layer`` (its
    last node) has run."""

    def __init__(self, gm, acts: set, floats: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.acts, self.floats = acts, floats
        self.layer, self.quantized, self.got, self.nodes = None, True, None, None

    def run_node(self, n):
        if not self.quantized:
            if n in self.acts:
                return self.env[n.args[0]]
            if n in self.floats:
                return self.floats[n]
        if n is self.layer and self.quantized:
            self.got = ([self.env[m] for m in self.nodes] if self.nodes is not None
                        else self.fetch_args_kwargs_from_env(n)[0])
            raise _Stop
        out = super().run_node(n)
        if n is self.layer:
            self.env[n] = out
            self.got = [self.env[m] for m in self.nodes] if self.nodes is not None else out
            raise _Stop
        return out

    def probe(self, layer, quantized: bool, *inputs):
        return self.grab(layer, None, quantized, *inputs)

    def grab(self, layer, nodes, quantized: bool, *inputs):
        self.layer, self.nodes, self.quantized, self.got = layer, nodes, quantized, None
        try:
            self.run(*inputs)
        except _Stop:
            pass
        finally:
            self.env.clear()
        return self.got


def _block_of(node: fx.Node, types) -> str | None:
    """The module path of the innermost module of one of ``types`` that ``node`` was traced in."""
    found = None
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")
        if name in types:
            found = path
    return found


def _depends_on_inputs(graph: fx.Graph) -> set:
    """The nodes whose value changes with the step's inputs (the batched ones)."""
    dep = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _interpret(body: list, env: dict, weight_of, acts: set, ste: bool) -> dict:
    """Run the fx nodes ``body`` in order over ``env`` (node -> value, seeded with their inputs):
    ``get_attr`` nodes read ``weight_of(node)`` (a soft weight or the graph's constant); with ``ste``
    the activation quantizers in ``acts`` quantize forward and pass the gradient straight through."""
    look = lambda a: env[a]
    for n in body:
        if n.op == "placeholder":
            continue
        if n.op == "get_attr":
            env[n] = weight_of(n)
            continue
        args = fx.node.map_arg(n.args, look)
        kwargs = fx.node.map_arg(n.kwargs, look)
        if n in acts and ste:   # quantize forward, identity backward
            x = args[0]
            env[n] = x + (n.target(*args, **kwargs) - x).detach()
        else:
            env[n] = n.target(*args, **kwargs)
    return env


def _commit(gm, base: dict, rnd: dict, error, before: float) -> tuple[float, float, bool]:
    """Write the learned roundings' hard codes into the weights' buffers if they lower ``error``
    below ``before``, else the codes of ``base`` (node -> weight codes it started from).
    Returns (error after, fraction of codes moved from base, whether base was kept)."""
    with torch.no_grad():
        hard = {w: r.hard() for w, r in rnd.items()}
    after = error(hard)
    keep = after > before
    final = base if keep else hard
    moved = sum(int((final[w] != base[w]).sum()) for w in base) / sum(base[w].numel() for w in base)
    for w in base:
        buf = _attr(gm, str(w.target))
        buf.copy_(final[w].to(buf.dtype))
    return min(after, before), moved, keep


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
    blocks: bool = False    # BRECQ: the layers of one block (BLOCK_TYPES) against the block's output
    scales: bool = False    # also learn each weight's per-channel scale (codes and scale together; layer-wise only)
    scale_lr: float = 3e-4  # Adam's step on the log of the scale factor (screened: 1e-4 ~ 3e-4 > 1e-3 > 5e-3)
    refit: str = ""         # then each output channel's scale refitted to the fixed codes by least squares on all n samples,
                            # on the quantized model's inputs ("quantized") or the float model's ("float"); "": off
    drop: float = 0.0       # QDrop: each input element of a training step is the float model's with this probability
    network: int = 0        # then this many Adam steps of every rounding together against the UNet's output (0: off)
    network_lr: float = 1e-2  # Adam's step on V in the network phase (it starts from the layer-wise codes)
    network_reg: float = 0.01  # the network phase's regulariser, on the mean over weights (its loss: the output's MSE)
    seed: int = 0
    t_weight: float = 0.0   # != 0: each calibration sample's error weighted by its step's chain sensitivity to this power
    t_chains: int = 32      # the float chains that sensitivity is measured on (t_weight != 0)
    t_seed: int = 555_555   # their seed
    restarts: int = 1       # > 1: that many reconstructions (seeds seed, seed + 1, ...), the one whose held-out chain lands closest to FP kept
    select_samples: int = 64  # the held-out chains' samples (restarts > 1)
    select_seed: int = 987_654_321  # their sampling seed: keep it away from the seeds the result is judged on

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        if self.restarts < 1 or self.select_samples < 1:
            raise ValueError(f"reconstruct: restarts and select_samples must be >= 1, got restarts={self.restarts}, "
                             f"select_samples={self.select_samples}")
        if self.restarts == 1:
            return self._run(graph, ctx)
        self._restart(graph, ctx)

    def _restart(self, graph: StepGraph, ctx: PassContext) -> None:
        """``restarts`` reconstructions from the same nearest-rounding start, each with its own seed (its
        minibatch order), judged on what the one-step loss does not see: ``select_samples`` chains of the
        graph's sampler from ``select_seed``, the quantized step against the float step from the same x_T and
        noise (PSNR of x_0). The best one's codes and scales are kept. Measured on the default model (DDPM-100,
        4-bit weights): the seed alone moved the samples' PSNR from FP by 4 dB while the calibration loss
        moved by 1% (docs/results/details.md, "4-bit weights: a lottery")."""
        import copy
        import dataclasses

        from ptq4dm.models.metrics import psnr
        from ptq4dm.models.step import sample

        fp_step, sampler = ctx.options.get("fp_step"), graph.meta.get("sampler")
        if fp_step is None or sampler is None:
            raise ValueError("reconstruct{restarts>1} judges each restart on held-out chains: it needs "
                             "ctx.options['fp_step'] and graph.meta['sampler'] (ptq4dm.quantize sets both)")
        gm, qparams = graph.gm, graph.meta["qparams"]
        names = [str(n.target) for n in graph.graph.nodes if n.op == "get_attr" and FLOAT_WEIGHT in n.meta]
        save = lambda: ({k: _attr(gm, k).detach().clone() for k in names}, copy.deepcopy(dict(qparams)))

        def load(state) -> None:
            bufs, qps = state
            with torch.no_grad():
                for k, v in bufs.items():
                    _attr(gm, k).copy_(v)
            qparams.clear()
            qparams.update(copy.deepcopy(qps))

        ex = graph.example_inputs[0]
        b = int(ex.shape[0])
        m = self.select_samples if graph.dynamic_batch else -(-self.select_samples // b) * b
        shapes = [(k, *ex.shape[1:]) for k in ([m] if graph.dynamic_batch else [b] * (m // b))]

        def chains(step_fn) -> torch.Tensor:
            return torch.cat([sample(step_fn, sampler, sh, seed=self.select_seed + i, device=ex.device).float().cpu()
                              for i, sh in enumerate(shapes)])

        start, ref = save(), chains(fp_step)
        tries, best = [], None
        it = range(self.restarts)
        if ctx.progress:
            from tqdm import tqdm

            it = tqdm(it, desc="reconstruct (restarts)", unit="restart", leave=False)
        for r in it:
            load(start)
            one = dataclasses.replace(self, seed=self.seed + r, restarts=1)
            one._run(graph, ctx)
            score = psnr(chains(graph), ref)
            tries.append({"seed": self.seed + r, "psnr": score, "error_after": ctx.results["reconstruct"]["error_after"]})
            if best is None or score > best[0]:
                best = (score, save(), ctx.results["reconstruct"], self.seed + r)
            if ctx.progress:
                it.set_postfix(psnr=f"{score:.2f}", best=f"{best[0]:.2f}")
        load(best[1])
        ctx.results["reconstruct"] = {**best[2], "restarts": tries, "chosen_seed": best[3],
                                      "select_samples": m, "select_seed": self.select_seed}

    def _run(self, graph: StepGraph, ctx: PassContext) -> None:
        cs = calibration_before_bias_correct(graph, ctx, "reconstruct", "the corrected bias is fitted to the "
                                             "final weights")
        if (self.iters < 0 or (self.iters == 0 and self.network < 1) or self.network < 0 or self.batch_size < 1
                or self.n < 0 or not 0 <= self.warmup < 1 or self.lr <= 0 or self.network_lr <= 0):
            raise ValueError(f"reconstruct: iters must be >= 1 (or 0 with network >= 1), network >= 0, batch_size >= 1, "
                             f"n >= 0, warmup in [0, 1) and lr, network_lr > 0; got iters={self.iters}, "
                             f"network={self.network}, batch_size={self.batch_size}, n={self.n}, warmup={self.warmup}, "
                             f"lr={self.lr}, network_lr={self.network_lr}")
        if self.refit not in ("", "quantized", "float") or ((self.refit or self.drop) and self.blocks) \
                or not 0 <= self.drop <= 1:
            raise ValueError(f"reconstruct: refit is '', 'quantized' or 'float' and drop in [0, 1], both layer-wise "
                             f"only; got refit={self.refit!r}, drop={self.drop}, blocks={self.blocks}")
        if self.t_weight and (self.blocks or self.network or self.t_chains < 1):
            raise ValueError(f"reconstruct: t_weight != 0 is layer-wise only (blocks=false, network=0) and needs "
                             f"t_chains >= 1; got t_weight={self.t_weight}, blocks={self.blocks}, "
                             f"network={self.network}, t_chains={self.t_chains}")
        if self.scales and (self.blocks or self.scale_lr <= 0):
            raise ValueError(f"reconstruct: scales=true learns each scale layer by layer with scale_lr > 0; got "
                             f"blocks={self.blocks}, scale_lr={self.scale_lr} (drop blocks=true or scales=true)")
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
        if self.blocks:   # a block trains on whole chunks (its shapes are the captured ones): shuffled, of batch_size
            chunk = self.batch_size if graph.dynamic_batch else chunk
            idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(self.seed))]
        noise = torch.randn((idx.numel(), *cs.x.shape[1:]), generator=torch.Generator().manual_seed(self.seed))
        data = [(cs.x[idx[i:i + chunk]].to(device), cs.t[idx[i:i + chunk]].to(device), noise[i:i + chunk].to(device))
                for i in range(0, idx.numel(), chunk)]
        if not graph.dynamic_batch or self.blocks:
            data = [d for d in data if d[0].shape[0] == chunk]
        if not data:
            raise ValueError(f"reconstruct needs at least {chunk} calibration samples (the graph's batch), got "
                             f"{idx.numel()}: raise n or the calibration set's size")
        probe = _Probe(gm, acts, floats)
        gen = torch.Generator().manual_seed(self.seed)
        sw, t_table = None, None
        if self.t_weight:   # one weight per sample: its step's chain sensitivity ** t_weight, mean 1 over the samples
                            # (t_weight < 0 weighs the quiet steps more)
            t_table = self._t_table(graph, ctx)
            sw = torch.cat([t_table[d[1].cpu()] for d in data]).to(device)
            if not bool((sw > 0).all()):
                raise ValueError("reconstruct{t_weight}: some calibration samples are at timesteps the graph's sampler "
                                 "does not visit (their step has no measured weight): calibrate on the graph's sampler")
            sw = sw / sw.mean()
        units = self._units(graph, layers) if self.blocks else [(None, [lw]) for lw in layers]
        it = units
        if ctx.progress:
            from tqdm import tqdm

            it = tqdm(units, desc="reconstruct", unit="block" if self.blocks else "layer", leave=False)
        rows = []
        for block, lws in (it if self.iters else []):
            if block is None:
                (layer, w), = lws
                with torch.no_grad():
                    args = [probe.probe(layer, True, *d) for d in data]
                    target = torch.cat([probe.probe(layer, False, *d).float() for d in data])
                x = torch.cat([a[0].float() for a in args])
                # bias and the conv's stride / padding / ...: the same for every chunk (the bias learns nothing)
                rest = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[0][2:]]
                key = w.meta[QTENSOR].key
                x_fp = None
                if self.refit == "float" or self.drop:
                    with torch.no_grad():
                        x_fp = torch.cat([probe.grab(layer, [layer.args[0]], False, *d)[0].float() for d in data])
                rw = None
                if sw is not None:   # a layer that flattens the batch (B * L rows): each row its sample's weight
                    if x.shape[0] % sw.shape[0]:
                        raise ValueError(f"reconstruct{{t_weight}}: layer {layer.name} sees {x.shape[0]} rows for "
                                         f"{sw.shape[0]} samples; its rows cannot be matched to samples")
                    rw = sw.repeat_interleave(x.shape[0] // sw.shape[0])
                row = self._layer(gm, w, qparams[key], floats[w], layer.target, x, rest, target, gen, x_fp, rw)
                if "scale" in row:   # the learned scale: the codes in the buffer are on its grid
                    qp = qparams[key]
                    qparams[key] = QParams(row.pop("scale"), qp.zero_point, qp.qmin, qp.qmax, qp.axis, qp.groups)
                row["layer"] = layer.name
            else:
                row = self._block(gm, graph, block, lws, qparams, floats, acts, probe, data, gen)
            rows.append(row)
            if ctx.progress:
                it.set_postfix(layer=row["layer"], gain=f"{row['error_before'] / max(row['error_after'], 1e-30):.2f}x")
        result = {"layers": rows, "iters": self.iters, "batch_size": self.batch_size,
                  "n": int(idx.numel()), "blocks": self.blocks,
                  "error_before": sum(r["error_before"] for r in rows),
                  "error_after": sum(r["error_after"] for r in rows)}
        if t_table is not None:
            ts = graph.meta["sampler"].timesteps
            result["t_weight"] = {"power": self.t_weight, "chains": self.t_chains,
                                  "per_step": t_table[ts.cpu()].tolist(),
                                  "sample_weight_max": float(sw.max()), "sample_weight_min": float(sw.min())}
        if self.network:
            result["network"] = self._network(gm, graph, layers, qparams, floats, acts, probe, data, gen, ctx.progress)
        ctx.results["reconstruct"] = result

    def _t_table(self, graph: StepGraph, ctx: PassContext) -> torch.Tensor:
        """Per training timestep: how much an error in the UNet's output at that step moves the final sample
        (``chain_step_table``), to the power ``t_weight``. Measured on the default model: an error at the first
        DDPM-100 step moves x_0 270-980x as much as one at the last, at the first DDIM-50 step 24,000-33,000x
        (docs/results/details.md, "Weighting the calibration samples by the chain")."""
        table = chain_step_table(graph, ctx, self.t_chains, self.t_seed, "reconstruct{t_weight}")
        return torch.where(table > 0, table.clamp_min(1e-30).pow(self.t_weight), 0.0).float()

    def _regulariser(self, i: int, roundings, iters: int | None = None) -> torch.Tensor | float:
        """AdaRound's rounding regulariser at step i of ``iters`` (default: ``self.iters``): none during
        the warm-up, then ``reg`` x sum(1 - |2h - 1|^beta) with beta annealed linearly from ``beta_start``
        to ``beta_end``. The network phase (``iters`` given): ``network_reg`` x the mean over its weights."""
        network = iters is not None
        iters = self.iters if iters is None else iters
        warm = int(self.warmup * iters)
        if i < warm:
            return 0.0
        beta = self.beta_end + (self.beta_start - self.beta_end) * (1 - (i - warm) / max(iters - warm, 1))
        total = sum(r.reg(beta) for r in roundings)
        if network:
            return self.network_reg * total / sum(r.v.numel() for r in roundings)
        return self.reg * total

    def _units(self, graph: StepGraph, layers: list) -> list:
        """Layers grouped by the block (BLOCK_TYPES) they were traced in, in graph order; a layer in
        no block is a unit of its own. A unit: (block path or None, [(layer, weight node), ...])."""
        units, index = [], {}
        for layer, w in layers:
            path = _block_of(layer, BLOCK_TYPES)
            if path is None:
                units.append((None, [(layer, w)]))
            elif path in index:
                units[index[path]][1].append((layer, w))
            else:
                index[path] = len(units)
                units.append((path, [(layer, w)]))
        return [(None, lws) if b is not None and len(lws) == 1 else (b, lws) for b, lws in units]

    def _block(self, gm, graph, path, lws, qparams, floats, acts, probe, data, gen) -> dict:
        """BRECQ: the roundings of every layer in the block learned together against the float
        block's outputs; the nodes from the block's first to its last node run in a small
        interpreter with soft weights and straight-through activation quantizers."""
        nodes = list(graph.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        mine = [n for n in nodes if n.op == "call_function" and _block_of(n, BLOCK_TYPES) == path]
        lo, hi = min(pos[n] for n in mine), max(pos[n] for n in mine)
        for layer, _ in lws:
            lo, hi = min(lo, pos[layer]), max(hi, pos[layer])
        body = nodes[lo:hi + 1]
        inside = set(body)
        weights = {w for _, w in lws}
        ext = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside and a not in weights))
        outs = [n for n in body if any(u not in inside for u in n.users)]
        with torch.no_grad():
            # detached: nothing but the roundings gets a gradient (a backward into GroupNorm's weight
            # with the channels-last input that attention's reshape leaves segfaulted, torch 2.13 CPU)
            xs = [{n: v.detach().contiguous() if isinstance(v, torch.Tensor) else v
                   for n, v in zip(ext, probe.grab(body[0], ext, True, *d))} for d in data]
            ys = [[v.float() for v in probe.grab(body[-1], outs, False, *d)] for d in data]
        rnd = {w: _Rounding(floats[w], qparams[w.meta[QTENSOR].key]) for w in weights}
        rtn = {w: _attr(gm, str(w.target)).detach().float() for w in weights}

        def run(env0: dict, wts: dict, ste: bool) -> list:
            weight_of = lambda n: wts[n] if n in wts else _attr(gm, str(n.target)).detach()
            env = _interpret(body, {**env0, **wts}, weight_of, acts, ste)
            return [env[o] for o in outs]

        def error(wts: dict) -> float:
            num = den = 0.0
            with torch.no_grad():
                for x, y in zip(xs, ys):
                    for p, t in zip(run(x, wts, False), y):
                        num += float((p.float() - t).pow(2).sum())
                        den += float(t.pow(2).sum())
            return num / max(den, 1e-30)

        before = error(rtn)
        params = [r.v for r in rnd.values()]
        opt = torch.optim.Adam(params, lr=self.lr)
        for i in range(self.iters):
            c = int(torch.randint(0, len(xs), (1,), generator=gen))
            preds = run(xs[c], {w: r.weight() for w, r in rnd.items()}, True)
            loss = sum((p.float() - t).pow(2).sum(1 if p.dim() > 1 else 0).mean() for p, t in zip(preds, ys[c]))
            loss = loss + self._regulariser(i, rnd.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after, moved, keep = _commit(gm, rtn, rnd, error, before)
        return {"layer": path, "layers": [l.name for l, _ in lws], "error_before": before,
                "error_after": after, "moved": moved, "kept_nearest": keep}

    def _network(self, gm, graph, layers, qparams, floats, acts, probe, data, gen, progress) -> dict:
        """Every rounding together against the float UNet's output (the prediction the sampler reads),
        the whole UNet in a small interpreter with soft weights and straight-through activation
        quantizers. Starts from the codes the layer-wise phase left (h(V) = 0.25 / 0.75 towards them) and
        keeps its codes only if the UNet's output error on the calibration samples falls."""
        from .noise_correct import unet_output_node

        out = unet_output_node(graph)
        need, stack = set(), [out]
        while stack:   # the nodes the UNet's output depends on
            n = stack.pop()
            if n not in need:
                need.add(n)
                stack.extend(n.all_input_nodes)
        body = [n for n in graph.graph.nodes if n in need]
        places = [n for n in graph.graph.nodes if n.op == "placeholder"]
        weights = list(dict.fromkeys(w for _, w in layers))
        with torch.no_grad():
            ys = [probe.probe(out, False, *d).float() for d in data]
        consts = {n: _attr(gm, str(n.target)).detach() for n in body if n.op == "get_attr" and n not in weights}
        current = {w: _attr(gm, str(w.target)).detach().float() for w in weights}
        rnd = {w: _Rounding(floats[w], qparams[w.meta[QTENSOR].key], towards=current[w]) for w in weights}

        def run(inputs, wts: dict, ste: bool) -> torch.Tensor:
            weight_of = lambda n: wts[n] if n in wts else consts[n]
            return _interpret(body, dict(zip(places, inputs)), weight_of, acts, ste)[out]

        def error(wts: dict) -> float:
            num = den = 0.0
            with torch.no_grad():
                for d, y in zip(data, ys):
                    num += float((run(d, wts, False).float() - y).pow(2).sum())
                    den += float(y.pow(2).sum())
            return num / max(den, 1e-30)

        before = error(current)
        xs = [torch.cat([d[k] for d in data]) for k in range(3)]
        y_all = torch.cat(ys)
        dynamic = graph.dynamic_batch
        opt = torch.optim.Adam([r.v for r in rnd.values()], lr=self.network_lr)
        steps, losses = range(self.network), []
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="reconstruct (network)", unit="step", leave=False)
        for i in steps:
            if dynamic:
                sel = torch.randint(0, y_all.shape[0], (min(self.batch_size, y_all.shape[0]),), generator=gen)
                inputs, y = [x[sel] for x in xs], y_all[sel]
            else:
                c = int(torch.randint(0, len(data), (1,), generator=gen))
                inputs, y = data[c], ys[c]
            pred = run(inputs, {w: r.weight() for w, r in rnd.items()}, True)
            mse = (pred.float() - y).pow(2).mean()
            loss = mse + self._regulariser(i, rnd.values(), self.network)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(mse.detach()))
        after, moved, keep = _commit(gm, current, rnd, error, before)
        tenth = max(len(losses) // 10, 1)
        return {"iters": self.network, "error_before": before, "error_after": after, "moved": moved,
                "kept_layerwise": keep, "mse_first": sum(losses[:tenth]) / tenth, "mse_last": sum(losses[-tenth:]) / tenth}

    def _layer(self, gm, w_node, qp, w_fp, op, x, rest, target, gen, x_fp=None, rw=None) -> dict:
        r = _Rounding(w_fp, qp, learn_scale=self.scales)
        # rw: one weight per row of x (t_weight), broadcast over the rest of the output
        wv = (lambda e, i, j: e) if rw is None else (lambda e, i, j: e * rw[i:j].reshape(-1, *[1] * (e.dim() - 1)))

        def out_error(wt) -> float:
            with torch.no_grad():
                num = sum(float(wv((op(x[i:i + 256], wt, *rest) - target[i:i + 256]).pow(2), i, i + 256).sum())
                          for i in range(0, x.shape[0], 256))
                return num / max(float(wv(target.pow(2), 0, x.shape[0]).sum()), 1e-30)

        w_rtn = _attr(gm, str(w_node.target)).detach().float()
        before = out_error(w_rtn)
        opt = torch.optim.Adam([{"params": [r.v], "lr": self.lr}]
                               + ([{"params": [r.g], "lr": self.scale_lr}] if self.scales else []))
        ch = 1 if op is aten.conv2d.default else -1   # output channels: summed, as BRECQ's loss does
        for i in range(self.iters):
            sel = torch.randint(0, x.shape[0], (min(self.batch_size, x.shape[0]),), generator=gen)
            xin = x[sel]
            if self.drop:   # QDrop (Wei et al., 2022): the quantization noise of the inputs dropped at random
                xin = torch.where(torch.rand(xin.shape, generator=gen).to(xin.device) < self.drop, x_fp[sel], xin)
            pred = op(xin, r.weight(), *rest)
            err = (pred - target[sel]).pow(2).sum(ch)
            if rw is not None:
                err = err * rw[sel].reshape(-1, *[1] * (err.dim() - 1))
            loss = err.mean() + self._regulariser(i, [r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            w_new, scale = r.hard(), r.scale().detach()
            if self.refit:
                codes = r.codes((r.v >= 0).float())
                learned, scale = scale, self._refit(op, x_fp if self.refit == "float" else x, rest, target, codes, scale,
                                                    rw)
                w_new = codes * scale
        after = out_error(w_new)
        if after > before:   # keep nearest rounding where learning did not help this layer
            w_new = w_rtn
        moved = float((w_new != w_rtn).float().mean())
        buf = _attr(gm, str(w_node.target))
        buf.copy_(w_new.to(buf.dtype))
        row = {"error_before": before, "error_after": min(after, before), "moved": moved, "kept_nearest": after > before}
        if (self.scales or self.refit) and after <= before:
            row["scale"] = scale.reshape(qp.scale.shape).to(qp.scale.dtype)
        if self.refit:   # the refit's gain over the learned scale (geometric mean over channels)
            row["refit_gain"] = float(torch.exp(torch.log(scale / learned).mean()))
        return row

    @staticmethod
    def _refit(op, x, rest, target, codes, scale, rw=None) -> torch.Tensor:
        """Each output channel's scale for fixed codes (``codes`` = weight / scale, zero point included): the
        least-squares gain of the layer's output against the float target over every sample and position,
        ``s_c = <u_c, t_c - b_c> / <u_c, u_c>`` with ``u = op(x; codes)`` (no bias). Deterministic: no
        minibatch noise in the gain (Adam moves a learned scale by about ``scale_lr`` a step whatever its
        gradient's size). A channel with no signal keeps its scale. ``rw`` (t_weight): each row's products weighted."""
        ch = 1 if op is aten.conv2d.default else -1
        nobias = [None, *rest[1:]] if rest else []
        num = torch.zeros(codes.shape[0], dtype=torch.float64)
        den = torch.zeros_like(num)
        for i in range(0, x.shape[0], 256):
            u = op(x[i:i + 256], codes, *nobias)
            tb = target[i:i + 256] - (op(x[i:i + 256], torch.zeros_like(codes), *rest) if rest and rest[0] is not None
                                      else 0)
            dims = [d for d in range(u.dim()) if d != (ch % u.dim())]
            w = 1 if rw is None else rw[i:i + 256].reshape(-1, *[1] * (u.dim() - 1))
            num += (w * u * tb).double().sum(dims).cpu()
            den += (w * u.pow(2)).double().sum(dims).cpu()
        if scale.numel() == 1:   # a per-tensor scale: one gain over every channel
            num, den = num.sum(0, keepdim=True), den.sum(0, keepdim=True)
        s_old = scale.reshape(-1).cpu().double()
        s_new = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-300), s_old)
        return s_new.to(scale.dtype).to(scale.device).reshape(scale.shape)


class _Rounding:
    """One weight's learned rounding: ``floor(w / s) + h(v)`` on its grid, ``v`` initialised so
    that ``h(v)`` is the fractional part (the soft weight starts at the float weight)."""

    def __init__(self, w_fp: torch.Tensor, qp, towards: torch.Tensor | None = None, learn_scale: bool = False):
        w = w_fp.detach().float()
        self.qp = qp
        self.s = _expand(qp.scale.detach().float(), w, qp.axis)
        # learn_scale: a per-channel factor exp(g) on the scale, learned with the rounding (the codes
        # floor(w / s) + h stay on the solved scale's grid; the weight is code x the learned scale)
        self.g = torch.zeros_like(self.s).requires_grad_(True) if learn_scale else None
        self.z = _expand(qp.zero_point.detach().float(), w, qp.axis)
        self.floor = torch.floor(w / self.s)
        frac = (w / self.s - self.floor).clamp(1e-4, 1 - 1e-4)
        if towards is not None:   # halfway from the float weight's fraction towards given codes (up: 0.75, down: 0.25)
            up = torch.round(towards / self.s) >= self.floor + 1
            frac = torch.where(up, torch.full_like(frac, 0.75), torch.full_like(frac, 0.25))
        self.v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).requires_grad_(True)

    def scale(self) -> torch.Tensor:
        return self.s if self.g is None else self.s * torch.exp(self.g)

    def codes(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """The (soft) codes less the zero point: the weight is these times the scale."""
        h = _h(self.v) if h is None else h
        return torch.clamp(self.floor + h + self.z, self.qp.qmin, self.qp.qmax) - self.z

    def weight(self, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.codes(h) * self.scale()

    def hard(self) -> torch.Tensor:
        return self.weight((self.v >= 0).float())

    def reg(self, beta: float) -> torch.Tensor:
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()


def chain_step_table(graph: StepGraph, ctx: PassContext, chains: int, seed: int, who: str,
                     wrt: str = "output") -> torch.Tensor:
    """A table of length T (one entry per training timestep): how much an error at that step moves the final
    sample along ``chains`` float chains of the graph's sampler (``ptq4dm.models.step.chain_sensitivity``, an
    error in the UNet's output with ``wrt="output"``, in the step's x_{t-1} with ``wrt="state"``), the geometric
    mean over the chains (their values are heavy-tailed), float64; 0 at timesteps the sampler does not visit. ``who`` names
    the caller in the error raised when ``ctx.options['fp_step']`` or the graph's sampler is missing."""
    from ptq4dm.models.step import chain_sensitivity

    fp_step, sampler = ctx.options.get("fp_step"), graph.meta.get("sampler")
    unet = getattr(fp_step, "unet", None)
    if unet is None or sampler is None:
        raise ValueError(f"{who} measures each step's weight on float chains: it needs ctx.options['fp_step'] (a "
                         f"DiffusionStep, with its .unet) and graph.meta['sampler'] (ptq4dm.quantize sets both)")
    ex = graph.example_inputs[0]
    flags = [p.requires_grad for p in unet.parameters()]
    for p in unet.parameters():
        p.requires_grad_(False)
    try:
        s = chain_sensitivity(unet, sampler, (chains, *ex.shape[1:]), seed=seed, device=ex.device,
                              progress=ctx.progress, wrt=wrt)
    finally:
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
    table = torch.zeros(int(sampler.T), dtype=torch.float64)
    table[sampler.timesteps.cpu()] = s.double().clamp_min(1e-30).log().mean(0).exp()
    return table
