"""decompose_attention: SDPA -> matmul, scale, softmax, matmul (so q, k, v and the softmax
output become separate tensors that ``mark`` can quantize).

reads:  aten.scaled_dot_product_attention nodes (no mask, no dropout, not causal)
writes: replaces each by aten.matmul(q, k^T) * scale -> aten.softmax -> aten.matmul(P, v);
        the new matmul nodes carry ``ptq4dm.attn`` = "qk" | "pv" in meta.
Numerics equal SDPA's math path up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import ROLE, StepGraph

from .base import PassContext, register_pass

aten = torch.ops.aten
ATTN = "ptq4dm.attn"


def _propagate_vals(nodes) -> None:
    """meta['val'] of the new nodes from their inputs' fake values (later passes read shapes and
    dtypes there); left unset if an input has none."""
    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    for nd in nodes:
        args = [val(a) for a in nd.args]
        if any(isinstance(a, fx.Node) and not isinstance(val(a), torch.Tensor) for a in nd.args):
            return
        nd.meta["val"] = nd.target(*args)


@register_pass
@dataclass
class DecomposeAttention:
    name = "decompose_attention"
    reads = "aten.scaled_dot_product_attention nodes"
    writes = "matmul/softmax/matmul subgraphs tagged meta['ptq4dm.attn']"
    preserves_semantics = False  # equal up to float rounding, not bit-exact

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        g = graph.graph
        count = 0
        for n in list(g.nodes):
            if n.op != "call_function" or n.target is not aten.scaled_dot_product_attention.default:
                continue
            q, k, v = n.args[:3]
            kw = dict(zip(("attn_mask", "dropout_p", "is_causal"), n.args[3:6]))
            kw.update(n.kwargs)
            if kw.get("attn_mask") is not None or kw.get("dropout_p", 0.0) or kw.get("is_causal", False):
                ctx.results.setdefault("unsupported", []).append((n.name, "sdpa with mask/dropout/causal: kept"))
                continue
            scale = kw.get("scale")
            d = q.meta["val"].shape[-1] if "val" in q.meta else None
            if scale is None:
                if d is None:
                    continue
                scale = 1.0 / math.sqrt(int(d))
            with g.inserting_before(n):
                kt = g.call_function(aten.transpose.int, (k, -2, -1))
                s = g.call_function(aten.matmul.default, (q, kt))
                s2 = g.call_function(aten.mul.Tensor, (s, float(scale)))
                p = g.call_function(aten.softmax.int, (s2, -1))
                o = g.call_function(aten.matmul.default, (p, v))
            for new in (kt, s, s2, p, o):
                new.meta[ROLE] = n.meta.get(ROLE, "unet")
                new.meta["nn_module_stack"] = n.meta.get("nn_module_stack", {})
            s.meta[ATTN], o.meta[ATTN] = "qk", "pv"
            _propagate_vals((kt, s, s2, p, o))
            n.replace_all_uses_with(o)
            g.erase_node(n)
            count += 1
        ctx.results["decompose_attention"] = {"decomposed": count}
