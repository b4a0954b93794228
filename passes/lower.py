"""lower: the fake-quant graph -> int8 ops (backends/ops.py).

reads:  ``ptq4dm.fake_quant`` nodes feeding conv2d / linear / attention matmuls; fake-quantized
        weight buffers and their qparams (graph.meta['qparams'])
writes: ``ptq4dm.qconv2d`` / ``ptq4dm.qlinear`` (int8 weights packed once, as buffers
        ``ptq4dm_w8_<i>``) and ``ptq4dm.qmatmul``; activation fake-quant nodes that feed them are
        folded into the op (it quantizes its own input with the same range). Ops it cannot lower
        (dilation, groups, uneven stride / padding) stay fake-quant and are listed in
        ``ctx.results['lower']['kept']``.

The lowered graph equals the fake-quant graph up to float rounding: the integer products are
exact (int32 accumulation) where the float graph rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.backends import ops  # noqa: F401  (registers torch.ops.ptq4dm.q*)
from ptq4dm.ir.graph import ROLE, StepGraph
from ptq4dm.ir.quant import quantize

from .base import PassContext, register_pass
from .observe import QTENSOR

aten = torch.ops.aten
FQ = torch.ops.ptq4dm.fake_quant.default


def _fq_parts(node):
    """(source, scale, zp, qmin, qmax) of a per-tensor / per-sample fake_quant node, else None."""
    if not isinstance(node, fx.Node) or node.target is not FQ:
        return None
    src, s, z, qmin, qmax = node.args[:5]
    axis = node.args[5] if len(node.args) > 5 else None
    if axis not in (None, 0):
        return None
    if axis == 0 and not (isinstance(s, fx.Node) and s.target is aten.index.Tensor):
        return None  # axis 0 is only the per-sample (per-timestep) form here
    return src, s, z, qmin, qmax


def _uniform(v, n=2):
    v = list(v) if isinstance(v, (list, tuple)) else [v] * n
    return v[0] if all(x == v[0] for x in v) else None


@register_pass
@dataclass
class Lower:
    name = "lower"
    reads = "fake_quant nodes feeding conv2d / linear / attention matmuls; fake-quantized weights; qparams"
    writes = "ptq4dm.qconv2d / qlinear / qmatmul nodes with packed int8 weights; ctx.results['lower']"
    preserves_semantics = False

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        g, gm = graph.graph, graph.gm
        qparams = graph.meta.get("qparams") or {}
        counts = {"qconv2d": 0, "qlinear": 0, "qmatmul": 0}
        kept = []
        i = 0
        for n in list(g.nodes):
            if n.op != "call_function":
                continue
            if n.target in (aten.conv2d.default, aten.linear.default):
                x_parts = _fq_parts(n.args[0])
                w = n.args[1]
                qt = w.meta.get(QTENSOR) if isinstance(w, fx.Node) else None
                if x_parts is None or qt is None or qt.key not in qparams:
                    continue
                wqp = qparams[qt.key]
                if wqp.qmin < -128 or wqp.qmax > 127:
                    kept.append((n.name, "weights wider than 8 bits"))
                    continue
                bias = n.args[2] if len(n.args) > 2 else None
                if n.target is aten.conv2d.default:
                    stride = _uniform(n.args[3] if len(n.args) > 3 else 1)
                    padding = _uniform(n.args[4] if len(n.args) > 4 else 0)
                    dilation = _uniform(n.args[5] if len(n.args) > 5 else 1)
                    groups = n.args[6] if len(n.args) > 6 else 1
                    if stride is None or padding is None or dilation != 1 or groups != 1 or not isinstance(padding, int):
                        kept.append((n.name, "conv with dilation / groups / uneven stride or padding"))
                        continue
                w_float = getattr(gm, str(w.target))
                w8 = quantize(w_float.float(), wqp, torch.int8)
                w8_name, ws_name = f"ptq4dm_w8_{i}", f"ptq4dm_w8_{i}_scale"
                gm.register_buffer(w8_name, w8)
                gm.register_buffer(ws_name, wqp.scale.float().clone())
                src, s, z, qmin, qmax = x_parts
                with g.inserting_before(n):
                    w8_node, ws_node = g.get_attr(w8_name), g.get_attr(ws_name)
                    if n.target is aten.conv2d.default:
                        new = g.call_function(torch.ops.ptq4dm.qconv2d.default,
                                              (src, s, z, w8_node, ws_node, bias, stride, padding, qmin, qmax))
                        counts["qconv2d"] += 1
                    else:
                        new = g.call_function(torch.ops.ptq4dm.qlinear.default, (src, s, z, w8_node, ws_node, bias, qmin, qmax))
                        counts["qlinear"] += 1
                for m in (w8_node, ws_node, new):
                    m.meta[ROLE] = "quant"
                new.meta.update({k: v for k, v in n.meta.items() if k != ROLE})
                new.meta[ROLE] = n.meta.get(ROLE, "unet")
                n.replace_all_uses_with(new)
                g.erase_node(n)
                i += 1
            elif n.target is aten.matmul.default:
                a, b = _fq_parts(n.args[0]), _fq_parts(n.args[1])
                if a is None or b is None or a[3] != b[3] or a[4] != b[4]:
                    continue
                with g.inserting_before(n):
                    new = g.call_function(torch.ops.ptq4dm.qmatmul.default, (a[0], a[1], a[2], b[0], b[1], b[2], a[3], a[4]))
                new.meta.update(n.meta)
                n.replace_all_uses_with(new)
                g.erase_node(n)
                counts["qmatmul"] += 1
        g.eliminate_dead_code()
        for name in [b for b, _ in gm.named_buffers() if b.startswith("ptq4dm_wq_")]:
            if not any(nd.op == "get_attr" and nd.target == name for nd in g.nodes):
                delattr(gm, name)
        ctx.results["lower"] = {"counts": counts, "kept": kept}
