"""observe: insert an observer on every annotated activation tensor.

reads:  meta['quantization_annotation'] (input specs whose source is not a weight; output specs)
writes: ``call_module`` nodes running a ``ReservoirObserver`` (identity in the forward pass);
        each carries ``meta['ptq4dm.qtensor']`` = the ``QTensor`` it observes.

Memory stays bounded whatever the calibration size: an observer keeps the exact min / max and
a uniform random sample (bottom-k reservoir: every value gets a random key, the ``capacity``
smallest keys are kept) of the values it saw. The MSE solver runs on that sample, with the
exact extremes as the largest candidate range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ptq4dm.distributed import batch_seed
from ptq4dm.ir.annotations import GROUPABLE_ROLES, TensorSpec, get_annotation
from ptq4dm.ir.graph import ROLE, StepGraph

from .base import PassContext, register_pass

QTENSOR = "ptq4dm.qtensor"


@dataclass(frozen=True)
class QTensor:
    """One quantized tensor: where it sits, its spec. ``key`` is stable across passes."""

    key: str             # "<consumer>:<input>" for an input edge, "<producer>:out" for an output
    consumer: str
    source: str | None   # the input node's name; None for an output spec
    spec: TensorSpec


class CalibrationNaN(RuntimeError):
    pass


class GroupedObserver(nn.Module):
    """One ReservoirObserver per timestep group; samples are routed by ``state['group']`` (B,),
    the group of each sample's t, which the calibrate pass sets (dim 0 of every observed tensor
    is the batch)."""

    def __init__(self, key: str, groups: int, capacity: int = 65536, seed: int = 0):
        super().__init__()
        self.key, self.groups = key, groups
        self.parts = nn.ModuleList(ReservoirObserver(f"{key}[g{i}]", max(1024, capacity // groups), seed * 131 + i)
                                   for i in range(groups))
        self.all = ReservoirObserver(key, capacity, seed)
        self.state: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.all.state = self.state
        self.all(x)
        g = self.state.get("group")
        if g is None or g.numel() != x.shape[0]:
            raise RuntimeError(f"observer {self.key!r}: timestep groups need state['group'] with one entry per "
                               f"sample (batch {x.shape[0]}); run it through the calibrate pass")
        for i in g.unique().tolist():
            part = self.parts[i]
            part.state = self.state
            part(x[g.to(x.device) == i])
        return x

    def export(self) -> dict:
        return {"all": self.all.export(), "parts": [p.export() for p in self.parts]}

    def absorb(self, states: list[dict]) -> None:
        self.all.absorb([s["all"] for s in states])
        for i, p in enumerate(self.parts):
            p.absorb([s["parts"][i] for s in states])

    @property
    def min(self):
        return self.all.min

    @property
    def max(self):
        return self.all.max

    def nbytes(self) -> int:
        return self.all.nbytes() + sum(p.nbytes() for p in self.parts)


class ReservoirObserver(nn.Module):
    """Identity that records min / max and a bounded uniform sample of what flows through.

    The sample is the ``capacity`` values with the smallest random keys (float64). When the
    calibrate pass sets ``state['batch']``, a batch's keys come from ``(seed, batch)`` alone: the
    sample is then the same however batches are ordered or split over processes, and
    ``export`` / ``absorb`` merge observers from several ranks into the one a single process has."""

    def __init__(self, key: str, capacity: int = 65536, seed: int = 0):
        super().__init__()
        self.key, self.capacity, self.seed = key, capacity, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.sample = torch.empty(0)
        self.keys = torch.empty(0, dtype=torch.float64)
        self.seen = 0
        self.enabled = True
        self.state: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        with torch.no_grad():
            v = x.detach().reshape(-1).float().cpu()
            if not torch.isfinite(v).all():
                t = self.state.get("t")
                tdesc = f" at timesteps {sorted(set(t.tolist()))[:8]}" if t is not None else ""
                raise CalibrationNaN(f"non-finite values (NaN/Inf) in tensor {self.key!r}{tdesc} during calibration")
            mn, mx = v.min(), v.max()
            self.min = mn if self.min is None else torch.minimum(self.min, mn)
            self.max = mx if self.max is None else torch.maximum(self.max, mx)
            gen = self.gen
            if "batch" in self.state:
                gen = torch.Generator().manual_seed(batch_seed(self.seed, int(self.state["batch"])))
            if v.numel() > self.capacity:
                # a uniform subsample of this batch first (O(capacity), not a sort of every value)
                v = v[torch.randint(v.numel(), (self.capacity,), generator=gen)]
            keys = torch.rand(v.numel(), generator=gen, dtype=torch.float64)
            allk, allv = torch.cat([self.keys, keys]), torch.cat([self.sample, v])
            if allk.numel() > self.capacity:
                allk, idx = torch.topk(allk, self.capacity, largest=False)
                allv = allv[idx]
            self.keys, self.sample = allk, allv
            self.seen += x.numel()
        return x

    def nbytes(self) -> int:
        return self.sample.numel() * 4 + self.keys.numel() * 8

    def export(self) -> dict:
        return {"min": self.min, "max": self.max, "keys": self.keys, "sample": self.sample, "seen": self.seen}

    def absorb(self, states: list[dict]) -> None:
        """Become the merge of ``states`` (``export()`` of observers that saw disjoint batches):
        exact min / max, the ``capacity`` smallest keys of all, sorted by key."""
        mins = [s["min"] for s in states if s["min"] is not None]
        maxs = [s["max"] for s in states if s["max"] is not None]
        self.min = torch.stack(mins).min() if mins else None
        self.max = torch.stack(maxs).max() if maxs else None
        keys = torch.cat([s["keys"].reshape(-1).double() for s in states])
        vals = torch.cat([s["sample"].reshape(-1) for s in states])
        keys, idx = torch.topk(keys, min(self.capacity, keys.numel()), largest=False, sorted=True)
        self.keys, self.sample = keys, vals[idx]
        self.seen = sum(int(s["seen"]) for s in states)


def qtensors(graph: StepGraph) -> list[QTensor]:
    """All annotated tensors (weights included), in graph order."""
    out = []
    for n in graph.graph.nodes:
        ann = get_annotation(n)
        if ann is None:
            continue
        for arg, spec in ann.input_qspec_map.items():
            if spec is not None:
                out.append(QTensor(f"{n.name}:{arg.name}", n.name, arg.name, spec))
        if ann.output_qspec is not None:
            out.append(QTensor(f"{n.name}:out", n.name, None, ann.output_qspec))
    return out


def observers(graph: StepGraph) -> dict[str, "ReservoirObserver | GroupedObserver"]:
    return {n.meta[QTENSOR].key: graph.gm.get_submodule(n.target)
            for n in graph.graph.nodes if n.op == "call_module" and QTENSOR in n.meta}


@register_pass
@dataclass
class Observe:
    name = "observe"
    reads = "meta['quantization_annotation'] (activation specs)"
    writes = "ReservoirObserver call_module nodes with meta['ptq4dm.qtensor']"
    preserves_semantics = True

    capacity: int = 65536
    seed: int = 0

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        g, gm = graph.graph, graph.gm
        nodes = {n.name: n for n in g.nodes}
        count = 0
        for qt in qtensors(graph):
            if qt.spec.role == "weight":
                continue
            consumer = nodes[qt.consumer]
            target = f"ptq4dm_obs_{count}"
            groups = int(graph.meta.get("timestep_groups", 1))
            if qt.spec.role not in graph.meta.get("grouped_roles", GROUPABLE_ROLES):
                groups = 1
            obs_mod = (GroupedObserver(qt.key, groups, self.capacity, self.seed + count) if groups > 1
                       else ReservoirObserver(qt.key, self.capacity, self.seed + count))
            gm.add_submodule(target, obs_mod)
            if qt.source is not None:
                src = nodes[qt.source]
                with g.inserting_before(consumer):
                    obs = g.call_module(target, (src,))
                consumer.replace_input_with(src, obs)
            else:
                with g.inserting_after(consumer):
                    obs = g.call_module(target, (consumer,))
                consumer.replace_all_uses_with(obs, delete_user_cb=lambda u, o=obs: u is not o)
            obs.meta[QTENSOR] = qt
            obs.meta[ROLE] = "quant"
            if "val" in (src.meta if qt.source is not None else consumer.meta):
                obs.meta["val"] = (src if qt.source is not None else consumer).meta["val"]
            count += 1
        ctx.results["observe"] = {"observers": count}
