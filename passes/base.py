"""The pass protocol, the registry and the MLIR-style ``PassManager``.

A pass does one job over a ``StepGraph`` and documents what it reads and writes. The manager
runs a textual pipeline (``"decompose_attention,mark,observe,calibrate,solve,fakequant"``,
options in braces: ``"solve{p=2.4}"``), verifies the IR after every pass (graph lint, plus
optionally re-execution on the example inputs against the previous graph), times each pass,
and dumps the IR before/after named passes.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import fx

from ptq4dm.ir.graph import StepGraph


class PipelineError(ValueError):
    """A pipeline string that cannot be parsed or names an unknown pass."""


class VerificationError(RuntimeError):
    """A pass left the IR broken; the message names the pass and the first bad node."""

    def __init__(self, pass_name: str, node: str | None, detail: str):
        self.pass_name, self.node, self.detail = pass_name, node, detail
        where = f" at node %{node}" if node else ""
        super().__init__(f"pass '{pass_name}' broke the graph{where}: {detail}")


@dataclass
class PassContext:
    """Shared state a pipeline run carries between passes (not global: one per run)."""

    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    progress: bool = True


@runtime_checkable
class Pass(Protocol):
    name: ClassVar[str]
    reads: ClassVar[str]
    writes: ClassVar[str]
    preserves_semantics: ClassVar[bool]

    def run(self, graph: StepGraph, ctx: PassContext) -> None: ...


PASS_REGISTRY: dict[str, Callable[..., Pass]] = {}


def register_pass(cls):
    """Class decorator: register a pass under ``cls.name`` for textual pipelines."""
    for attr in ("name", "reads", "writes"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"pass {cls.__name__} must define a string class attribute {attr!r}")
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ValueError(f"a pass named {cls.name!r} is already registered ({PASS_REGISTRY[cls.name]})")
    PASS_REGISTRY[cls.name] = cls
    return cls


_ITEM = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\{(.*)\})?\s*$")


def _parse_value(text: str) -> Any:
    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    return t


def _split_top(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise PipelineError(f"unbalanced '{{' in pipeline {text!r}")
    items.append(cur)
    return items


def parse_pipeline(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"mark,solve{p=2.4,grid=100}"`` -> ``[("mark", {}), ("solve", {"p": 2.4, "grid": 100})]``."""
    if not text or not text.strip():
        raise PipelineError("empty pipeline; give pass names separated by commas, e.g. 'mark,observe'")
    out = []
    for item in _split_top(text):
        m = _ITEM.match(item)
        if not m:
            raise PipelineError(f"cannot parse pipeline item {item!r}; expected name or name{{key=value,...}}")
        name, opts_text = m.group(1), m.group(2)
        if name not in PASS_REGISTRY:
            raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}")
        opts: dict[str, Any] = {}
        if opts_text and opts_text.strip():
            for kv in opts_text.split(","):
                if "=" not in kv:
                    raise PipelineError(f"option {kv!r} of pass {name!r} is not key=value")
                k, v = kv.split("=", 1)
                opts[k.strip()] = _parse_value(v)
        out.append((name, opts))
    return out


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _node_values(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    values: dict[str, Any] = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            values[n.name] = r
            return r

    with torch.no_grad():
        Rec(gm).run(*inputs)
    return values


def verify_structure(graph: StepGraph, pass_name: str) -> None:
    """Graph lint plus our own checks, naming the first bad node."""
    seen: set[fx.Node] = set()
    for n in graph.graph.nodes:
        for a in n.all_input_nodes:
            if a not in seen:
                raise VerificationError(pass_name, n.name, f"uses %{a.name} before it is defined (not in topological order or erased)")
        if n.op == "call_function" and not callable(n.target):
            raise VerificationError(pass_name, n.name, f"target {n.target!r} is not callable")
        if n.op == "call_module":
            try:
                graph.gm.get_submodule(str(n.target))
            except AttributeError:
                raise VerificationError(pass_name, n.name, f"calls missing submodule {n.target!r}") from None
        seen.add(n)
    try:
        graph.graph.lint()
    except Exception as e:  # lint raises RuntimeError with its own message
        raise VerificationError(pass_name, None, f"graph lint failed: {e}") from e
    graph.output_values()


def verify_execution(before: StepGraph, after: StepGraph, pass_name: str, atol: float = 0.0) -> None:
    """Re-run both graphs on the example inputs; outputs must match (semantics-preserving passes)."""
    inputs = after.example_inputs
    with torch.no_grad():
        try:
            got = _flatten(after.gm(*inputs))
        except Exception as e:
            raise VerificationError(pass_name, None, f"the rewritten graph fails to run: {type(e).__name__}: {e}") from e
        want = _flatten(before.gm(*inputs))
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=0)]
    if not bad and len(got) == len(want):
        return
    # Locate the first node (in the new graph's order) whose value differs from the old graph's.
    old_vals, new_vals = _node_values(before.gm, inputs), _node_values(after.gm, inputs)
    for n in after.graph.nodes:
        if n.op in ("output", "placeholder"):
            continue
        if n.name in old_vals and isinstance(new_vals.get(n.name), torch.Tensor):
            a, b = new_vals[n.name], old_vals[n.name]
            if isinstance(b, torch.Tensor) and (a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=0)):
                raise VerificationError(pass_name, n.name, "its value differs from the graph before the pass")
        elif n.name not in old_vals:
            # A new node: compare its value with the value of the old node it replaced, if any user kept the name.
            for u in n.users:
                if u.name in old_vals and isinstance(new_vals.get(u.name), torch.Tensor):
                    a, b = new_vals[u.name], old_vals[u.name]
                    if isinstance(b, torch.Tensor) and (a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=0)):
                        raise VerificationError(pass_name, n.name, f"the new node changes the value of %{u.name}")
    raise VerificationError(pass_name, None, f"outputs {bad} differ from the graph before the pass")


@dataclass
class PassManager:
    """Run passes in order with verification, timing and IR dumps (MLIR's pass manager, small)."""

    passes: list[Pass]
    verify: bool = True
    verify_execution: bool = False
    dump_before: tuple[str, ...] = ()
    dump_after: tuple[str, ...] = ()
    dump_dir: Path | None = None
    dump_fn: Callable[[str, str], None] | None = None

    @classmethod
    def from_pipeline(cls, pipeline: str, pass_options: dict[str, dict[str, Any]] | None = None, **kw) -> "PassManager":
        passes = []
        for name, opts in parse_pipeline(pipeline):
            merged = {**(pass_options or {}).get(name, {}), **opts}
            try:
                passes.append(PASS_REGISTRY[name](**merged))
            except TypeError as e:
                raise PipelineError(f"bad options for pass {name!r}: {e}") from e
        for n in (*kw.get("dump_before", ()), *kw.get("dump_after", ())):
            if n not in PASS_REGISTRY:
                raise PipelineError(f"cannot dump around unknown pass {n!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}")
        return cls(passes, **kw)

    def _dump(self, graph: StepGraph, label: str) -> None:
        text = graph.dump()
        if self.dump_fn is not None:
            self.dump_fn(label, text)
        if self.dump_dir is not None:
            from ptq4dm.ir.serialize import atomic_write_text

            atomic_write_text(Path(self.dump_dir) / f"{label}.txt", text)
        if self.dump_fn is None and self.dump_dir is None:
            print(f"// ----- IR {label} -----\n{text}")

    def run(self, graph: StepGraph, ctx: PassContext | None = None) -> StepGraph:
        ctx = ctx or PassContext()
        for p in self.passes:
            if p.name in self.dump_before:
                self._dump(graph, f"before-{p.name}")
            before = None
            if self.verify and self.verify_execution and p.preserves_semantics:
                before = StepGraph(copy.deepcopy(graph.gm), graph.example_inputs, graph.meta, graph.dynamic_batch)
            t0 = time.perf_counter()
            p.run(graph, ctx)
            graph.gm.recompile()
            ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - t0
            if self.verify:
                verify_structure(graph, p.name)
                if before is not None:
                    verify_execution(before, graph, p.name)
            if p.name in self.dump_after:
                self._dump(graph, f"after-{p.name}")
        return graph


def pass_doc(cls) -> dict[str, str]:
    return {"name": cls.name, "reads": cls.reads, "writes": cls.writes,
            "options": ", ".join(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ""}
