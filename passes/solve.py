"""solve: fix scale / zero point of every annotated tensor.

reads:  meta['quantization_annotation'] (weights: the weight tensors themselves, per channel);
        observer statistics (activations, per tensor)
writes: ``graph.meta['qparams'][key] = QParams``; ``ctx.results['solve']``: one ``TensorReport``
        per tensor with the chosen error and the min-max error on the same data.

Solvers: ``mse`` (default: minimise mean |Q(x) - x|^p, p = 2; the reference code used 2.4)
and ``minmax`` (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptq4dm.ir.graph import StepGraph
from ptq4dm.ir.quant import QParams, lp_error, solve_minmax, solve_mse

from .base import PassContext, register_pass
from .observe import GroupedObserver, QTensor, observers, qtensors


@dataclass(frozen=True)
class MSE:
    """The paper's range solver: minimise E|Q(x) - x|^p over clipping ranges."""

    p: float = 2.0
    grid: int = 100
    refine: int = 10
    kind: str = "mse"

    def validate(self) -> None:
        if self.p <= 0:
            raise ValueError(f"MSE p must be > 0, got {self.p}")
        if self.grid < 1:
            raise ValueError(f"MSE grid must be >= 1, got {self.grid}")


@dataclass(frozen=True)
class MinMax:
    """Baseline: the observed range, no clipping."""

    kind: str = "minmax"
    p: float = 2.0

    def validate(self) -> None:
        pass


@dataclass
class TensorReport:
    key: str
    role: str
    spec: str
    scale: float          # mean over channels for per-channel weights
    zero_point: int
    error: float          # mean |Q(x) - x|^p with the chosen qparams, on the observed data
    error_minmax: float   # the same for min-max qparams

    @property
    def gain(self) -> float:
        return self.error_minmax / self.error if self.error > 0 else float("inf")


@register_pass
@dataclass
class Solve:
    name = "solve"
    reads = "weight tensors; observer statistics"
    writes = "graph.meta['qparams']; ctx.results['solve'] (list of TensorReport)"
    preserves_semantics = True

    solver: MSE | MinMax = field(default_factory=MSE)
    p: float | None = None       # pipeline-string shortcut: solve{p=2.4}
    kind: str | None = None      # pipeline-string shortcut: solve{kind=minmax}

    def __post_init__(self):
        if self.kind == "minmax":
            self.solver = MinMax()
        elif self.kind not in (None, "mse"):
            raise ValueError(f"unknown solver kind {self.kind!r}; choose 'mse' or 'minmax'")
        if self.p is not None:
            self.solver = MSE(p=self.p) if isinstance(self.solver, MSE) else MinMax(p=self.p)
        self.solver.validate()

    def _solve(self, x: torch.Tensor, qt: QTensor, lo=None, hi=None) -> tuple[QParams, float, float]:
        spec = qt.spec
        axis = spec.ch_axis
        mm = solve_minmax(x if lo is None else torch.cat([x.reshape(-1), lo.reshape(1), hi.reshape(1)]),
                          spec.quant_min, spec.quant_max, spec.symmetric, axis, name=qt.key)
        if isinstance(self.solver, MSE):
            qp = solve_mse(x, spec.quant_min, spec.quant_max, spec.symmetric, axis, p=self.solver.p,
                           grid=self.solver.grid, refine=self.solver.refine, name=qt.key, lo=lo, hi=hi)
        else:
            qp = mm
        p = self.solver.p
        e = lp_error(x, qp, p).mean().item()
        e_mm = lp_error(x, mm, p).mean().item()
        return qp, e, e_mm

    def _solve_grouped(self, o: GroupedObserver, qt: QTensor) -> tuple[QParams, float, float]:
        """One range per timestep group (a group with no samples takes the all-t range).
        Errors are sample-weighted means over groups; min-max is the all-t min-max."""
        glob, _, _ = self._solve(o.all.sample, qt, lo=o.all.min, hi=o.all.max)
        scales, zps, errs, errs_mm, weights = [], [], [], [], []
        for part in o.parts:
            if part.min is None:
                scales.append(glob.scale.reshape(())); zps.append(glob.zero_point.reshape(()))
                continue
            qp, e, _ = self._solve(part.sample, qt, lo=part.min, hi=part.max)
            scales.append(qp.scale.reshape(())); zps.append(qp.zero_point.reshape(()))
            _, _, e_mm = self._solve_minmax_only(part.sample, qt, o.all.min, o.all.max)
            errs.append(e); errs_mm.append(e_mm); weights.append(part.seen)
        w = torch.tensor(weights, dtype=torch.float64)
        w = w / w.sum()
        e = float((torch.tensor(errs, dtype=torch.float64) * w).sum())
        e_mm = float((torch.tensor(errs_mm, dtype=torch.float64) * w).sum())
        qp = QParams(torch.stack(scales), torch.stack(zps), glob.qmin, glob.qmax, axis=None, groups=len(scales))
        return qp, min(e, e_mm), e_mm

    def _solve_minmax_only(self, x, qt, lo, hi):
        spec = qt.spec
        mm = solve_minmax(torch.cat([x.reshape(-1), lo.reshape(1), hi.reshape(1)]), spec.quant_min, spec.quant_max,
                          spec.symmetric, None, name=qt.key)
        e = lp_error(x, mm, self.solver.p).item()
        return mm, e, e

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        obs = observers(graph)
        qparams: dict[str, QParams] = graph.meta.setdefault("qparams", {})
        reports: list[TensorReport] = []
        from ptq4dm import distributed as dist

        items = qtensors(graph)
        mine = dist.my_batches(items)   # inside a process group: tensor i on rank i % world_size, then exchanged

        def solve_share() -> dict:
            out = {}
            it = mine
            if ctx.progress:
                from tqdm import tqdm

                it = tqdm(mine, desc="solve", unit="tensor", leave=False)
            for i, qt in it:
                if qt.spec.role == "weight":
                    w = getattr_path(graph.gm, qt.source, graph)
                    qp, e, e_mm = self._solve(w.detach().float(), qt)
                else:
                    o = obs.get(qt.key)
                    if o is None or o.min is None:
                        raise ValueError(f"tensor {qt.key!r} has no calibration statistics: run 'observe,calibrate' "
                                         f"before 'solve'")
                    if isinstance(o, GroupedObserver):
                        qp, e, e_mm = self._solve_grouped(o, qt)
                    else:
                        qp, e, e_mm = self._solve(o.sample, qt, lo=o.min, hi=o.max)
                out[i] = (qp, TensorReport(qt.key, qt.spec.role, qt.spec.short(), float(qp.scale.float().mean()),
                                           int(qp.zero_point.reshape(-1)[0]) if qp.zero_point.numel() else 0, e, e_mm))
            return out

        solved = dist.gather_batches("solve", solve_share)
        device = graph.example_inputs[0].device
        for i, qt in enumerate(items):
            qp, rep = solved[i]
            qparams[qt.key] = qp.to(device)
            reports.append(rep)
        self._share_ranges(graph, qparams, reports)
        ctx.results["solve"] = reports

    def _share_ranges(self, graph: StepGraph, qparams: dict, reports: list) -> None:
        """graph.meta['shared_ranges'] {dst: src} (mark's QuantPolicy.share_xt_range): dst takes
        src's qparams from one sampler step earlier (x_t at step i is x_{t-1} of step i - 1). One
        range for all t: the same qparams. Per-step ranges (groups == sampler steps): group i takes
        src's group i - 1; group 0 (x_T) keeps its own. Other group counts cannot be shifted by
        one step and are refused."""
        for dst, src in (graph.meta.get("shared_ranges") or {}).items():
            d, s_ = qparams[dst], qparams[src]
            if (d.qmin, d.qmax) != (s_.qmin, s_.qmax):
                raise ValueError(f"share_xt_range: {dst!r} is [{d.qmin}, {d.qmax}] but x_{{t-1}} ({src!r}) is "
                                 f"[{s_.qmin}, {s_.qmax}]; give activations and outputs the same bits")
            if not s_.groups:
                new = QParams(s_.scale.clone(), s_.zero_point.clone(), s_.qmin, s_.qmax, None, 0)
            else:
                steps = graph.meta["sampler"].S
                if s_.groups != steps or d.groups != steps:
                    raise ValueError(f"share_xt_range needs one range per sampler step (timestep_groups = {steps}), "
                                     f"got {s_.groups}")
                new = QParams(torch.cat([d.scale[:1], s_.scale[:-1]]), torch.cat([d.zero_point[:1], s_.zero_point[:-1]]),
                              d.qmin, d.qmax, None, d.groups)
            qparams[dst] = new
            o = observers(graph)[dst]
            if isinstance(o, GroupedObserver):  # the error of the shared range, on the data it now quantizes
                parts = [(g, p) for g, p in enumerate(o.parts) if p.min is not None]
                w = torch.tensor([float(p.seen) for _, p in parts], dtype=torch.float64)
                errs = [lp_error(p.sample, QParams(new.scale[g], new.zero_point[g], new.qmin, new.qmax), self.solver.p)
                        .mean().item() for g, p in parts]
                err = float((torch.tensor(errs, dtype=torch.float64) * w / w.sum()).sum())
            else:
                err = lp_error(o.sample, new, self.solver.p).mean().item()
            for i, r in enumerate(reports):
                if r.key == dst:
                    reports[i] = TensorReport(r.key, r.role, r.spec + f" (range of {src}, one step earlier)",
                                              float(new.scale.float().mean()), int(new.zero_point.reshape(-1)[0]),
                                              err, r.error_minmax)


def getattr_path(gm: torch.nn.Module, node_name: str, graph: StepGraph) -> torch.Tensor:
    """The tensor behind a get_attr node (by node name)."""
    node = next(n for n in graph.graph.nodes if n.name == node_name)
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj
