"""fakequant: the simulated quantized graph (the quality reference for lowering).

reads:  graph.meta['qparams']; observer nodes; weight annotations
writes: each observer node -> ``fake_quant(x, scale, zero_point, qmin, qmax)`` (scale and zero
        point as buffers ``ptq4dm_qp_<i>_scale`` / ``_zp`` on the module); each quantized weight
        -> a buffer holding its fake-quantized value, read by the conv / linear instead.
        Nodes keep ``meta['ptq4dm.qtensor']``; observers are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq4dm.ir.graph import ROLE, StepGraph
from ptq4dm.ir.quant import fake_quant

from .base import PassContext, register_pass
from .observe import QTENSOR, qtensors
from .solve import getattr_path


@register_pass
@dataclass
class FakeQuant:
    name = "fakequant"
    reads = "graph.meta['qparams']; observer nodes; weight annotations"
    writes = "fake_quant call nodes (activations), fake-quantized weight buffers; removes observers"
    preserves_semantics = False

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        g, gm = graph.graph, graph.gm
        qparams = graph.meta.get("qparams")
        if not qparams:
            raise ValueError("fakequant needs solved qparams: run 'solve' first")
        nodes = {n.name: n for n in g.nodes}
        i = 0
        group_of_t = None  # shared node: the timestep group of each sample, gathered from t
        # activations: observers -> fake_quant
        for n in list(g.nodes):
            if n.op != "call_module" or QTENSOR not in n.meta:
                continue
            qt = n.meta[QTENSOR]
            qp = qparams[qt.key]
            s_name, z_name = f"ptq4dm_qp_{i}_scale", f"ptq4dm_qp_{i}_zp"
            gm.register_buffer(s_name, qp.scale.float().clone())
            gm.register_buffer(z_name, qp.zero_point.clone())
            new_nodes = []
            if qp.groups:
                if group_of_t is None:
                    from .calibrate import group_table

                    gm.register_buffer("ptq4dm_group_of_t", group_table(graph.meta["sampler"], qp.groups))
                    t_node = graph.placeholders()[1]
                    with g.inserting_after(t_node):
                        table = g.get_attr("ptq4dm_group_of_t")
                    with g.inserting_after(table):
                        group_of_t = g.call_function(torch.ops.aten.index.Tensor, (table, [t_node]))
                    new_nodes += [table, group_of_t]
                with g.inserting_before(n):
                    s_tab, z_tab = g.get_attr(s_name), g.get_attr(z_name)
                    s = g.call_function(torch.ops.aten.index.Tensor, (s_tab, [group_of_t]))
                    z = g.call_function(torch.ops.aten.index.Tensor, (z_tab, [group_of_t]))
                    fq = g.call_function(torch.ops.ptq4dm.fake_quant.default, (n.args[0], s, z, qp.qmin, qp.qmax, 0))
                new_nodes += [s_tab, z_tab]
            else:
                with g.inserting_before(n):
                    s = g.get_attr(s_name)
                    z = g.get_attr(z_name)
                    fq = g.call_function(torch.ops.ptq4dm.fake_quant.default, (n.args[0], s, z, qp.qmin, qp.qmax, qp.axis))
            for new in (s, z, fq, *new_nodes):
                new.meta[ROLE] = "quant"
            fq.meta[QTENSOR] = qt
            if "val" in n.meta:
                fq.meta["val"] = n.meta["val"]
            n.replace_all_uses_with(fq)
            g.erase_node(n)
            target = str(n.target)
            if hasattr(gm, target):
                delattr(gm, target)
            i += 1
        # weights: a fake-quantized copy, once
        nw = 0
        for qt in qtensors(graph):
            if qt.spec.role != "weight" or qt.key not in qparams:
                continue
            consumer, src = nodes[qt.consumer], nodes[qt.source]
            qp = qparams[qt.key]
            w = getattr_path(gm, qt.source, graph).detach()
            name = f"ptq4dm_wq_{nw}"
            gm.register_buffer(name, fake_quant(w.float(), qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis).to(w.dtype))
            with g.inserting_before(consumer):
                wq = g.get_attr(name)
            wq.meta[ROLE] = "quant"
            wq.meta[QTENSOR] = qt
            wq.meta["ptq4dm.float_weight"] = str(src.target)   # read by bias_correct
            consumer.replace_input_with(src, wq)
            nw += 1
        g.eliminate_dead_code()
        ctx.results["fakequant"] = {"activations": i, "weights": nw}
