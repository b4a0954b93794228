"""lower: the fake-quant graph -> int8 execution, by backend (``lower{backend=auto|x86|triton}``).

backend=x86 (the default on the CPU): backends/x86.py writes PT2E's quantize / dequantize form
that torch.compile (Inductor, freezing) turns into oneDNN int8 convs and linears; run it
through ``ptq4dm.compile_step``. backend=triton (the default on CUDA), described below: our own
int8 ops, Triton kernels on CUDA and the integer-exact reference on the CPU (the tests' oracle).

reads:  ``ptq4dm.fake_quant`` nodes feeding conv2d / linear / attention matmuls; fake-quantized
        weight buffers and their qparams (graph.meta['qparams']); a residual ``add`` right after
        a conv / linear
writes: ``ptq4dm.quantize`` (float -> int8 codes, composite, so Inductor fuses it into the
        producer; conv inputs then go channels-last) feeding ``ptq4dm.qconv2d`` /
        ``ptq4dm.qlinear`` (int8 weights packed once as buffers ``ptq4dm_w8_<i>`` (K, N) with
        ``_sum`` and ``_scale``) and ``ptq4dm.qmatmul``; an ``add(op, r)`` whose only input from
        the op is that op is folded into its epilogue (``residual=r``); an op whose result goes,
        through shape-only views (view / reshape / transpose / permute / unsqueeze), to exactly
        one ``ptq4dm.quantize`` gets that quantizer's range (``out_scale`` / ``out_zp``) and
        returns int8 codes itself (requantizing epilogue: the attention's q / k / v linears feeding
        the int8 matmuls; the views then move int8). Ops it cannot lower
        (dilation, groups, uneven stride / padding) stay fake-quant and are listed in
        ``ctx.results['lower']['kept']``.

The lowered graph equals the fake-quant graph up to float rounding: the integer codes are the
ones fake_quant rounds to (same formula), the products are exact (int32 accumulation) where the
float graph rounds.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.backends import ops  # noqa: F401  (registers torch.ops.ptq4dm.q*)
from ptq4dm.backends.reference import pack_conv_weight
from ptq4dm.ir.annotations import ANNOTATION_KEY
from ptq4dm.ir.graph import ROLE, StepGraph
from ptq4dm.ir.quant import quantize

from .base import PassContext, register_pass
from .observe import QTENSOR, QTensor

aten = torch.ops.aten
FQ = torch.ops.ptq4dm.fake_quant.default
QUANT = torch.ops.ptq4dm.quantize.default
QCONV, QLINEAR, QMATMUL = torch.ops.ptq4dm.qconv2d.default, torch.ops.ptq4dm.qlinear.default, torch.ops.ptq4dm.qmatmul.default


def _fq_parts(node):
    """(source, scale, zp, qmin, qmax, axis) of a per-tensor / per-sample fake_quant node, else None."""
    if not isinstance(node, fx.Node) or node.target is not FQ:
        return None
    src, s, z, qmin, qmax = node.args[:5]
    axis = node.args[5] if len(node.args) > 5 else None
    if axis not in (None, 0):
        return None
    if axis == 0 and not (isinstance(s, fx.Node) and s.target is aten.index.Tensor):
        return None  # axis 0 is only the per-sample (per-timestep) form here
    if qmin < -128 or qmax > 127:
        return None  # wider than int8: stays fake-quant
    return src, s, z, qmin, qmax, axis


def _same_shape(a: fx.Node, b) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val") if isinstance(b, fx.Node) else None
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return False
    return va.dim() == vb.dim() and [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def _residual(n: fx.Node):
    """(add node, the other operand) when n's only use is ``add(n, r)`` / ``add(r, n)`` with r of
    n's shape (no broadcasting, no alpha), else None."""
    users = list(n.users)
    if len(users) != 1:
        return None
    u = users[0]
    if u.op != "call_function" or u.target is not aten.add.Tensor or u.kwargs or len(u.args) != 2:
        return None
    other = u.args[1] if u.args[0] is n else u.args[0]
    if other is n or not _same_shape(n, other) or not _same_shape(n, u):
        return None
    return u, other


# shape-only ops the int8 codes may travel through between an op and its consumer's quantize
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.unsqueeze.default}


def _requant_target(n: fx.Node):
    """(chain of view nodes, the quantize node) when n's result reaches exactly one per-tensor
    or per-sample int8 ``ptq4dm.quantize`` through single-use views, else None. A per-sample
    range needs dim 0 (the batch) left in place by every view."""
    chain, cur = [], n
    while True:
        users = list(cur.users)
        if len(users) != 1 or users[0].op != "call_function":
            return None
        u = users[0]
        if u.target is QUANT and u.args[0] is cur:
            break
        if u.target not in _VIEWS or u.args[0] is not cur:
            return None
        chain.append(u)
        cur = u
    axis = u.args[5] if len(u.args) > 5 else None
    if axis not in (None, 0) or u.args[3] < -128 or u.args[4] > 127:
        return None
    if axis == 0:
        b0 = n.meta.get("val")
        for c in chain:
            v = c.meta.get("val")
            if not isinstance(v, torch.Tensor) or not isinstance(b0, torch.Tensor) or str(v.shape[0]) != str(b0.shape[0]):
                return None
            if c.target is aten.transpose.int and 0 in (c.args[1] % v.dim(), c.args[2] % v.dim()):
                return None
            if c.target is aten.permute.default and c.args[1][0] % v.dim() != 0:
                return None
    return chain, u


def _hoist(values, before: fx.Node) -> None:
    """Move the nodes computing ``values`` (and what they need) that come after ``before`` to just
    before it, keeping their order: a consumer's quantizer range, computed late, made available
    to the producer's epilogue."""
    order = {nd: i for i, nd in enumerate(before.graph.nodes)}
    limit, late, stack = order[before], set(), [v for v in values if isinstance(v, fx.Node)]
    while stack:
        nd = stack.pop()
        if order[nd] > limit and nd not in late:
            late.add(nd)
            stack.extend(a for a in nd.all_input_nodes)
    for nd in sorted(late, key=order.__getitem__):
        before.prepend(nd)


def split_cat_convs(graph: StepGraph, qparams: dict) -> list[str]:
    """conv(cat([fq(a), fq(b), ...], 1), W, bias) -> conv(fq(a), W[:, :Ca], bias) + conv(fq(b), W[:, Ca:]) + ...

    A `cat` whose parts carry their own quantizers (``QuantPolicy.split_cat``) has no single int8
    scale; split along the input channels, each part is an ordinary quantized conv (one activation
    scale, the weight's per-output-channel scales unchanged, so the weight codes are the original
    ones sliced), which both backends lower, and each add after the first is the next conv's
    residual epilogue. A part quantized wider than int8 (a widened activation) keeps its own conv
    in float, reported like any other; the other parts still run int8. Exact in real arithmetic;
    in float the sum is reassociated. Returns the names of the convs split."""
    g, gm = graph.graph, graph.gm
    done = []
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not aten.conv2d.default:
            continue
        cat, w = n.args[0], n.args[1]
        if not isinstance(cat, fx.Node) or cat.target is not aten.cat.default or len(cat.users) != 1:
            continue
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        qt = w.meta.get(QTENSOR) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        vals = [p.meta.get("val") if isinstance(p, fx.Node) else None for p in parts]
        if (dim not in (1, -3) or qt is None or qt.key not in qparams or qparams[qt.key].axis not in (0, None)
                or not all(isinstance(p, fx.Node) and p.target is FQ for p in parts) or not all(isinstance(v, torch.Tensor) for v in vals)):
            continue
        wv = getattr(gm, str(w.target))
        widths = [int(v.shape[1]) for v in vals]
        if sum(widths) != wv.shape[1]:
            continue
        total, start = None, 0
        rest = tuple(n.args[3:])
        bias = n.args[2] if len(n.args) > 2 else None
        for j, (part, c) in enumerate(zip(parts, widths)):
            name = f"{w.target}_part{j}"
            gm.register_buffer(name, wv[:, start:start + c].contiguous())
            start += c
            key = f"{qt.key}#part{j}"
            qparams[key] = qparams[qt.key]
            with g.inserting_before(n):
                wj = g.get_attr(name)
                conv = g.call_function(aten.conv2d.default, (part, wj, bias if j == 0 else None, *rest))
                total = conv if total is None else g.call_function(aten.add.Tensor, (conv, total))
            wj.meta.update({k: v for k, v in w.meta.items() if k != "val"})
            wj.meta[QTENSOR] = QTensor(key, qt.consumer, qt.source, qt.spec)
            for m in (conv, total):
                m.meta.update({k: v for k, v in n.meta.items() if k != ANNOTATION_KEY})
        n.replace_all_uses_with(total)
        g.erase_node(n)
        g.erase_node(cat)
        done.append(n.name)
    if done:
        g.lint()
        gm.recompile()
    return done


def _flag(v):
    """A pass option from the pipeline string or Python: "auto" stays, "true" / "false" become bools."""
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _uniform(v, n=2):
    v = list(v) if isinstance(v, (list, tuple)) else [v] * n
    return v[0] if all(x == v[0] for x in v) else None


@register_pass
@dataclass
class Lower:
    name = "lower"
    reads = "fake_quant nodes feeding conv2d / linear / attention matmuls; fake-quantized weights; qparams"
    writes = ("ptq4dm.quantize + ptq4dm.qconv2d / qlinear / qmatmul nodes with packed int8 weights, residual adds "
              "fused; ctx.results['lower']")
    preserves_semantics = False

    backend: str = "auto"       # auto (the graph's device: cuda -> triton, cpu -> x86) | x86 | triton
    fuse_residual: bool = True
    fuse_requant: bool = True
    min_k: int = 32             # x86 cost rule: int8 only for >= min_k reduction elements ...
    min_n: int = 16             # ... and >= min_n output channels
    weight_bits: str = "auto"   # x86: auto (8 with VNNI, 7 without: see backends/x86.py), 7 or 8
    split16: str = "auto"       # x86: a conv / linear with a 16-bit input as two int8 ops (high / low byte); auto: not on AMX CPUs
    drop_wide: str = "bf16"     # x86: such a layer kept in float (split16 off) reads its input unquantized: bf16 (in int8-mixed-bf16 calls only, where a 16-bit grid is finer than bf16 and only its clamp is lost), true (always: not exact), false
    fuse_sum: bool = False      # x86: residual adds into the int8 convs (oneDNN sum post-op; measured no faster on AMX, off)
    fold_tables: bool = True    # x86: bias_correct's per-group tables into the biases (one group of steps per batch)
    fold_time: bool = True      # x86: the time-embedding path (values of t alone) folded into per-timestep tables
    gn_channels_last: bool = True   # x86: GroupNorm as channel-vectorized reductions (ptq4dm.group_norm_cl)
    mixed_bf16: str = "auto"    # x86: int8-mixed-bf16 (auto: where the CPU has AVX-512 BF16 / AMX, for calls of >= 4 GMAC), true, false

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        g, gm = graph.graph, graph.gm
        qparams = dict(graph.meta.get("qparams") or {})   # split_cat_convs adds the weight slices' keys
        backend = self.backend
        if backend == "auto":
            backend = "triton" if graph.example_inputs[0].is_cuda else "x86"
        if backend not in ("x86", "triton"):
            raise ValueError(f"lower: unknown backend {self.backend!r}; choose auto, x86 (CPU: Inductor + oneDNN "
                             f"int8) or triton (the ptq4dm int8 ops: Triton on CUDA, the int64 reference on CPU)")
        if graph.meta.get("error_feedback"):
            raise ValueError("lower: this graph has error_feedback, whose residual is Python-side chain state that "
                             "neither backend compiles; lower the graph without it (drop error_feedback from the "
                             "pipeline) or sample the fake-quant graph")
        mixed = str(self.mixed_bf16).lower()   # checked before the graph is touched
        if mixed not in ("auto", "true", "false"):
            raise ValueError(f"lower: mixed_bf16 must be auto, true or false, got {self.mixed_bf16!r}")
        graph.meta["lowered_backend"] = backend
        macs = None
        if backend == "x86" and mixed == "auto":
            from ptq4dm.backends.x86 import has_bf16, step_macs_per_sample

            if has_bf16():   # counted on the float ops, before they are rewritten
                macs = step_macs_per_sample(graph)
        split = split_cat_convs(graph, qparams)
        if backend == "x86":
            from ptq4dm.backends.x86 import fold_time_path, lower_x86

            # first, on the fake-quant graph: the tables then hold the simulated values of t alone
            time_path = fold_time_path(graph) if _flag(self.fold_time) else None
            ctx.results["lower"] = {"backend": "x86", "split_cat": split, **lower_x86(graph, qparams, self.min_k, self.min_n,
                                                                  self.weight_bits if self.weight_bits == "auto" else int(self.weight_bits),
                                                                  _flag(self.split16), _flag(self.drop_wide))}
            if time_path is not None:
                ctx.results["lower"]["time_path"] = time_path
            if _flag(self.fuse_sum):
                from ptq4dm.backends.x86 import FUSE_SUM

                gm.meta[FUSE_SUM] = True
            if self.fold_tables:
                from ptq4dm.backends.x86 import fold_group_tables

                ctx.results["lower"]["folded_tables"] = fold_group_tables(graph)
            if _flag(self.gn_channels_last):
                from ptq4dm.backends.x86 import group_norm_channels_last

                ctx.results["lower"]["group_norms"] = group_norm_channels_last(graph)
            min_batch = 1
            if mixed == "auto":
                from ptq4dm.backends.x86 import MIXED_BF16_MIN_MACS, has_bf16

                mixed = "true" if has_bf16() else "false"
                if macs is not None:
                    # a batch-aware cost rule: autocast only where a call has the work to repay its casts
                    min_batch = max(1, math.ceil(MIXED_BF16_MIN_MACS / max(macs, 1.0)))
                    ctx.results["lower"]["macs_per_sample"] = macs
            ctx.results["lower"]["mixed_bf16"] = mixed == "true"
            if mixed == "true":
                from ptq4dm.backends.x86 import enable_mixed_bf16

                enable_mixed_bf16(graph, min_batch)
                ctx.results["lower"]["mixed_bf16_min_batch"] = min_batch
            return
        counts = {"qconv2d": 0, "qlinear": 0, "qmatmul": 0, "residual_fused": 0, "requant_fused": 0}
        kept = []
        i = 0

        def quantize_node(parts, channels_last=False):
            src, s, z, qmin, qmax, axis = parts
            q = g.call_function(QUANT, (src, s, z, qmin, qmax, axis))
            if channels_last:
                q = g.call_function(aten.clone.default, (q,), {"memory_format": torch.channels_last})
            return q

        def out_dtype(n):
            v = n.meta.get("val")
            return v.dtype if isinstance(v, torch.Tensor) else torch.float32

        for n in list(g.nodes):
            if n.op != "call_function":
                continue
            if n.target in (aten.conv2d.default, aten.linear.default):
                x_parts = _fq_parts(n.args[0])
                w = n.args[1]
                qt = w.meta.get(QTENSOR) if isinstance(w, fx.Node) else None
                if x_parts is None or qt is None or qt.key not in qparams:
                    x = n.args[0]
                    if isinstance(x, fx.Node) and x.target is FQ and (x.args[3] < -128 or x.args[4] > 127):
                        kept.append((n.name, f"input quantized to [{x.args[3]}, {x.args[4]}], wider than int8"))
                    continue
                wqp = qparams[qt.key]
                if wqp.qmin < -128 or wqp.qmax > 127:
                    kept.append((n.name, "weights wider than 8 bits"))
                    continue
                bias = n.args[2] if len(n.args) > 2 else None
                is_conv = n.target is aten.conv2d.default
                if is_conv:
                    stride = _uniform(n.args[3] if len(n.args) > 3 else 1)
                    padding = _uniform(n.args[4] if len(n.args) > 4 else 0)
                    dilation = _uniform(n.args[5] if len(n.args) > 5 else 1)
                    groups = n.args[6] if len(n.args) > 6 else 1
                    if stride is None or padding is None or dilation != 1 or groups != 1 or not isinstance(padding, int):
                        kept.append((n.name, "conv with dilation / groups / uneven stride or padding"))
                        continue
                wq = quantize(getattr(gm, str(w.target)).float(), wqp, torch.int8)
                wp = (pack_conv_weight(wq) if is_conv else wq).T.contiguous()           # (K, N)
                names = {"wp": f"ptq4dm_w8_{i}", "sum": f"ptq4dm_w8_{i}_sum", "scale": f"ptq4dm_w8_{i}_scale"}
                gm.register_buffer(names["wp"], wp)
                gm.register_buffer(names["sum"], wp.int().sum(0))
                gm.register_buffer(names["scale"], wqp.scale.float().clone())
                fused = _residual(n) if self.fuse_residual else None
                anchor = fused[0] if fused else n   # the add's operands all exist before the add
                residual = fused[1] if fused else None
                with g.inserting_before(anchor):
                    wn = {k: g.get_attr(v) for k, v in names.items()}
                    xq = quantize_node(x_parts, channels_last=is_conv)
                    s, z = x_parts[1], x_parts[2]
                    if is_conv:
                        kh, kw = wq.shape[2], wq.shape[3]
                        new = g.call_function(QCONV, (xq, s, z, wn["wp"], wn["sum"], wn["scale"], bias, residual,
                                                      kh, kw, stride, padding, out_dtype(n)))
                        counts["qconv2d"] += 1
                    else:
                        new = g.call_function(QLINEAR, (xq, s, z, wn["wp"], wn["sum"], wn["scale"], bias, residual,
                                                        out_dtype(n)))
                        counts["qlinear"] += 1
                for m in list(wn.values()) + [new]:
                    m.meta[ROLE] = "quant"
                new.meta.update({k: v for k, v in (fused[0] if fused else n).meta.items() if k != ROLE})
                new.meta[ROLE] = n.meta.get(ROLE, "unet")
                if fused:
                    fused[0].replace_all_uses_with(new)
                    g.erase_node(fused[0])
                    counts["residual_fused"] += 1
                else:
                    n.replace_all_uses_with(new)
                g.erase_node(n)
                i += 1
            elif n.target is aten.matmul.default:
                a, b = _fq_parts(n.args[0]), _fq_parts(n.args[1])
                if a is None or b is None:
                    continue
                with g.inserting_before(n):
                    new = g.call_function(QMATMUL, (quantize_node(a), a[1], a[2], quantize_node(b), b[1], b[2], out_dtype(n)))
                new.meta.update(n.meta)
                n.replace_all_uses_with(new)
                g.erase_node(n)
                counts["qmatmul"] += 1
        g.eliminate_dead_code()   # the replaced fake_quant nodes: gone before counting users
        if self.fuse_requant:
            for n in list(g.nodes):
                if n.op == "call_function" and n.target in (QCONV, QLINEAR) and (hit := _requant_target(n)):
                    chain, q = hit
                    _hoist(q.args[1:3], n)
                    n.args = tuple(n.args) + (q.args[1], q.args[2], q.args[3], q.args[4])
                    for m in [n] + chain:   # these now carry int8 codes
                        if isinstance(m.meta.get("val"), torch.Tensor):
                            m.meta["val"] = m.meta["val"].to(torch.int8)
                    q.replace_all_uses_with(chain[-1] if chain else n)
                    g.erase_node(q)
                    counts["requant_fused"] += 1
        g.eliminate_dead_code()
        for name in [b for b, _ in gm.named_buffers() if b.startswith("ptq4dm_wq_")]:
            if not any(nd.op == "get_attr" and nd.target == name for nd in g.nodes):
                delattr(gm, name)
        gm.recompile()
        ctx.results["lower"] = {"backend": "triton", "counts": counts, "kept": kept, "split_cat": split}
