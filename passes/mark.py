"""mark: decide what gets quantized, as PT2E annotations on nodes.

reads:  the captured graph (conv2d / linear / attention matmul nodes, the named outputs)
writes: ``node.meta["quantization_annotation"]``:
        conv / linear: input 0 -> activation spec (per-tensor), weight -> per-channel symmetric;
        attention matmuls (after decompose_attention): both operands -> attention spec;
        the producers of mean, variance and prev_sample -> output spec (the paper's Table 1);
        ``ctx.results["mark"]``: counts, and nodes left in FP with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ptq4dm.ir.annotations import ANNOTATION_KEY, GROUPABLE_ROLES, annotate_input, annotate_output, get_annotation, make_spec
from ptq4dm.ir.graph import OUTPUT, StepGraph

from .base import PassContext, register_pass
from .decompose_attention import ATTN

aten = torch.ops.aten
CONV_OPS = {aten.conv2d.default, aten.convolution.default}
LINEAR_OPS = {aten.linear.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
OUTPUT_ROLES = ("mean", "variance", "prev_sample")
# Ops with weights or GEMMs that this pass does not know how to quantize: reported, kept FP.
KNOWN_UNSUPPORTED = {aten.conv_transpose2d.input, aten.scaled_dot_product_attention.default,
                     aten.baddbmm.default, aten.addmm.default, aten.mm.default, aten.conv1d.default}


@dataclass(frozen=True)
class QuantPolicy:
    """What to quantize and how. Bit widths per role; exceptions by node name or module path."""

    weight_bits: int = 8
    act_bits: int = 8
    attn_bits: int = 8
    output_bits: int = 8
    act_symmetric: bool = False
    quantize_attention: bool = True
    quantize_outputs: bool = True            # mean, variance, prev_sample (the paper's setting)
    output_roles: tuple[str, ...] = OUTPUT_ROLES  # which of the sampler's outputs quantize_outputs covers
    keep_first_last_fp: bool = False         # conv_in / conv_out in float
    time_path_fp: bool = False               # convs / linears whose input depends on t alone (the time embedding) in float
    split_cat: bool = False                  # one quantizer per part of a skip `cat` feeding a conv
    skip: tuple[str, ...] = ()               # node names or module-path prefixes kept in float
    timestep_groups: int = 1                 # >1: activation / output scales per group of sampler steps
    grouped_roles: tuple[str, ...] | None = None  # roles timestep_groups applies to (None: every non-weight role)
    share_xt_range: bool = False             # convs reading x_t take the range x_{t-1} was quantized to

    def __post_init__(self):
        for f in ("weight_bits", "act_bits", "attn_bits", "output_bits"):
            b = getattr(self, f)
            if not 2 <= b <= 16:
                raise ValueError(f"QuantPolicy.{f} must be in [2, 16], got {b}")

        bad = [r for r in self.output_roles if r not in OUTPUT_ROLES]
        if bad or not self.output_roles:
            raise ValueError(f"QuantPolicy.output_roles must be a non-empty subset of {OUTPUT_ROLES}, got "
                             f"{self.output_roles}; to keep every output in float use quantize_outputs=False")
        if self.timestep_groups < 1:
            raise ValueError(f"QuantPolicy.timestep_groups must be >= 1, got {self.timestep_groups}")
        if self.grouped_roles is not None:
            bad = [r for r in self.grouped_roles if r not in GROUPABLE_ROLES]
            if bad:
                raise ValueError(f"QuantPolicy.grouped_roles names {bad}; choose from {GROUPABLE_ROLES} "
                                 f"(weights do not change with t)")

    def roles_grouped(self) -> tuple[str, ...]:
        """The roles whose ranges are per timestep group (empty when timestep_groups is 1)."""
        if self.timestep_groups == 1:
            return ()
        return GROUPABLE_ROLES if self.grouped_roles is None else tuple(self.grouped_roles)

    def describe(self) -> str:
        outs = "" if (not self.quantize_outputs or self.output_roles == OUTPUT_ROLES) else \
            f", outputs quantized: {'/'.join(self.output_roles)}"
        roles = "" if self.grouped_roles is None else f" ({'/'.join(self.grouped_roles)})"
        tg = f", {self.timestep_groups} timestep groups{roles}" if self.timestep_groups > 1 else ""
        return f"W{self.weight_bits}A{self.act_bits}{tg}{outs}"


@register_pass
@dataclass
class Mark:
    name = "mark"
    reads = "conv2d / linear / attention matmul nodes; named outputs"
    writes = "meta['quantization_annotation'] on quantized nodes; ctx.results['mark']"
    preserves_semantics = True

    policy: QuantPolicy = field(default_factory=QuantPolicy)

    def _skipped(self, graph: StepGraph, n: fx.Node) -> bool:
        path = graph.module_path(n)
        return any(n.name == s or (path and (path == s or path.startswith(s + "."))) for s in self.policy.skip)

    @staticmethod
    def _t_only(graph: StepGraph) -> set[fx.Node]:
        """Nodes whose value depends on the timestep placeholder and on no other input (x_t, noise):
        the time-embedding path (sinusoidal features, its MLP, each block's projection). One value
        per t, the same for every sample of a step: TFMQ-DM quantizes it apart for that reason."""
        ph = graph.placeholders()
        t, others = ph[1], set(ph[:1] + ph[2:])
        dep: dict[fx.Node, set] = {}
        for n in graph.graph.nodes:
            if n.op == "placeholder":
                dep[n] = {n}
                continue
            d: set = set()
            for a in n.all_input_nodes:
                d |= dep.get(a, set())
            dep[n] = d
        return {n for n, d in dep.items() if t in d and not (d & others)}

    @staticmethod
    def _xt_ties(graph: StepGraph) -> dict[str, str]:
        """{conv-input key: prev_sample key} for the quantized inputs that read x_t directly.

        In a quantized chain x_t *is* the previous step's quantized x_{t-1}: giving the consumers
        of x_t that step's range makes their quantizer an exact no-op (the values are on its grid)
        instead of a second rounding, and lets a lowered step hand its int8 x_{t-1} codes to the
        next step's first conv. The solve pass resolves the key pair (shifted by one step)."""
        x_t = graph.placeholders()[0]
        prev = graph.named_outputs()["prev_sample"]
        ties = {}
        for n in graph.graph.nodes:
            ann = get_annotation(n)
            if ann is None or n.op != "call_function" or n.target not in (CONV_OPS | LINEAR_OPS):
                continue
            if ann.input_qspec_map.get(x_t) is not None and get_annotation(prev) is not None:
                ties[f"{n.name}:{x_t.name}"] = f"{prev.name}:out"
        return ties

    @staticmethod
    def _own_cat(graph: StepGraph, conv: fx.Node, cat: fx.Node) -> fx.Node:
        """The `cat` that `conv` reads, made its own: a skip `cat` in diffusers' resnet blocks feeds
        the GroupNorm of conv1 and the 1x1 shortcut conv; quantizing its parts in place would also
        quantize the GroupNorm's input. A copy of the `cat` read by `conv` alone (same args, same
        value) carries the per-part quantizers instead; the other readers keep the float `cat`."""
        if len(cat.users) == 1:
            return cat
        with graph.graph.inserting_before(conv):
            own = graph.graph.call_function(aten.cat.default, cat.args, cat.kwargs)
        own.meta.update({k: v for k, v in cat.meta.items() if k != ANNOTATION_KEY})
        conv.replace_input_with(cat, own)
        return own

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        pol = self.policy
        names = {n.name for n in graph.graph.nodes}
        paths = {graph.module_path(n) for n in graph.graph.nodes}
        for s in pol.skip:
            if s not in names and not any(p == s or p.startswith(s + ".") for p in paths if p):
                raise ValueError(f"policy.skip names {s!r}, which is neither a node nor a module path in "
                                 f"this graph (e.g. {sorted(p for p in paths if p)[:3]})")
        act = make_spec("act", pol.act_bits, pol.act_symmetric)
        attn = make_spec("attn", pol.attn_bits, pol.act_symmetric)
        weight = make_spec("weight", pol.weight_bits, True, ch_axis=0)
        convs = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in CONV_OPS]
        first_last = {convs[0], convs[-1]} if (pol.keep_first_last_fp and convs) else set()
        t_only = self._t_only(graph) if pol.time_path_fp else set()
        counts = {"conv": 0, "linear": 0, "attn_matmul": 0, "output": 0}
        fp: list[tuple[str, str]] = []
        for n in graph.graph.nodes:
            if n.op != "call_function":
                continue
            if n.target in CONV_OPS or n.target in LINEAR_OPS:
                kind = "conv" if n.target in CONV_OPS else "linear"
                if n in first_last or self._skipped(graph, n):
                    fp.append((n.name, "kept in float by policy"))
                    continue
                if n in t_only:
                    fp.append((n.name, "time-embedding path (input depends on t alone): kept in float by policy"))
                    continue
                x, w = n.args[0], n.args[1]
                if not isinstance(w, fx.Node) or w.op != "get_attr":
                    fp.append((n.name, f"{kind} with a computed weight: left in float"))
                    continue
                if pol.split_cat and isinstance(x, fx.Node) and x.target is aten.cat.default:
                    own = self._own_cat(graph, n, x)
                    for part in own.args[0]:
                        annotate_input(own, part, act)
                else:
                    annotate_input(n, x, act)
                annotate_input(n, w, weight)
                counts[kind] += 1
            elif n.target in MATMUL_OPS and n.meta.get(ATTN) and pol.quantize_attention:
                if self._skipped(graph, n):
                    fp.append((n.name, "kept in float by policy"))
                    continue
                a, b = n.args[0], n.args[1]
                annotate_input(n, a, attn)
                annotate_input(n, b, attn)
                counts["attn_matmul"] += 1
            elif n.target in KNOWN_UNSUPPORTED or n.target in MATMUL_OPS:
                fp.append((n.name, f"{n.target} is not quantized by this pass: left in float"))
        if pol.quantize_outputs:
            done = set()
            for role, node in graph.named_outputs().items():
                if node in done or node.op == "placeholder" or role not in pol.output_roles:
                    continue
                annotate_output(node, make_spec(role if role != "prev_sample" else "prev_sample",
                                                pol.output_bits, False))
                done.add(node)
                counts["output"] += 1
        graph.meta["timestep_groups"] = pol.timestep_groups
        graph.meta["grouped_roles"] = pol.roles_grouped()
        graph.meta["shared_ranges"] = self._xt_ties(graph) if (pol.share_xt_range and pol.quantize_outputs) else {}
        ctx.results["mark"] = {"counts": counts, "left_in_float": fp, "policy": pol}
