"""The x86 CPU backend: the fake-quant graph in PT2E's reference form, run by Inductor's oneDNN int8.

torch.compile already knows how to run int8 convolutions and linears on x86: with freezing on,
Inductor's quantization passes (``torch/_inductor/fx_passes/quantization.py``, extended by
``torchao/quantization/pt2e/inductor_passes/x86.py`` when torchao's X86InductorQuantizer is
imported) match

    dequantize_per_tensor(quantize_per_tensor(x))  ->  conv2d / linear  <-  dequantize_per_channel(w_int8)

and replace it by ``onednn.qconv_pointwise`` / ``onednn.qlinear_pointwise`` with the weight
prepacked once, folding a following SiLU / ReLU (unary post-op), a linear's residual add
(binary post-op) and a following ``quantize_per_tensor`` (the consumer's quantizer: the op then
writes uint8) into the kernel. This module writes that form from our solved qparams, as they
are: no re-calibration, no kernel of our own.

    activation  fake_quant(x, s, z, -128, 127)  ->  q = quantize_per_tensor(x, s, z + 128, 0, 255, uint8)
                                                    dequantize_per_tensor(q, s, z + 128, 0, 255, uint8)
    weight      the int8 codes of the fake-quantized weight (buffer ``ptq4dm_x86w_<i>``) with its
                per-output-channel scale -> dequantize_per_channel(w, scale, 0, axis 0, int8)

uint8 codes with zero point z + 128 are the same real values as our int8 codes with z
(``clamp(round(x / s) + z + 128, 0, 255) == clamp(round(x / s) + z, -128, 127) + 128``), so
the compiled graph computes what the fake-quant graph simulates, with exact int32 products.

A 16-bit input (an activation the sensitivity pass widened) is split into its codes' high and
low byte, two uint8 tensors whose dequantized sum is the fake-quantized value exactly, and the
conv / linear runs twice in int8 with the results added (``_split16``; ``split16=False`` keeps such
layers in float, the default on CPUs with AMX (``split16="auto"``), where one bf16 / fp32 conv on
AMX tiles beat the two int8 ops and the byte-splitting pass). Such a float layer reads its
16-bit input through ``ptq4dm.fake_quant_fp32_only`` (``drop_wide="bf16"``, the default): in fp32
calls that is the 16-bit fake-quant (the simulated values), in int8-mixed-bf16 calls the bf16 input
itself. A 16-bit grid is finer than bf16 (8 significant bits) for every value more than 256 steps
from zero, so there the fake-quant rounds back to the input, and all it would still do is clamp at
the calibrated range (the whole calibration set's) while costing a pass that writes a copy for the
conv to read: 1.14x of the step on the default model at batch 256 on an AMX CPU (docs/results.md).
``drop_wide=True`` reads the unquantized input in fp32 calls too (not exact: inputs beyond the
calibrated range are no longer clipped, 21 output steps off on a one-conv test); ``False`` keeps
the fake-quant in every call.

``lower{fuse_sum=true}`` adds an Inductor post-grad pass (``_fuse_qconv_residual_sum``) that puts a
ResNet block's residual add inside the int8 conv (oneDNN's sum post-op), which torchao's rewrite
does only for a quantized residual; exact in fp32, measured no faster on an AMX CPU, so off.

What stays in float (fake-quant, as simulated; each reported with its reason):
  * attention matmuls: oneDNN has no int8 batched matmul that Inductor lowers to; fake-quant
    fp32 matmuls compute exactly the simulated values;
  * inputs with a per-timestep range (the scale is a runtime tensor; Inductor's conv rewrite
    needs a constant);
  * convs / linears the cost rule keeps: fewer than ``min_k`` reduction elements
    (C_in * kh * kw) or fewer than ``min_n`` output channels (e.g. a 1-channel conv_in / conv_out),
    where quantize + oneDNN dispatch cost more than the float op saves.
Output quantizers (mean / variance / x_{t-1}) stay fake-quant: pointwise, fused by Inductor into
their neighbours. bias_correct's per-group tables are folded into the conv / linear biases
(``fold_group_tables``: the row of the batch's group of sampler steps added to the bias, exact
when the batch shares t, as in sampling; ``CompiledStep`` runs a batch that mixes groups group by
group). A linear over tokens ((B, L, C), attention's q / k / v / out) runs on its input viewed as
(B L, C), which Inductor's int8 rewrite matches whatever the input's memory layout.

int8-mixed-bf16 (``enable_mixed_bf16``, ``lower{mixed_bf16=auto}``: on where the CPU has bf16
instructions): ``CompiledStep`` runs the graph under bf16 autocast; the int8 kernels then write
bf16 and the float work between them moves half the bytes (measured 1.05-1.28x faster from batch 8
up on ddpm-cifar10 and from batch 64 on the default model), at the price of bf16 rounding against
the fake-quant graph. A call with little work loses more to autocast's casts than it saves (1.11x
slower on the default model at batch 1): under ``auto`` autocast is entered only for batches whose
multiply-accumulates reach ``MIXED_BF16_MIN_MACS`` (4 GMAC: the default model from batch 22,
ddpm-cifar10 from batch 1), a batch-aware cost rule that ``lower`` reports (``mixed_bf16_min_batch``).

``CompiledStep`` compiles with Inductor's C++ wrapper (``cpp_wrapper``): the ~100 kernel calls of a
step are made from C++, not Python, which a small model's small batches feel (docs/results.md, Speed).
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

aten = torch.ops.aten
FQ = torch.ops.ptq4dm.fake_quant.default
FQ_FP32_ONLY = torch.ops.ptq4dm.fake_quant_fp32_only.default


def _decomposed():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


def register_inductor_patterns() -> bool:
    """Make Inductor's x86 int8 rewrites available: torch's own, plus torchao's (importing its
    X86InductorQuantizer registers them). True when torchao's were registered."""
    _decomposed()
    try:
        with contextlib.redirect_stderr(None):
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
        return True
    except Exception:   # torchao missing or broken: torch's built-in patterns still apply
        return False


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_isa() -> dict:
    """The CPU model and the ISA flags that decide the int8 path (Linux /proc/cpuinfo; empty
    flags elsewhere)."""
    model, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import platform

    return {"cpu": model or platform.processor() or platform.machine(), "flags": [f for f in ISA_FLAGS if f in flags]}


def has_amx() -> bool:
    """AMX tiles (amx_int8 / amx_bf16): float convs run on bf16 tiles, fast enough that a 16-bit
    input's two int8 ops (split16) and their byte-splitting pass lose to one float conv (measured:
    docs/results.md, Speed)."""
    return bool(set(cpu_isa()["flags"]) & {"amx_int8", "amx_bf16"})


def has_vnni() -> bool:
    """VNNI (AVX-512 VNNI, AVX-VNNI or AMX): u8 x s8 products accumulate in int32. Without it oneDNN
    adds pairs of u8 x s8 products in int16 with saturation (vpmaddubsw), wrong beyond 32767."""
    return any(f in cpu_isa()["flags"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _const(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of a get_attr node (a scale / zero-point buffer), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _split16(g: fx.Graph, qd, src: fx.Node, scale: torch.Tensor, zero_point: int) -> tuple[fx.Node, fx.Node]:
    """A 16-bit activation as two uint8 tensors in PT2E form whose dequantized sum is the
    fake-quantized value exactly: codes c = clamp(round(x / s) + z, -32768, 32767) = 256 hi + lo
    with hi = floor(c / 256) in [-128, 127] and lo in [0, 255]; with z = 256 zh + zl (zl in [0, 255])

        dequantize(hi + 128, 256 s, zh + 128) + dequantize(lo, s, zl) = 256 s (hi - zh) + s (lo - zl) = s (c - z).

    A conv / linear is linear in its input, so conv(x_q) = conv(dq_hi) + conv(dq_lo): two oneDNN
    int8 ops with exact int32 sums (a VNNI CPU; without VNNI the weights are 7-bit as for 8-bit
    inputs) in place of one float op."""
    s = float(scale.reshape(()))
    inv = float(1.0 / scale.float().reshape(()))     # the fake-quant op's float32 1/s
    zl = zero_point % 256
    zh = (zero_point - zl) // 256
    c = g.call_function(aten.round.default, (g.call_function(aten.mul.Tensor, (src, inv)),))
    c = g.call_function(aten.clamp.default, (g.call_function(aten.add.Tensor, (c, float(zero_point))), -32768.0, 32767.0))
    hi = g.call_function(aten.floor.default, (g.call_function(aten.mul.Tensor, (c, 1.0 / 256)),))
    lo = g.call_function(aten.sub.Tensor, (c, g.call_function(aten.mul.Tensor, (hi, 256.0))))
    conv = torch.ops.prims.convert_element_type.default
    hi8 = g.call_function(conv, (g.call_function(aten.add.Tensor, (hi, 128.0)), torch.uint8))
    lo8 = g.call_function(conv, (lo, torch.uint8))
    dq_hi = g.call_function(qd.dequantize_per_tensor.default, (hi8, 256 * s, zh + 128, 0, 255, torch.uint8))
    dq_lo = g.call_function(qd.dequantize_per_tensor.default, (lo8, s, zl, 0, 255, torch.uint8))
    from ptq4dm.ir.graph import ROLE

    for m in (c, hi, lo, hi8, lo8, dq_hi, dq_lo):
        m.meta[ROLE] = "quant"
    return dq_hi, dq_lo


def _unflatten(g: fx.Graph, out: fx.Node, tokens: list, n_out: int) -> None:
    """``out`` (a linear run on (B L, K)) viewed back as (B, L, N) for its users."""
    from ptq4dm.ir.graph import ROLE

    with g.inserting_after(out):
        back = g.call_function(aten.reshape.default, (out, [-1, *tokens, int(n_out)]))
    out.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
    back.meta[ROLE] = "quant"


def lower_x86(graph, qparams: dict, min_k: int = 32, min_n: int = 16, weight_bits: int | str = "auto",
              split16: bool | str = "auto", drop_wide: bool | str = "bf16") -> dict:
    """Rewrite ``graph`` (a fake-quant StepGraph) in place into PT2E's reference form. Returns
    ``{"counts": {...}, "kept": [(node, reason), ...], "weight_bits": 8 | 7}``.

    ``weight_bits`` auto: 8 on a CPU with VNNI; 7 without, where oneDNN's int16 pair sums of
    u8 x s8 products saturate (255 * 127 * 2 > 32767, measured: up to 30% of an output's range):
    the 8-bit weight codes are requantized to [-64, 63] with twice the scale, so that
    255 * 64 * 2 <= 32767 and the int8 products are exact again (the graph then computes W7A8,
    not the simulated W8A8: reported, and measured in docs/results/details.md, "Lowering")."""
    if weight_bits == "auto":
        weight_bits = 8 if has_vnni() else 7
    if split16 == "auto":
        split16 = not has_amx()
    if split16 not in (True, False):
        raise ValueError(f"lower x86: split16 must be auto, true or false, got {split16!r}")
    if drop_wide not in (True, False, "bf16"):
        raise ValueError(f"lower x86: drop_wide must be bf16, true or false, got {drop_wide!r}")
    if weight_bits not in (7, 8):
        raise ValueError(f"lower x86: weight_bits must be auto, 7 or 8, got {weight_bits!r}")
    from ptq4dm.ir.graph import ROLE
    from ptq4dm.ir.quant import quantize
    from ptq4dm.passes.lower import _uniform
    from ptq4dm.passes.observe import QTENSOR

    qd = _decomposed()
    g, gm = graph.graph, graph.gm
    counts = {"qconv2d": 0, "qlinear": 0, "split16": 0}
    kept = []
    wide_of = {}   # fake_quant node -> its fake_quant_fp32_only twin (drop_wide=bf16)
    dq_of = {}   # (fake_quant node, flattened) -> its dequantize node(s), shared by every lowered consumer
    src_of = {}  # (fake_quant node, True) -> its input viewed as (tokens, channels)
    i = 0

    def weight_dq(buffers) -> fx.Node:
        """get_attr of the int8 codes, scales and zero points -> dequantize_per_channel (at the insert point)."""
        wn = [g.get_attr(nm) for nm in buffers]
        wdq = g.call_function(qd.dequantize_per_channel.default, (*wn, 0, -128, 127, torch.int8))
        for m in (*wn, wdq):
            m.meta[ROLE] = "quant"
        return wdq
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in (aten.conv2d.default, aten.linear.default):
            continue
        fq, w = n.args[0], n.args[1]
        qt = w.meta.get(QTENSOR) if isinstance(w, fx.Node) else None
        if not isinstance(fq, fx.Node) or fq.target is not FQ or qt is None or qt.key not in qparams:
            continue   # not quantized (kept in float by the policy): nothing to lower
        src, s, z, qmin, qmax = fq.args[:5]
        axis = fq.args[5] if len(fq.args) > 5 else None
        wqp = qparams[qt.key]
        sv, zv = _const(gm, s), _const(gm, z)
        is_conv = n.target is aten.conv2d.default
        wv = _const(gm, w)
        reason = None
        wide = (qmin, qmax) == (-32768, 32767)   # a 16-bit input: two int8 ops, high and low byte (split16)
        if axis is not None or sv is None or zv is None or sv.numel() != 1:
            reason = "input range per timestep (a runtime scale; Inductor's int8 rewrite needs a constant)"
        elif wide and not split16:
            reason = "input quantized to 16 bits (split16=false" + (": AMX CPU)" if has_amx() else ")")
        elif (qmin, qmax) != (-128, 127) and not wide:
            reason = f"input quantized to [{qmin}, {qmax}], neither 8 nor 16 bits"
        elif wqp.qmin < -128 or wqp.qmax > 127 or wqp.axis != 0 or not bool((wqp.zero_point == 0).all()):
            reason = "weights not 8-bit symmetric per output channel"
        elif is_conv and (len(n.args) > 6 and n.args[6] != 1 or _uniform(n.args[5] if len(n.args) > 5 else 1) != 1):
            reason = "conv with groups / dilation"
        else:
            k = wv[0].numel()
            if k < min_k or wv.shape[0] < min_n:
                reason = f"cost rule: {k} reduction elements x {wv.shape[0]} outputs (int8 when >= {min_k} x {min_n})"
        if reason:
            if wide and not split16 and drop_wide and reason.startswith("input quantized to 16"):
                if drop_wide == "bf16":   # the fake-quant in fp32 calls, the input itself in bf16 ones
                    if fq not in wide_of:
                        with g.inserting_after(fq):
                            wide_of[fq] = g.call_function(FQ_FP32_ONLY, fq.args, dict(fq.kwargs))
                        wide_of[fq].meta.update(fq.meta)
                    n.args = (wide_of[fq], *n.args[1:])
                    reason += "; reads its input unquantized in int8-mixed-bf16 calls (drop_wide=bf16)"
                else:
                    n.args = (src, *n.args[1:])   # the fake-quant node goes with its last reader (dead code)
                    reason += "; runs on its unquantized input (drop_wide)"
            kept.append((n.name, reason))
            continue
        wq = quantize(wv.float(), wqp, torch.int8)
        w_scale = wqp.scale.float().reshape(-1).clone()
        if weight_bits == 7:   # no VNNI: halve the codes (round half to even, as quantize does)
            wq = torch.clamp(torch.round(wq.float() / 2), -64, 63).to(torch.int8)
            w_scale = w_scale * 2
        names = (f"ptq4dm_x86w_{i}", f"ptq4dm_x86w_{i}_scale", f"ptq4dm_x86w_{i}_zp")
        gm.register_buffer(names[0], wq)
        gm.register_buffer(names[1], w_scale)
        gm.register_buffer(names[2], torch.zeros(wq.shape[0], dtype=torch.int64))
        scale, zp = float(sv), int(zv) + 128
        # a linear over tokens (B, L, K): quantized and run as (B L, K), then viewed back. On a
        # (B, L, K) input Inductor's int8 rewrite matched only when the input happened to be
        # contiguous; attention's transposed GroupNorm output is not, and its q / k / v became float
        # batched matmuls (measured: 12 of the default model's 16 linears)
        val = fq.meta.get("val")
        tokens = None
        if not is_conv and val is not None and val.dim() > 2 and all(type(d) is int for d in val.shape[1:]):
            tokens = [int(d) for d in val.shape[1:-1]]
        key = (fq, tokens is not None)
        if tokens is not None and key not in src_of:
            with g.inserting_after(fq):
                src_of[key] = g.call_function(aten.reshape.default, (src, [-1, int(val.shape[-1])]))
            src_of[key].meta[ROLE] = "quant"
        x_in = src_of.get(key, src)
        with g.inserting_before(n):
            if wide:
                if key not in dq_of:   # before the first consumer (graph order): in order, and before every later one
                    dq_of[key] = _split16(g, qd, x_in, sv, int(zv))
                wdq = weight_dq(names)
        if wide:
            hi, lo = dq_of[key]
            n.args = (hi, wdq, *n.args[2:])
            rest = list(n.args[2:])
            if rest:
                rest[0] = None   # the bias once
            # its own weight copy: Inductor's rewrite wants a weight dequantize with one consumer, and
            # would merge two dequantizes of one buffer (CSE)
            names2 = tuple(nm.replace(f"ptq4dm_x86w_{i}", f"ptq4dm_x86w_{i}_lo") for nm in names)
            for nm, nm2 in zip(names, names2):
                gm.register_buffer(nm2, getattr(gm, nm).clone())
            with g.inserting_before(n):
                wdq2 = weight_dq(names2)
            with g.inserting_after(n):
                n_lo = g.call_function(n.target, (lo, wdq2, *rest), dict(n.kwargs))
            with g.inserting_after(n_lo):
                total = g.call_function(aten.add.Tensor, (n, n_lo))
            n.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
            for m in (n_lo, total):
                m.meta.update({k: v for k, v in n.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
            if tokens is not None:
                _unflatten(g, total, tokens, wv.shape[0])
            counts["qconv2d" if is_conv else "qlinear"] += 2
            counts["split16"] += 1
            i += 1
            continue
        with g.inserting_before(n):
            if key not in dq_of:
                with g.inserting_after(x_in if tokens is not None else fq):
                    q = g.call_function(qd.quantize_per_tensor.default, (x_in, scale, zp, 0, 255, torch.uint8))
                with g.inserting_after(q):
                    dq_of[key] = g.call_function(qd.dequantize_per_tensor.default, (q, scale, zp, 0, 255, torch.uint8))
                q.meta[ROLE] = dq_of[key].meta[ROLE] = "quant"
            wdq = weight_dq(names)
        n.args = (dq_of[key], wdq, *n.args[2:])
        if tokens is not None:
            _unflatten(g, n, tokens, wv.shape[0])
        counts["qconv2d" if is_conv else "qlinear"] += 1
        i += 1
    g.eliminate_dead_code()
    for name in [b for b, _ in gm.named_buffers() if b.startswith("ptq4dm_wq_")]:
        if not any(nd.op == "get_attr" and nd.target == name for nd in g.nodes):
            delattr(gm, name)
    gm.recompile()
    return {"counts": counts, "kept": kept, "weight_bits": weight_bits}


def fold_group_tables(graph) -> int:
    """bias_correct's per-group tables folded into the conv / linear bias: ``layer(x, w, b) +
    table[group(t)]`` -> ``layer(x, w, b + table[group(t[0])])``. Exact when every sample of the
    batch is in one group of sampler steps, as in sampling (the batch shares t); the graph then
    asserts it (``_assert_async``) and ``CompiledStep`` splits a batch with mixed groups. Why: the
    table add after a layer costs a pass over its output and, after a linear, breaks oneDNN's
    binary (residual add) and output-quantize fusions: ddpm-cifar10 batch 8 ran 10% faster without
    the adds (docs/results.md, Speed). Returns the number of tables folded."""
    from ptq4dm.ir.graph import ROLE

    g, gm = graph.graph, graph.gm
    group = next((n for n in g.nodes if n.op == "call_function" and n.target is aten.index.Tensor
                  and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"
                  and n.args[0].target == "ptq4dm_bc_group_of_t"), None)
    if group is None:
        return 0
    layers = (aten.conv2d.default, aten.linear.default)
    folded, first = 0, None
    for add in list(g.nodes):
        if add.op != "call_function" or add.target is not aten.add.Tensor or len(add.args) != 2:
            continue
        y, view = add.args
        if not (isinstance(view, fx.Node) and view.target is aten.view.default
                and isinstance(view.args[0], fx.Node) and view.args[0].target is aten.index.Tensor
                and view.args[0].args[1] == [group] and isinstance(y, fx.Node)):
            continue
        tab = view.args[0].args[0]
        layer = y
        if y.target is aten.reshape.default and len(y.users) == 1:   # a token linear run flat (_unflatten)
            layer = y.args[0]
        if layer.target is aten.add.Tensor:   # split16: hi + lo, the bias is on the first of the two
            pair = layer.args
            layer = next((a for a in pair if isinstance(a, fx.Node) and a.target in layers
                          and len(a.args) > 2 and a.args[2] is not None), None)
            if layer is None:
                layer = next((a for a in pair if isinstance(a, fx.Node) and a.target in layers), None)
        if layer is None or layer.target not in layers or len(y.users) != 1:
            continue
        if first is None:   # the batch's group: that of its first sample; all must share it
            with g.inserting_after(group):
                first = g.call_function(aten.slice.Tensor, (group, 0, 0, 1))
            with g.inserting_after(first):
                eq = g.call_function(aten.eq.Tensor, (group, first))
            with g.inserting_after(eq):
                same = g.call_function(aten.all.default, (eq,))
            with g.inserting_after(same):
                chk = g.call_function(aten._assert_async.msg, (same, "ptq4dm lowered step: bias_correct's tables are "
                                      "folded into the biases for one group of sampler steps per batch; this batch "
                                      "mixes groups (run it per timestep, as sampling does, or lower with "
                                      "fold_tables=false)"))
            for m in (first, eq, same, chk):
                m.meta[ROLE] = "quant"
        with g.inserting_before(layer):
            tab_here = g.get_attr(str(tab.target))   # the table's get_attr follows the layer
            row = g.call_function(aten.view.default, (g.call_function(aten.index.Tensor, (tab_here, [first])), [-1]))
            bias = layer.args[2] if len(layer.args) > 2 else None
            new_bias = row if bias is None else g.call_function(aten.add.Tensor, (bias, row))
        for m in (tab_here, row, row.args[0], new_bias):
            m.meta[ROLE] = "quant"
        args = list(layer.args)
        if len(args) < 3:
            args.append(new_bias)
        else:
            args[2] = new_bias
        layer.args = tuple(args)
        add.replace_all_uses_with(y)
        g.erase_node(add)
        folded += 1
    g.eliminate_dead_code()
    gm.recompile()
    if folded:
        gm.meta["ptq4dm_group_of_t"] = "ptq4dm_bc_group_of_t"   # CompiledStep: split a batch that mixes groups
    return folded


def _group_norm_cl_impl(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float) -> torch.Tensor:
    """GroupNorm as reductions over positions with the channels innermost (the layout Inductor gives
    the conv outputs on x86): per-channel sums over positions are an outer reduction vectorized
    along the channels, then summed within each group; the group statistics are spread back to
    the channels by a reduction against a one-hot (G, C) matrix, which makes them a (N, C) buffer
    that the normalizing pass reads contiguously. Inductor's own GroupNorm runs a Welford loop per
    (sample, group) over a group's C/G channels at every position, with 4 / 8 / 12 of a vector's 16
    lanes in use on these models. Two passes (mean, then the centred sum of squares): as stable as
    Welford. fp32 arithmetic whatever x's dtype; the result in x's dtype, as ``group_norm``'s."""
    n_, c = x.shape[0], x.shape[1]
    cg = c // num_groups
    t = x.movedim(1, -1).reshape(n_, -1, c).float()
    count = t.shape[1] * cg
    onehot = (torch.arange(c, device=x.device) // cg == torch.arange(num_groups, device=x.device)[:, None]).float()
    mean = t.sum(1).view(n_, num_groups, cg).sum(-1) / count
    d = t - (mean[:, :, None] * onehot).sum(1)[:, None, :]
    var = (d * d).sum(1).view(n_, num_groups, cg).sum(-1) / count
    a = (torch.rsqrt(var + eps)[:, :, None] * onehot).sum(1)
    if weight is not None:
        a = a * weight.float()
    y = d * a[:, None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(n_, *x.shape[2:], c).movedim(-1, 1)


# ``torch.ops.ptq4dm.group_norm_cl``: lower{gn_channels_last}'s GroupNorm; composite, so Inductor
# decomposes it into the reductions above and fuses the normalizing pass into its consumers.
_LIB = torch.library.Library("ptq4dm", "FRAGMENT")
_LIB.define("group_norm_cl(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) -> Tensor")
_LIB.impl("group_norm_cl", _group_norm_cl_impl, "CompositeImplicitAutograd")
GN_CL = torch.ops.ptq4dm.group_norm_cl.default


def group_norm_channels_last(graph) -> int:
    """Every ``aten.group_norm`` of the graph -> ``ptq4dm.group_norm_cl`` (same arguments, same
    values up to float rounding). Measured on a 2-core Intel Xeon with AMX, GroupNorm + SiLU of a
    bf16 channels-last input under autocast, compiled: (8, 128, 32, 32) / 32 groups 1.45 -> 0.77 ms,
    (8, 384, 32, 32) / 32 2.35 -> 2.05 ms, (64, 96, 14, 14) / 8 0.92 -> 0.69 ms
    (docs/results/x86/group_norm.py). Returns the number of nodes rewritten."""
    g, gm = graph.graph, graph.gm
    done = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not aten.group_norm.default:
            continue
        args = list(n.args) + [None] * (5 - len(n.args))
        x, groups, w, b, eps = args[:5]
        groups = n.kwargs.get("num_groups", groups)
        w, b = n.kwargs.get("weight", w), n.kwargs.get("bias", b)
        eps = n.kwargs.get("eps", 1e-5 if eps is None else eps)
        with g.inserting_before(n):
            new = g.call_function(GN_CL, (x, int(groups), w, b, float(eps)))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
        done += 1
    gm.recompile()
    return done


TIME_FOLD_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.conv2d.default)


def fold_time_path(graph, max_table_bytes: int = 64 << 20) -> dict:
    """The time-embedding path folded into per-timestep tables: every value the step computes from
    ``t`` alone (the sinusoidal embedding, the time MLP, each ResNet block's ``time_emb_proj``) is a
    function of one integer in ``[0, T)``, so ``lower`` evaluates it once for every timestep and the
    compiled step reads ``table[t]`` instead of running it: on ddpm-cifar10 that is 24 linears and
    their SiLUs per step, on the default model 11 values. ``lower`` runs it on the fake-quant graph,
    before the int8 rewrite, so the tables hold the simulated values (a quantized time path's
    fake-quant included), row for row: exact in fp32 calls, for any batch of timesteps; in
    int8-mixed-bf16 calls the row is cast to the dtype of what it is added to, where autocast would
    have run the linears in bf16 (the table's rows are the more exact). Only values with a matmul /
    linear / conv among their ``t``-only ancestors are folded (an index into a sampler table
    already is a lookup). ``T`` is read from the tables the
    graph already indexes with ``t`` (the sampler's ``alphas_cumprod`` and kin); a graph without
    one, or whose tables would exceed ``max_table_bytes``, is left as it is. Each folded value is
    checked on a batch of distinct timesteps (its rows must depend on their own sample's ``t``
    only) before it is replaced. Returns ``{"values": n, "timesteps": T, "bytes": ...}``."""
    from ptq4dm.ir.graph import ROLE

    g, gm = graph.graph, graph.gm
    phs = [n for n in g.nodes if n.op == "placeholder"]
    if len(phs) != 3:
        return {"values": 0, "reason": "not an (x, t, noise) step graph"}
    t_node = phs[1]
    t_ex = graph.example_inputs[1]
    sizes = set()
    for n in g.nodes:   # tables indexed by t: their length is the number of timesteps
        if (n.op == "call_function" and n.target is aten.index.Tensor and isinstance(n.args[0], fx.Node)
                and n.args[0].op == "get_attr" and list(n.args[1]) == [t_node]):
            sizes.add(int(_const(gm, n.args[0]).shape[0]))
    if len(sizes) != 1:
        return {"values": 0, "reason": f"no single timestep count among the tables indexed by t ({sorted(sizes)})"}
    T = sizes.pop()
    skip = {aten._assert_async.msg, aten._assert_tensor_metadata.default, aten._assert_scalar.default}
    t_only, heavy, const = {t_node}, set(), set()
    for n in g.nodes:
        if n.op == "get_attr":
            const.add(n)
        if n.op != "call_function" or n.target in skip:
            continue
        ins = [a for a in n.all_input_nodes]
        if all(a in const for a in ins):   # arange, full, ops of parameters alone: constants
            if isinstance(n.meta.get("val"), torch.Tensor):
                const.add(n)
            continue
        if all(a in t_only or a in const for a in ins):   # (sizes of t count: the batch)
            t_only.add(n)
            if n.target in TIME_FOLD_OPS or any(a in heavy for a in ins):
                heavy.add(n)
    frontier = [n for n in g.nodes if n in heavy and any(u not in t_only for u in n.users)
                and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 1
                and n.meta["val"].is_floating_point()]
    if not frontier:
        return {"values": 0, "timesteps": T}
    # a graph of the t-only nodes behind the frontier: t -> the frontier values
    sub, env = fx.Graph(), {}
    for n in g.nodes:
        if n is t_node:
            env[n] = sub.placeholder("t")
        elif n in const or n in t_only:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[f] for f in frontier))
    sub.eliminate_dead_code()
    fn = fx.GraphModule(gm, sub)
    b = int(t_ex.shape[0]) if t_ex.dim() else 1
    with torch.no_grad():
        rows = [[] for _ in frontier]
        for tv in range(T):
            outs = fn(torch.full(t_ex.shape, tv, dtype=t_ex.dtype, device=t_ex.device))
            for r, o in zip(rows, outs):
                r.append(o[0].clone() if o.dim() and o.shape[0] == b else None)
        tables = [torch.stack(r) if all(x is not None for x in r) else None for r in rows]
        # each row must be its own sample's: distinct timesteps in one batch give the table's rows
        probe = (torch.arange(b, dtype=t_ex.dtype, device=t_ex.device) * max(1, T // max(b, 1))) % T
        outs = fn(probe.reshape(t_ex.shape))
        tables = [tab if tab is not None and torch.equal(tab[probe.reshape(-1)], o) else None
                  for tab, o in zip(tables, outs)]
    total = sum(tab.numel() * tab.element_size() for tab in tables if tab is not None)
    if total > max_table_bytes:
        return {"values": 0, "timesteps": T, "reason": f"tables of {total / 2**20:.0f} MiB > max_table_bytes"}
    binary = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor)
    order = {n: i for i, n in enumerate(g.nodes)}
    done = 0
    for k, (f, tab) in enumerate(zip(frontier, tables)):
        if tab is None:
            continue
        name = f"ptq4dm_tpath_{k}"
        gm.register_buffer(name, tab)
        first_user = min(f.users, key=order.__getitem__)
        with g.inserting_before(first_user):
            tn = g.get_attr(name)
            row = g.call_function(aten.index.Tensor, (tn, [t_node]))
        for m in (tn, row):
            m.meta[ROLE] = f.meta.get(ROLE, "unet")
        row.meta["val"] = f.meta["val"]
        for u in list(f.users):
            if u in t_only:
                continue
            other = next((a for a in u.args if isinstance(a, fx.Node) and a is not f), None)
            src = row
            if u.target in binary and other is not None and other not in t_only:
                with g.inserting_before(u):   # the dtype of what it meets: bf16 under int8-mixed-bf16
                    src = g.call_function(aten.type_as.default, (row, other))
                src.meta[ROLE] = row.meta[ROLE]
            u.replace_input_with(f, src)
        done += 1
    g.eliminate_dead_code()
    gm.recompile()
    return {"values": done, "timesteps": T, "bytes": total}


def has_bf16() -> bool:
    """AVX-512 BF16 or AMX-BF16: bf16 dot products in hardware (without them oneDNN emulates bf16,
    slower than fp32)."""
    flags = set(cpu_isa()["flags"])
    return bool(flags & {"avx512_bf16", "amx_bf16"})


FUSE_SUM = "ptq4dm_fuse_sum"   # gm.meta key: CompiledStep fuses residual adds into the int8 convs (lower{fuse_sum})
AUTOCAST = "ptq4dm_autocast"   # gm.meta key: the dtype CompiledStep runs the graph under autocast with
AUTOCAST_MIN_BATCH = "ptq4dm_autocast_min_batch"   # gm.meta key: ... from this batch size up (below: fp32 output)
# int8-mixed-bf16 pays where a call has enough work for halved memory traffic to beat autocast's casts
# (the bf16 copies of the float layers' weights and inputs, the outputs cast back): below about 4 GMAC
# per call it costs time. Measured interleaved on a 2-core Intel Xeon with AMX, 2026-12-05
# (docs/results.md, "When int8-mixed-bf16 pays"): the default model (0.19 GMAC per sample) at batch
# 1 / 4 / 16: mixed 1.11x / 1.13x slower, even; at batch 64 (12 GMAC) 1.11x faster; ddpm-cifar10
# (6.1 GMAC per sample) at batch 1: 1.06x faster. On the AMD EPYC of 2026-12-04 (AVX-512 BF16, no
# AMX) the same pattern: inside the noise at the default model's batch 1, faster from 64.
MIXED_BF16_MIN_MACS = 4e9


def step_macs_per_sample(graph) -> float:
    """Multiply-accumulates per sample of one step graph's convs, linears and matmuls, counted by
    ``torch.utils.flop_counter`` on one run of the graph at its example inputs (before lowering:
    the counter knows aten's ops, not oneDNN's)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, noise = graph.example_inputs
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph.gm(x, t, noise)
    return counter.get_total_flops() / 2 / max(1, x.shape[0])


def enable_mixed_bf16(graph, min_batch: int = 1) -> int:
    """int8-mixed-bf16: the lowered graph runs under CPU autocast to bf16 (``CompiledStep`` enters
    it), so that Inductor's int8-mixed-bf16 rewrites apply: the oneDNN int8 convs / linears write
    bf16, and the float work between them (GroupNorm, SiLU, adds, the attention matmuls and
    softmax, the fake-quant pointwise ops) reads and writes bf16: half the memory traffic. Measured
    1.05-1.28x over the fp32-output int8 graph from batch 8 up (docs/results.md, Speed). The layers the policy keeps
    in float (conv_in / conv_out, the time-embedding path) then run in bf16 too, as under
    bf16-compile; the step's outputs are returned in the inputs' dtype. Not exact against the
    fake-quant graph (bf16 carries 8 significant bits): its quality is measured, not assumed
    (docs/results.md, the int8 row). Removes the exported graph's dtype assertions
    (``_assert_tensor_metadata``: they assert the fp32 the graph was captured in). Autocast is
    entered for batches of ``min_batch`` and more (``CompiledStep`` reads each call's batch size;
    smaller batches run the same graph with fp32 outputs: ``MIXED_BF16_MIN_MACS``). Returns the
    number of assertions removed."""
    g, gm = graph.graph, graph.gm
    removed = 0
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is aten._assert_tensor_metadata.default:
            g.erase_node(n)
            removed += 1
    gm.recompile()
    gm.meta[AUTOCAST] = torch.bfloat16
    gm.meta[AUTOCAST_MIN_BATCH] = int(min_batch)
    return removed


def _fuse_qconv_residual_sum(g: fx.Graph) -> int:
    """Inductor post-grad pre-pass (``lower{fuse_sum=true}``): ``add(qconv(x), r)`` ->
    ``qconv2d_pointwise.binary(x, accum=r, "sum")``, the residual added inside the oneDNN int8 conv
    (its sum post-op, written into r's buffer) instead of by a separate pass over the conv's output.

    torchao's x86 rewrite fuses that add only when r comes from a dequantize (PT2E's quantizer
    quantizes the residual: ``_is_valid_quantized_op_binary_optimization_pattern``); PTQ4DM keeps
    the skip path in float, so its ResNet blocks' ``input + conv2(h)`` stayed an add that Inductor
    fused into the next GroupNorm kernel (one more read of two tensors, one more write). The
    float accum is exact: the sum post-op adds the conv's float output to r as the add did (in the
    output dtype: bf16 under int8-mixed-bf16, as the add was). The same safety rules as torchao's:
    r has the conv output's shape and dtype, r is not the conv's input, and every other user of r
    is an ancestor of the conv (r is dead once the sum overwrites it); r is not a graph input or
    constant. Returns the number of adds fused."""
    from torch._inductor.fx_passes.mkldnn_fusion import _get_remaining_users

    qconv = {torch.ops.onednn.qconv_pointwise.default: torch.ops.onednn.qconv2d_pointwise.binary,
             torch.ops.onednn.qconv_pointwise.tensor: torch.ops.onednn.qconv2d_pointwise.binary_tensor}
    fused = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in qconv or len(n.users) != 1 or n.args[14] != "none":
            continue
        out_dtype = n.args[13]
        add = next(iter(n.users))
        if (add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs
                or out_dtype not in (torch.float32, torch.bfloat16)):
            continue
        other = add.args[1] if add.args[0] is n else add.args[0]
        if not isinstance(other, fx.Node) or other is n or other.op in ("placeholder", "get_attr"):
            continue
        vo, vn = other.meta.get("val"), n.meta.get("val")
        if not (isinstance(vo, torch.Tensor) and isinstance(vn, torch.Tensor)) or vo.shape != vn.shape \
                or vo.dtype != out_dtype or vn.dtype != out_dtype:
            continue
        if other is n.args[0] or len(_get_remaining_users(other, n)) > 1:
            continue
        qx, xs, xz, w, ws, wz, bias, stride, padding, dilation, groups, o_scale, o_zp = n.args[:13]
        with g.inserting_before(add):
            new = g.call_function(qconv[n.target], (qx, xs, xz, w, ws, wz, other, bias, stride, padding, dilation, groups,
                                           o_scale, o_zp, out_dtype, 1.0, 0, "sum", 1.0, "none", [], ""))
        new.meta.update(add.meta)
        add.replace_all_uses_with(new)
        g.erase_node(add)
        g.erase_node(n)
        fused += 1
    return fused


def _qconv_sum_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class QConvResidualSum(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            _fuse_qconv_residual_sum(graph)

        def uuid(self):
            return "ptq4dm-qconv-residual-sum-1"

    return QConvResidualSum()


class CompiledStep(torch.nn.Module):
    """A lowered x86 step graph compiled by Inductor with freezing (the int8 rewrites only run on a
    frozen graph) and called under ``torch.no_grad()`` (freezing needs inference). With
    ``cpp_wrapper`` (the default) Inductor writes the code that calls the kernels in C++ rather than
    Python: a step of a small model is ~100 kernel calls whose Python dispatch sets its time at
    small batches (measured in docs/results.md, Speed); the first call compiles a few seconds longer."""

    def __init__(self, gm: fx.GraphModule, dynamic: bool | None = None, cpp_wrapper: bool = True):
        super().__init__()
        register_inductor_patterns()
        self.gm = gm
        self.cpp_wrapper = bool(cpp_wrapper)
        self.fuse_sum = _qconv_sum_pass() if gm.meta.get(FUSE_SUM) else None   # lower{fuse_sum}
        self._fn = torch.compile(gm, dynamic=dynamic)

    def _config(self):
        # freezing set globally while compiling: torch.compile(options={"freezing": True}) is not
        # read everywhere (linears then keep an unfolded qlinear_prepack and fail to compile)
        return torch._inductor.config.patch(freezing=True, cpp_wrapper=self.cpp_wrapper,
                                            post_grad_custom_pre_pass=self.fuse_sum)

    def _call(self, x, t, noise):
        dtype = self.gm.meta.get(AUTOCAST)
        if dtype is None or x.shape[0] < self.gm.meta.get(AUTOCAST_MIN_BATCH, 1):
            return self._fn(x, t, noise)
        with torch.autocast("cpu", dtype=dtype):   # enable_mixed_bf16
            out = self._fn(x, t, noise)
        return tuple(o.to(x.dtype) if o.is_floating_point() else o for o in out)

    def forward(self, x, t, noise):
        with torch.no_grad(), self._config():
            table = self.gm.meta.get("ptq4dm_group_of_t")
            if table is None or t.numel() <= 1:
                return self._call(x, t, noise)
            group = getattr(self.gm, table)[t]
            if bool((group == group[0]).all()):
                return self._call(x, t, noise)
            # bias_correct's tables are folded for one group of sampler steps per batch (sampling
            # shares t); a batch that mixes groups runs group by group
            outs = None
            for gv in torch.unique(group):
                idx = (group == gv).nonzero().flatten()
                part = self._call(x[idx], t[idx], noise[idx])
                if outs is None:
                    outs = [p.new_empty((x.shape[0], *p.shape[1:])) for p in part]
                for o, p in zip(outs, part):
                    if p.shape[0] != idx.numel():
                        raise RuntimeError("lowered step: an output without a batch dimension in a batch that mixes "
                                           "groups of sampler steps; lower with fold_tables=false")
                    o[idx] = p
            return tuple(outs)


def int8_kernel_calls(code: str) -> dict:
    """How many oneDNN int8 conv / linear calls the code from ``compiled_code`` makes: the Python
    wrapper calls ``torch.ops.onednn.qconv_pointwise``, the C++ wrapper
    ``aoti_torch_cpu__qconv_pointwise_tensor`` (and likewise for qlinear). Zero means Inductor fell
    back to float."""
    import re

    # qconv2d_pointwise.binary: a conv with its residual add fused (lower{fuse_sum=true})
    return {op: len(re.findall(rf"onednn\.{op}(?:2d)?_pointwise|aoti_torch_cpu__{op}(?:2d)?_pointwise", code))
            for op in ("qconv", "qlinear")}


def compiled_code(step: CompiledStep, *args) -> str:
    """The source Inductor generated for ``step`` on ``args`` (a fresh compile; Python, with the C++
    wrapper's source inside it when ``cpp_wrapper``): where a test or a user checks that the int8
    kernels were used (``int8_kernel_calls``)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad(), step._config():
        _, code = run_and_get_code(step._call, *args)
    return "\n".join(code)
