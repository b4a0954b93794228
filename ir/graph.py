"""``StepGraph``: the IR every pass reads and writes.

A thin wrapper over a ``torch.fx.GraphModule`` holding one denoising step. Per-node facts are
data in ``node.meta`` under documented keys (see ``ir/annotations.py`` for quantization specs):

``ptq4dm.role``    "input" | "unet" | "sampler" | "quant" (nodes inserted by passes)
``ptq4dm.output``  on the node producing an output: "prev_sample" | "mean" | "variance"

The graph's inputs are (x_t, t, noise); its outputs (prev_sample, mean, variance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

ROLE = "ptq4dm.role"
OUTPUT = "ptq4dm.output"
OUTPUT_NAMES = ("prev_sample", "mean", "variance")
INPUT_NAMES = ("x", "t", "noise")


@dataclass
class StepGraph:
    """One captured sampling step plus what the passes learned about it."""

    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    dynamic_batch: bool = True

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def __call__(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        return self.gm(x, t, noise)

    # ----- structure -----------------------------------------------------------------------
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def output_values(self) -> list[fx.Node]:
        """The nodes producing (prev_sample, mean, variance), in that order."""
        args = self.output_node().args[0]
        flat = list(args) if isinstance(args, (list, tuple)) else [args]
        if len(flat) != len(OUTPUT_NAMES):
            raise ValueError(f"a step graph has {len(OUTPUT_NAMES)} outputs {OUTPUT_NAMES}, this one {len(flat)}")
        return flat

    def named_outputs(self) -> dict[str, fx.Node]:
        return dict(zip(OUTPUT_NAMES, self.output_values()))

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def assign_roles(self) -> None:
        """Tag every node as input / unet / sampler from its module stack, and name outputs."""
        for n in self.graph.nodes:
            if n.op == "placeholder":
                n.meta[ROLE] = "input"
            elif n.op in ("call_function", "call_method", "call_module", "get_attr"):
                stack = n.meta.get("nn_module_stack") or {}
                paths = [p for p, _ in stack.values()] if stack else []
                if n.op == "get_attr":
                    paths = [str(n.target)]
                in_unet = any(p == "unet" or p.startswith("unet.") or p.startswith("L['self'].unet") for p in paths)
                n.meta[ROLE] = "unet" if in_unet else "sampler"
        for name, node in self.named_outputs().items():
            node.meta.setdefault(OUTPUT, name)

    def role(self, node: fx.Node) -> str:
        return node.meta.get(ROLE, "sampler")

    def module_path(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "call_function":
                counts[str(n.target)] = counts.get(str(n.target), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    # ----- views ---------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph over node names; attributes: op, target, role, output, annotated."""
        from .annotations import get_annotation

        g = nx.DiGraph()
        for n in self.graph.nodes:
            g.add_node(n.name, op=n.op, target=str(n.target), role=n.meta.get(ROLE),
                       output=n.meta.get(OUTPUT), annotated=get_annotation(n) is not None)
            for inp in n.all_input_nodes:
                g.add_edge(inp.name, n.name)
        return g

    def summary(self) -> str:
        roles: dict[str, int] = {}
        for n in self.graph.nodes:
            roles[n.meta.get(ROLE, "?")] = roles.get(n.meta.get(ROLE, "?"), 0) + 1
        counts = self.op_counts()
        key_ops = {k: v for k, v in counts.items()
                   if any(s in k for s in ("conv2d", "linear", "scaled_dot_product", "matmul", "bmm", "baddbmm"))}
        outs = ", ".join(f"{k} = %{v.name}" for k, v in self.named_outputs().items())
        lines = [f"StepGraph: {len(self.graph.nodes)} nodes "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(roles.items()))}), "
                 f"batch {'dynamic [2, ...]' if self.dynamic_batch else 'static ' + str(self.example_inputs[0].shape[0])}",
                 "  key ops: " + ", ".join(f"{k} x{v}" for k, v in key_ops.items()),
                 f"  outputs: {outs}"]
        return "\n".join(lines)

    def dump(self) -> str:
        """Readable text: one line per node with role, output name and quantization annotation."""
        from .annotations import format_annotation, get_annotation

        def fmt(a: Any) -> str:
            if isinstance(a, fx.Node):
                return f"%{a.name}"
            if isinstance(a, (list, tuple)):
                inner = ", ".join(fmt(x) for x in a)
                return f"[{inner}]" if isinstance(a, list) else f"({inner})"
            return repr(a)

        lines = []
        for n in self.graph.nodes:
            tags = [n.meta.get(ROLE, "?")]
            if OUTPUT in n.meta:
                tags.append(f"output={n.meta[OUTPUT]}")
            ann = get_annotation(n)
            if ann is not None:
                tags.append(format_annotation(ann))
            if n.op == "placeholder":
                body = f"%{n.name} = input"
            elif n.op == "output":
                names = ", ".join(f"{k}=%{v.name}" for k, v in self.named_outputs().items())
                body = f"return ({names})"
            elif n.op == "get_attr":
                body = f"%{n.name} = get_attr {n.target}"
            else:
                args = ", ".join([fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()])
                body = f"%{n.name} = {n.target}({args})"
            lines.append(f"{body:<100}  # {' '.join(tags)}")
        return "\n".join(lines)
