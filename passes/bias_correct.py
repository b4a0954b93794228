"""bias_correct: empirical bias correction of the quantized convs and linears (not in PTQ4DM).

reads:  the fake-quantized graph (``fakequant``'s output); ``ctx.options['calibration_set']``
        (the (x_t, t) pairs ``calibrate`` used)
writes: for each conv / linear with a quantized weight, a new bias buffer
        ``ptq4dm_bc_<i>`` = bias - E[y_q - y], read by the conv / linear instead of its bias;
        ``graph.meta['bias_corrected']`` ({original bias target: buffer}, which the artifact
        stores as the layer's bias); with ``groups=G > 1`` also a (G, C) table buffer
        ``ptq4dm_bc_<i>_groups`` per layer, added after it (``insert_group_tables``), and
        ``graph.meta['bias_correct_tables']`` ({original bias target: table buffer});
        ``ctx.results['bias_correct']``

Rounding a weight and clipping an activation do not only add noise to a layer's output: they
also move its mean. MSE ranges clip the tails, and a clipped tail is a one-signed error. One
step of the sampler hardly notices, but the chain applies the step a hundred times, and a
mean shift accumulates where zero-mean noise does not (the sampler's own noise swamps it).
This is the empirical bias correction of Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction" (ICCV 2019), Sec. 4.2, measured on the calibration set: for
each quantized layer, run the quantized graph and compare, at that layer only, its output
y_q = op(Q(x), Q(W)) with y = op(x, W) on the same input x (the float value before the
activation's fake-quant). The per-output-channel mean of y_q - y over the batch (and the
spatial positions) is this layer's own bias; it is subtracted from the layer's bias. The
error is local, so each layer's correction does not depend on the layers before it.

The correction is a constant per channel, folded into the bias: it costs nothing at run time,
and ``lower`` reads the new bias like the old one. The mean error depends on t, so with
``groups=G`` the rest of it in each group of sampler steps is a (G, C) table added after the
layer, gathered by t (groups with fewer than ``min_samples`` calibration samples get none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import ROLE, StepGraph

from .base import PassContext, register_pass
from .observe import QTENSOR

aten = torch.ops.aten
LAYER_OPS = {aten.conv2d.default, aten.convolution.default, aten.linear.default}
FLOAT_WEIGHT = "ptq4dm.float_weight"   # meta key fakequant sets on a fake-quantized weight: the float one's target


def calibration_before_bias_correct(graph, ctx, name: str, why: str):
    """The calibration set for a pass that measures the fake-quantized graph (``name``), with the
    error a user needs when it is missing or when ``bias_correct`` already ran (``why`` says why
    that order matters)."""
    cs = ctx.options.get("calibration_set")
    if cs is None:
        raise ValueError(f"{name} needs the calibration set: run it after 'calibrate' and 'fakequant' in the "
                         f"same pipeline (e.g. '...,calibrate,solve,fakequant,{name},bias_correct')")
    if graph.meta.get("bias_corrected"):
        raise ValueError(f"{name} must run before bias_correct ({why}): put it between 'fakequant' and 'bias_correct'")
    return cs


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _float_input(node, env: dict):
    """The float value a layer's input had before fake-quant: the fake_quant's source, or a cat of them."""
    fq = torch.ops.ptq4dm.fake_quant.default
    if not isinstance(node, fx.Node):
        return node
    if node.target is fq:
        return env[node.args[0]]
    if node.target is aten.cat.default and all(isinstance(a, fx.Node) for a in node.args[0]):
        parts = [env[a.args[0]] if a.target is fq else env[a] for a in node.args[0]]
        return torch.cat(parts, *node.args[1:])
    return env[node]


@register_pass
@dataclass
class BiasCorrect:
    name = "bias_correct"
    reads = "fake-quantized graph; ctx.options['calibration_set']"
    writes = "corrected bias buffers ptq4dm_bc_<i> on quantized convs / linears; ctx.results['bias_correct']"
    preserves_semantics = False

    batch_size: int = 128
    seed: int = 0
    groups: int = 1         # > 1: also a correction per group of sampler steps (a (G, C) table gathered by t)
    min_samples: int = 10   # a group with fewer calibration samples keeps the all-t correction

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        g, gm = graph.graph, graph.gm
        cs = ctx.options.get("calibration_set")
        if cs is None:
            raise ValueError("bias_correct needs the calibration set: run it after 'calibrate' in the same "
                             "pipeline (e.g. '...,calibrate,solve,fakequant,bias_correct')")
        layers = {}
        for n in g.nodes:
            if n.op == "call_function" and n.target in LAYER_OPS and isinstance(n.args[1], fx.Node):
                target = n.args[1].meta.get(FLOAT_WEIGHT)
                if target is not None:
                    layers[n] = _attr(gm, target)
        if not layers:
            raise ValueError("bias_correct found no fake-quantized conv / linear weights: run 'fakequant' before it")
        if self.groups < 1:
            raise ValueError(f"bias_correct groups must be >= 1, got {self.groups}")
        from ptq4dm import distributed as dist

        G = self.groups
        table = None
        if G > 1:
            from .calibrate import group_table

            table = group_table(graph.meta["sampler"], G)
        index = {n: i for i, n in enumerate(layers)}
        cur: dict = {}   # this batch: layer index -> ((G, C) sums of y_q - y by the group of each sample's t, (G,) counts)
        state = {}

        class Measure(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n in layers:
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    args = list(args)
                    args[0] = _float_input(n.args[0], self.env)
                    args[1] = layers[n]
                    ref = n.target(*args, **kwargs)
                    d = (out - ref).double()
                    conv = n.target is not aten.linear.default
                    d = d if conv else d.reshape(d.shape[0], -1, d.shape[-1]).transpose(1, 2)   # (B, C, ...)
                    per_sample = d.reshape(d.shape[0], d.shape[1], -1).sum(-1)                 # (B, C)
                    onehot = torch.nn.functional.one_hot(state["group"], G).double()           # (B, G)
                    cur[index[n]] = ((onehot.T.to(d.device) @ per_sample).cpu(),
                                     (onehot.sum(0).to(d.device) * (d[0, 0].numel())).cpu())
                return out

        device = graph.example_inputs[0].device
        size = self.batch_size if graph.dynamic_batch else int(graph.example_inputs[0].shape[0])
        batches = [b for b in cs.batches(size) if graph.dynamic_batch or b[0].shape[0] == size]
        mine = dist.my_batches(batches)   # batch b on rank b % world_size; sums added in batch order below

        def measure() -> dict:
            it = mine
            if ctx.progress:
                from tqdm import tqdm

                it = tqdm(mine, desc="bias_correct", unit="batch", leave=False)
            interp = Measure(gm, garbage_collect_values=False)
            out = {}
            with torch.no_grad():
                for b, (x, t) in it:
                    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(dist.batch_seed(self.seed, b)))
                    state["group"] = table[t.cpu()] if table is not None else torch.zeros(len(t), dtype=torch.long)
                    cur.clear()
                    interp.run(x.to(device), t.to(device), noise.to(device))
                    out[b] = dict(cur)
            return out

        per_batch = dist.gather_batches("bias_correct", measure)
        sums = {n: 0.0 for n in layers}
        counts = {n: 0 for n in layers}
        for part in per_batch.values():
            for n, i in index.items():
                sums[n] = sums[n] + part[i][0].to(device)
                counts[n] = counts[n] + part[i][1].to(device)
        shifts = []
        corrected = {}   # original bias target (or "<layer>:no-bias") -> its corrected buffer, for the artifact
        tables, table_names = {}, {}
        samples = torch.bincount(table[cs.t.cpu()], minlength=G) if table is not None else None
        for i, (n, w) in enumerate(layers.items()):
            err = sums[n].sum(0) / counts[n].sum().clamp(min=1)
            b = n.args[2] if len(n.args) > 2 else None
            old = _attr(gm, str(b.target)).detach() if isinstance(b, fx.Node) else torch.zeros(err.shape, dtype=w.dtype, device=w.device)
            new = (old.double() - err.to(old.device)).to(old.dtype)
            name = f"ptq4dm_bc_{i}"
            gm.register_buffer(name, new)
            corrected[str(b.target) if isinstance(b, fx.Node) else f"{n.name}:no-bias"] = name
            with g.inserting_before(n):
                nb = g.get_attr(name)
            nb.meta[ROLE] = "quant"
            nb.meta["val"] = new
            args = list(n.args) + [None] * max(0, 3 - len(n.args))
            args[2] = nb
            n.args = tuple(args)
            if G > 1:   # the rest, per group; thin groups' rows stay 0
                per_group = sums[n] / counts[n].clamp(min=1)[:, None] - err[None]
                per_group[samples.to(per_group.device) < self.min_samples] = 0
                tables[n] = (f"ptq4dm_bc_{i}_groups", (-per_group).to(new.dtype))
                table_names[str(b.target) if isinstance(b, fx.Node) else f"{n.name}:no-bias"] = tables[n][0]
            scale = float(old.abs().mean()) if old.numel() else 0.0
            shifts.append({"layer": n.name, "mean_abs_shift": float(err.abs().mean()), "max_abs_shift": float(err.abs().max()),
                           "bias_mean_abs": scale})
        if tables:
            insert_group_tables(graph, tables, table)
        g.eliminate_dead_code()
        gm.recompile()
        graph.meta["bias_corrected"] = corrected
        graph.meta["bias_correct_tables"] = table_names   # original bias target -> its (G, C) table buffer
        graph.meta["bias_correct_groups"] = G
        ctx.results["bias_correct"] = {"layers": len(shifts), "samples": int(cs.x.shape[0]), "groups": G,
                                       "samples_per_group": samples.tolist() if samples is not None else None,
                                       "shifts": shifts}


def insert_group_tables(graph: StepGraph, tables: dict, group_of_t: torch.Tensor) -> None:
    """After each layer node ``n`` of ``tables`` ({n: (buffer name, (G, C) table)}), add the row of
    the table for the group of each sample's t: ``y + table[group_of_t[t]]``, broadcast over the
    spatial positions (a conv's NCHW output) or the tokens (a linear's (..., C) output).

    ``bias_correct{groups>1}`` builds the graph this way, and ``artifact.load`` rebuilds it from the
    stored tables. The new nodes carry ROLE "quant"; ``lower`` keeps them as float adds.
    """
    g, gm = graph.graph, graph.gm
    gm.register_buffer("ptq4dm_bc_group_of_t", group_of_t.to(graph.example_inputs[0].device))
    t_node = graph.placeholders()[1]
    with g.inserting_after(t_node):
        tab = g.get_attr("ptq4dm_bc_group_of_t")
    with g.inserting_after(tab):
        group_node = g.call_function(aten.index.Tensor, (tab, [t_node]))
    tab.meta[ROLE] = group_node.meta[ROLE] = "quant"
    for n, (name, table) in tables.items():
        gm.register_buffer(name, table)
        conv = n.target is not aten.linear.default
        with g.inserting_before(n.next):   # right after the layer
            gt = g.get_attr(name)
            rows = g.call_function(aten.index.Tensor, (gt, [group_node]))                  # (B, C)
            rank = n.meta["val"].dim() if "val" in n.meta else (4 if conv else 2)
            c = int(table.shape[1])
            shape = [-1, c] + [1] * (rank - 2) if conv else [-1] + [1] * (rank - 2) + [c]
            view = g.call_function(aten.view.default, (rows, shape))
            add = g.call_function(aten.add.Tensor, (n, view))
        n.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        for m in (gt, rows, view, add):
            m.meta[ROLE] = "quant"
        if "val" in n.meta:
            add.meta["val"] = n.meta["val"]
