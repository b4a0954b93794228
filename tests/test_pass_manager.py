"""Pass manager: textual pipelines, verification, and a hypothesis property test of rewrites."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

from ptq4dm.ir.graph import StepGraph
from ptq4dm.passes import PASS_REGISTRY, PassContext, PassManager, PipelineError, VerificationError, parse_pipeline
from ptq4dm.passes.base import register_pass

aten = torch.ops.aten


@register_pass
@dataclass
class InsertIdentity:
    """Test pass: put aten.clone (an identity) between every op and each of its users."""

    name = "test_insert_identity"
    reads = "every call_function node"
    writes = "aten.clone nodes after each op"
    preserves_semantics = True

    def run(self, graph, ctx):
        g = graph.graph
        for n in list(g.nodes):
            if n.op == "call_function" and n.target is not aten.clone.default:
                with g.inserting_after(n):
                    c = g.call_function(aten.clone.default, (n,))
                n.replace_all_uses_with(c, delete_user_cb=lambda u, c=c: u is not c)


@register_pass
@dataclass
class BreakGraph:
    """Test pass: replaces the first add by a sub (a wrong rewrite the verifier must catch)."""

    name = "test_break_graph"
    reads = "aten.add nodes"
    writes = "turns the first into aten.sub"
    preserves_semantics = True

    def run(self, graph, ctx):
        for n in graph.graph.nodes:
            if n.op == "call_function" and n.target is aten.add.Tensor:
                n.target = aten.sub.Tensor
                return


@register_pass
@dataclass
class DanglingUse:
    name = "test_dangling_use"
    reads = "-"
    writes = "moves a node after its first user (structurally broken)"
    preserves_semantics = True

    def run(self, graph, ctx):
        nodes = [n for n in graph.graph.nodes if n.op == "call_function" and n.users]
        n = nodes[0]
        user = next(iter(n.users))
        user.append(n)  # move n right after its user


OPS = ["conv", "linear", "add", "cat", "groupnorm", "silu"]


class RandomDag(nn.Module):
    """A random DAG over (N, 4, 6, 6) feature maps built from a list of op choices."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan
        self.mods = nn.ModuleList()
        for op, _, _ in plan:
            if op == "conv":
                self.mods.append(nn.Conv2d(4, 4, 3, padding=1))
            elif op == "linear":
                self.mods.append(nn.Linear(6, 6))
            elif op == "groupnorm":
                self.mods.append(nn.GroupNorm(2, 4))
            elif op == "cat":
                self.mods.append(nn.Conv2d(8, 4, 1))
            else:
                self.mods.append(nn.Identity())

    def forward(self, x, t, noise):
        vals = [x, noise]
        for (op, i, j), m in zip(self.plan, self.mods):
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if op == "add":
                y = a + b
            elif op == "silu":
                y = torch.nn.functional.silu(a)
            elif op == "cat":
                y = m(torch.cat([a, b], dim=1))
            else:
                y = m(a)
            vals.append(y)
        return vals[-1], vals[-2], vals[-3]


def _step_graph(module, batch=2):
    x, noise = torch.randn(batch, 4, 6, 6), torch.randn(batch, 4, 6, 6)
    t = torch.zeros(batch, dtype=torch.long)
    ep = torch.export.export(module, (x, t, noise), strict=False)
    return StepGraph(ep.module(), (x, t, noise))


plans = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50)), min_size=2, max_size=8)


@given(plan=plans, seed=st.integers(0, 1000))
def test_identity_rewrite_preserves_outputs_and_verifies(plan, seed):
    torch.manual_seed(seed)
    graph = _step_graph(RandomDag(plan).eval())
    with torch.no_grad():
        before = [o.clone() for o in graph(*graph.example_inputs)]
    PassManager.from_pipeline("test_insert_identity", verify=True, verify_execution=True).run(graph, PassContext())
    assert any(n.target is aten.clone.default for n in graph.graph.nodes)
    with torch.no_grad():
        after = graph(*graph.example_inputs)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_parse_pipeline_with_options():
    assert parse_pipeline("mark,solve{p=2.4,grid=50},fakequant") == [
        ("mark", {}), ("solve", {"p": 2.4, "grid": 50}), ("fakequant", {})]


def test_unknown_pass_lists_known_passes():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("mark,obsrve")
    assert "obsrve" in str(e.value)
    for known in ("mark", "observe", "solve", "fakequant"):
        assert known in str(e.value)
    with pytest.raises(PipelineError, match="empty"):
        parse_pipeline(" ")
    with pytest.raises(PipelineError, match="unbalanced"):
        parse_pipeline("solve{p=2")


def test_verifier_names_pass_and_first_bad_node():
    torch.manual_seed(0)
    graph = _step_graph(RandomDag([("conv", 0, 0), ("add", 2, 1), ("silu", 3, 0)]).eval())
    with pytest.raises(VerificationError) as e:
        PassManager.from_pipeline("test_break_graph", verify_execution=True).run(graph, PassContext())
    assert e.value.pass_name == "test_break_graph"
    assert e.value.node is not None and e.value.node.startswith("add")
    assert "test_break_graph" in str(e.value)


def test_verifier_catches_use_before_def():
    torch.manual_seed(0)
    graph = _step_graph(RandomDag([("conv", 0, 0), ("silu", 2, 0), ("add", 3, 2)]).eval())
    with pytest.raises(VerificationError) as e:
        PassManager.from_pipeline("test_dangling_use").run(graph, PassContext())
    assert "before it is defined" in str(e.value) and e.value.node


def test_timing_and_dumps(tmp_path):
    torch.manual_seed(0)
    graph = _step_graph(RandomDag([("conv", 0, 0), ("silu", 2, 0)]).eval())
    ctx = PassContext()
    PassManager.from_pipeline("test_insert_identity", dump_before=("test_insert_identity",),
                              dump_after=("test_insert_identity",), dump_dir=tmp_path).run(graph, ctx)
    assert "test_insert_identity" in ctx.timings and ctx.timings["test_insert_identity"] >= 0
    before = (tmp_path / "before-test_insert_identity.txt").read_text()
    after = (tmp_path / "after-test_insert_identity.txt").read_text()
    assert "aten.clone" not in before and "aten.clone" in after
    with pytest.raises(PipelineError, match="unknown pass"):
        PassManager.from_pipeline("mark", dump_after=("nope",))
