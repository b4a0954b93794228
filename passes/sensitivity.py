"""sensitivity: how much of the step's output error each quantized tensor causes; optionally
``widen`` the activations that cost the most to 16 bits.

reads:  the fake-quantized graph (``fakequant``'s output, before ``bias_correct``);
        ``ctx.options['calibration_set']``
writes: ``ctx.results['sensitivity']``: one row per quantized tensor (key, role, bits, error,
        share) and, for weights, the error at ``weight_bits`` (4) too; with ``widen=k`` the k
        activation quantizers with the largest error get 16-bit qparams over their observed
        range (buffers, node arguments and ``graph.meta['qparams']``), listed under "widened".

The error of a tensor is measured with that tensor alone quantized (every other fake-quant
bypassed, every other weight float): the mean squared difference of the step's x_{t-1} from the
float step's, on ``n`` calibration samples evenly spaced over the set (so over every timestep
the set covers). Errors of different tensors nearly add up when they are small (the step is
close to linear in them), so ``share`` (error / sum of errors) reads as "this tensor's part of
the step's quantization error". This is the per-layer sensitivity of HAWQ and of Q-Diffusion's
analysis, measured on the output that the sampler carries to the next step.

``widen`` is a mixed-precision policy on activations: a deterministic sampler (DDIM, eta 0)
keeps every rounding of x_t, and a few activations carry most of it (docs/results/history.md, "DDIM: where the W8A8 error comes from").
A widened activation is 16-bit over its full observed range (min-max; at 16 bits clipping
buys nothing); the layer that reads it is lowered on x86 as two int8 ops, on the 16-bit codes'
high and low byte (``lower{split16=true}``), and stays in float on triton (``lower`` reports it).
Inside a torch.distributed group the tensors are dealt over the ranks and the errors gathered;
every rank then widens the same tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import StepGraph
from ptq4dm.ir.quant import QParams, fake_quant, qparams_from_range, solve_mse

from .base import PassContext, register_pass
from .bias_correct import FLOAT_WEIGHT, _attr, calibration_before_bias_correct
from .observe import QTENSOR

aten = torch.ops.aten
FQ = torch.ops.ptq4dm.fake_quant.default



def _bits(qp: QParams) -> int:
    return (qp.qmax - qp.qmin).bit_length()


def _relabel(ctx: PassContext, qparams: dict, notes: dict) -> None:
    """The solver's report names what this pass changed: ``notes`` {key: text} appended to those
    tensors' spec strings, with their new scale and zero point."""
    if not notes:
        return
    ctx.results["solve"] = [dataclasses.replace(r, spec=f"{r.spec} {notes[r.key]}",
                                                scale=float(qparams[r.key].scale.detach().float().mean()),
                                                zero_point=int(qparams[r.key].zero_point.flatten()[0]))
                            if r.key in notes else r for r in ctx.results.get("solve", [])]


class _Toggle(fx.Interpreter):
    """Runs the graph with only the quantizers in ``on`` applied; weights in ``swap`` read the
    given tensor instead (a weight at another bit width). ``watch``: record min / max of the
    float input of these fake-quant nodes."""

    def __init__(self, gm, acts: set, weights: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.acts, self.weights = acts, weights     # fq node set; wq get_attr node -> float tensor
        self.on: set = set()
        self.swap: dict = {}
        self.watch: dict = {}

    def run_node(self, n):
        if n in self.acts:
            src = self.env[n.args[0]]
            if n in self.watch:
                lo, hi = self.watch[n]
                mn, mx = src.min().float(), src.max().float()
                self.watch[n] = (mn if lo is None else torch.minimum(lo, mn), mx if hi is None else torch.maximum(hi, mx))
            if n not in self.on:
                return src
        if n in self.weights:
            if n in self.swap:
                return self.swap[n]
            if n not in self.on:
                return self.weights[n]
        return super().run_node(n)


@register_pass
@dataclass
class Sensitivity:
    name = "sensitivity"
    reads = "fake-quantized graph (before bias_correct); ctx.options['calibration_set']"
    writes = "ctx.results['sensitivity']; with widen=k: 16-bit qparams for the k costliest activations"
    preserves_semantics = False   # widen changes qparams; widen=0 changes nothing

    n: int = 64            # calibration samples measured, evenly spaced over the set
    batch_size: int = 64
    weights: bool = True   # measure the weights too (false: activations and outputs only, what widen ranks)
    weight_bits: int = 4   # also measure each weight at this width (0: only at its own)
    widen: int = 0         # the `widen` activation quantizers with the largest error -> wide_bits
    refine: int = 0        # the `refine` costliest 8-bit activations (-1: all) get the scale that minimises
                           # the step's x_{t-1} error with everything quantized (coordinate descent over a grid)
    budget: float = 0.0    # > 0: mixed weight precision, at most this many bits per weight on average
                           # (each weight's width chosen for the least summed error)
    widths: str = "all"    # the budget's choices per weight: "all" (every width from weight_bits to its own, each
                           # measured; the default since 2026-12-07) or "ends" (weight_bits or its own bits)
    wide_bits: int = 16
    outputs: bool = True   # widen may pick mean / variance / x_{t-1} (false: the sampler's outputs keep their bits)
    seed: int = 0          # the noise of the DDPM step's x_{t-1} (the same for every tensor)
    t_weight: float = 0.0  # != 0: each sample's squared x_{t-1} error weighted by how far an error in its step's
                           # x_{t-1} moves the final sample (chain sensitivity, wrt the state) to this power
    t_chains: int = 32     # the float chains that weight is measured on (t_weight != 0)
    t_seed: int = 555_555  # their seed

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        from ptq4dm import distributed as dist

        cs = calibration_before_bias_correct(graph, ctx, "sensitivity", "a corrected bias is part of no single "
                                             "tensor's error")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"sensitivity n and batch_size must be >= 1, got n={self.n}, batch_size={self.batch_size}")
        if self.widen < 0 or not 9 <= self.wide_bits <= 16:
            raise ValueError(f"sensitivity widen must be >= 0 and wide_bits in [9, 16], got widen={self.widen}, "
                             f"wide_bits={self.wide_bits}")
        if self.weight_bits and not 2 <= self.weight_bits <= 8:
            raise ValueError(f"sensitivity weight_bits must be 0 or in [2, 8], got {self.weight_bits}")
        if self.refine < -1:
            raise ValueError(f"sensitivity refine must be -1 (all activations), 0 (off) or a count, got {self.refine}")
        if self.widths not in ("ends", "all"):
            raise ValueError(f"sensitivity widths must be 'ends' (weight_bits or the weight's own bits) or 'all' (every "
                             f"width in between too), got {self.widths!r}")
        if self.budget and not (self.weights and self.weight_bits):
            raise ValueError(f"sensitivity budget={self.budget} picks each weight's bits from its error at its own "
                             f"width and at weight_bits: it needs weights=true and weight_bits in [2, 8]")
        if self.t_weight and self.t_chains < 1:
            raise ValueError(f"sensitivity t_weight={self.t_weight} measures each step's weight on t_chains float chains; "
                             f"got t_chains={self.t_chains} (use >= 1, e.g. the default 32)")
        gm, qparams = graph.gm, graph.meta["qparams"]
        acts = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is FQ and QTENSOR in n.meta]
        all_wq = [n for n in graph.graph.nodes if n.op == "get_attr" and FLOAT_WEIGHT in n.meta]
        wq = all_wq if self.weights else []
        if not acts and not all_wq:
            raise ValueError("sensitivity found no fake-quant nodes: run 'fakequant' before it")
        floats = {n: _attr(gm, n.meta[FLOAT_WEIGHT]) for n in all_wq}
        interp = _Toggle(gm, set(acts), floats)

        # the measured samples: n evenly spaced over the calibration set (which is sorted by nothing
        # in particular: NDTC draws t at random), the same noise for every tensor
        total = cs.x.shape[0]
        idx = torch.linspace(0, total - 1, min(self.n, total)).round().long().unique()
        device = graph.example_inputs[0].device
        size = self.batch_size if graph.dynamic_batch else int(graph.example_inputs[0].shape[0])
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((idx.numel(), *cs.x.shape[1:]), generator=g)
        chunks = [(cs.x[idx[i:i + size]], cs.t[idx[i:i + size]], noise[i:i + size]) for i in range(0, idx.numel(), size)]
        if not graph.dynamic_batch:
            chunks = [c for c in chunks if c[0].shape[0] == size]
            if not chunks:
                raise ValueError(f"sensitivity: the graph was captured with a static batch of {size} and n={self.n} "
                                 f"gives no full batch; pass n >= {size}")
        weights, t_report = [torch.ones(c[0].shape[0]) for c in chunks], None
        if self.t_weight:   # each sample's error counted by how far its step's x_{t-1} error moves the final sample
            from .reconstruct import chain_step_table

            table = chain_step_table(graph, ctx, self.t_chains, self.t_seed, "sensitivity{t_weight}", wrt="state")
            per = [table[c[1].cpu()] for c in chunks]
            if not all(bool((p > 0).all()) for p in per):
                raise ValueError("sensitivity{t_weight}: some calibration samples are at timesteps the graph's sampler "
                                 "does not visit (their step has no measured weight): calibrate on the graph's sampler")
            top = float(torch.cat(per).log().mul(self.t_weight).max())   # in logs: a large power neither over- nor
            per = [(p.log() * self.t_weight - top).exp() for p in per]      # underflows
            mean = float(torch.cat(per).mean())
            weights = [p / mean for p in per]
            ts = graph.meta["sampler"].timesteps.cpu()
            t_report = {"power": self.t_weight, "chains": self.t_chains, "wrt": "state",
                        "sensitivity_per_step": table[ts].tolist()}   # ||d x_0 / d x_{t-1}||^2 / d, sampler order

        def run(on=(), swap=None, data=None) -> list[torch.Tensor]:
            interp.on, interp.swap = set(on), dict(swap or {})
            outs = []
            with torch.no_grad():
                for x, t, nz in (chunks if data is None else data):
                    outs.append(interp.run(x.to(device), t.to(device), nz.to(device))[0].float().cpu())
            return outs

        ref = run()
        sq = lambda a, w: float((a.pow(2).flatten(1).sum(1).double() * w).sum())   # per-sample weighted squared size
        denom = sum(sq(r, w) for r, w in zip(ref, weights))

        def err(outs) -> float:   # squared error of x_{t-1} (each sample at its weight), relative to its energy
            return sum(sq(o - r, w) for o, r, w in zip(outs, ref, weights)) / max(denom, 1e-30)

        low: dict = {}   # (weight node, bits) -> the weight on the MSE grid of that width
        if self.weight_bits and self.weights:
            for n in wq:
                qt = n.meta[QTENSOR]
                own = _bits(qparams[qt.key])
                if own <= self.weight_bits:
                    continue
                w = floats[n].detach().float()
                for b in range(self.weight_bits, own if self.budget and self.widths == "all" else self.weight_bits + 1):
                    qmax = 2 ** (b - 1) - 1
                    qp = solve_mse(w, -qmax, qmax, True, qparams[qt.key].axis, name=qt.key)
                    low[n, b] = fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis).to(floats[n].dtype)
        jobs = [(n, None) for n in acts + wq] + list(low)

        def measure() -> dict:
            it = dist.my_batches(jobs)
            if ctx.progress:
                from tqdm import tqdm

                it = tqdm(it, desc="sensitivity", unit="tensor", leave=False)
            out = {}
            for j, (n, bits) in it:
                out[j] = err(run(swap={n: low[n, bits]}) if bits else run(on={n}))
            return out

        errors = dist.gather_batches("sensitivity", measure)
        rows, by_key = [], {}
        for j, (n, bits) in enumerate(jobs):
            qt = n.meta[QTENSOR]
            if bits is not None:
                by_key[qt.key][f"error_w{bits}"] = errors[j]
                continue
            qp = qparams[qt.key]
            row = {"key": qt.key, "role": qt.spec.role, "bits": _bits(qp), "error": errors[j],
                   "elements": int(floats[n].numel()) if n in floats else None}
            by_key[qt.key] = row
            rows.append(row)
        s = sum(r["error"] for r in rows) or 1.0
        for r in rows:
            r["share"] = r["error"] / s
        rows.sort(key=lambda r: -r["error"])
        together = err(run(on=set(acts) | set(all_wq)))
        full = [(cs.x[i:i + size], cs.t[i:i + size], torch.zeros_like(cs.x[i:i + size]))
                for i in range(0, total, size) if graph.dynamic_batch or min(size, total - i) == size]
        widened = self._widen(graph, acts, interp, rows, run, full) if self.widen else []
        _relabel(ctx, qparams, {k: f"-> int{self.wide_bits} (sensitivity widen; errors are the 8-bit solve's)"
                                for k in widened})
        refined = self._refine(graph, acts, all_wq, rows, run, err, ctx.progress) if self.refine else None
        if refined:
            _relabel(ctx, qparams, {k: f"(sensitivity refine: scale x{c})" for k, c in refined["factors"].items()})
        mixed = self._mix(graph, wq, floats, low, rows) if self.budget else None
        if mixed:
            _relabel(ctx, qparams, {r["key"]: f"-> int{r['bits']} (sensitivity budget {self.budget:g} bits / weight)"
                                    for r in mixed["layers"] if r["bits"] < r["own_bits"]})
        result = {"rows": rows, "n": int(idx.numel()), "error_all": together, "error_sum": s, "widened": widened}
        if mixed:
            result["mixed"] = mixed
        if t_report:
            result["t_weight"] = t_report
        if refined:
            result["refined"] = refined
        if widened or mixed:   # the step's error with every quantizer on, after what this pass changed
            interp.watch = {}
            after = err(run(on=set(acts) | set(all_wq)))
            result.update({"error_all_widened": after} if widened else {}, **({"error_all_mixed": after} if mixed else {}))
        ctx.results["sensitivity"] = result

    REFINE_GRID = (0.6, 0.7, 0.8, 0.9, 1.1, 1.25, 1.5)

    def _refine(self, graph: StepGraph, acts, all_wq, rows, run, err, progress: bool) -> dict:
        """Output-aware ranges: the solver fits each activation's range to that tensor's own error;
        here the costliest ones, in sensitivity order, take the scale (the solved one times a factor
        from REFINE_GRID, zero point kept) that gives the least error of x_{t-1} with every quantizer
        on, each choice made with the previous ones in place (one sweep of coordinate descent, on the
        same measured samples as the ranking)."""
        qparams, gm = graph.meta["qparams"], graph.gm
        by_key = {n.meta[QTENSOR].key: n for n in acts}
        keys = [r["key"] for r in rows if r["key"] in by_key and r["role"] != "weight"
                and _bits(qparams[r["key"]]) <= 8]
        if self.refine > 0:
            keys = keys[: self.refine]
        on = set(acts) | set(all_wq)
        best = start = err(run(on=on))
        factors = {}
        it = keys
        if progress:
            from tqdm import tqdm

            it = tqdm(keys, desc="sensitivity refine", unit="tensor", leave=False)
        for k in it:
            n = by_key[k]
            s_node = n.args[1]
            if s_node.target is aten.index.Tensor:
                s_node = s_node.args[0]
            s_buf = _attr(gm, s_node.target)
            base, pick = s_buf.detach().clone(), 1.0
            for c in self.REFINE_GRID:
                s_buf.copy_(base * c)
                e = err(run(on=on))
                if e < best:
                    best, pick = e, c
            s_buf.copy_(base * pick)
            if pick != 1.0:
                old = qparams[k]
                qparams[k] = QParams(s_buf.detach().clone(), old.zero_point, old.qmin, old.qmax, old.axis, old.groups)
                factors[k] = pick
        return {"tensors": len(keys), "factors": factors, "error_before": start, "error_after": best}

    def _widen(self, graph: StepGraph, acts, interp: _Toggle, rows, run, full) -> list[str]:
        """Give the `widen` costliest activations (not already wider than 8 bits) 16-bit qparams over
        the range their float input takes on the whole calibration set."""
        qparams, gm = graph.meta["qparams"], graph.gm
        by_key = {n.meta[QTENSOR].key: n for n in acts}
        from .mark import OUTPUT_ROLES

        pick = [r["key"] for r in rows if r["key"] in by_key and r["role"] != "weight" and r["bits"] <= 8
                and (self.outputs or r["role"] not in OUTPUT_ROLES)][: self.widen]
        if not pick:
            return []
        interp.watch = {by_key[k]: (None, None) for k in pick}
        run(data=full)   # the float graph over the whole calibration set, recording the inputs' range
        lo_hi, interp.watch = dict(interp.watch), {}
        half = 2 ** (self.wide_bits - 1)
        for k in pick:
            n = by_key[k]
            lo, hi = lo_hi[n]
            old = qparams[k]
            # the solved 8-bit range is inside the observed one unless the solver widened it: keep the union
            r_lo = (old.qmin - old.zero_point.float()) * old.scale.float()
            r_hi = (old.qmax - old.zero_point.float()) * old.scale.float()
            lo, hi = torch.minimum(lo.cpu(), r_lo.min().cpu()), torch.maximum(hi.cpu(), r_hi.max().cpu())
            qp = qparams_from_range(lo, hi, -half, half - 1, False)
            s_node, z_node = n.args[1], n.args[2]
            grouped = s_node.target is aten.index.Tensor
            if grouped:
                s_node, z_node = s_node.args[0], z_node.args[0]
            s_buf, z_buf = _attr(gm, s_node.target), _attr(gm, z_node.target)
            s_buf.copy_(qp.scale.to(s_buf).expand_as(s_buf))
            z_buf.copy_(qp.zero_point.to(z_buf).expand_as(z_buf))
            n.args = (n.args[0], n.args[1], n.args[2], -half, half - 1, *n.args[5:])
            qparams[k] = QParams(s_buf.detach().clone(), z_buf.detach().clone(), -half, half - 1, old.axis, old.groups)
        gm.recompile()
        return pick

    def _mix(self, graph: StepGraph, wq, floats: dict, low: dict, rows) -> dict:
        """A bit width per weight for an average of at most ``budget`` bits per weight with the least
        summed error: every weight starts at ``weight_bits``, then weights move up in the order of error
        saved per extra bit and element (the greedy answer to this knapsack; the errors are the
        single-tensor errors measured above, which add up when they are small). With ``widths="ends"``
        a weight's one move is back to its own width; with ``widths="all"`` its moves run along the
        lower convex hull of its measured (bits, error) points, so their savings per bit fall and a
        weight never takes a later move before an earlier one (a move that does not fit ends that
        weight's moves). The weights left under their own width get that width's buffers and qparams."""
        qparams, gm = graph.meta["qparams"], graph.gm
        by_key = {r["key"]: r for r in rows}
        layers = []
        for n in wq:
            key = n.meta[QTENSOR].key
            own = _bits(qparams[key])
            r = by_key[key]
            lo = min(own, self.weight_bits)   # already at or under weight_bits: stays
            points = {b: r[f"error_w{b}"] for b in range(lo, own) if f"error_w{b}" in r}
            points[own] = r["error"]
            layers.append({"key": key, "node": n, "elements": int(floats[n].numel()), "own_bits": own,
                           "bits": lo, "points": points})
        total = sum(l["elements"] for l in layers)
        budget_bits = float(self.budget) * total
        used = sum(l["bits"] * l["elements"] for l in layers)
        if used > budget_bits:
            raise ValueError(f"sensitivity budget={float(self.budget):g} bits per weight is below what every weight at "
                             f"weight_bits={self.weight_bits} takes ({used / total:.2f}); raise it or lower weight_bits")
        moves = []   # (error saved per extra bit and element, layer, from, to): each layer's hull, in its order
        for i, l in enumerate(layers):
            pts = sorted(l["points"].items())
            cur = 0
            while cur < len(pts) - 1:
                (b0, e0), el = pts[cur], l["elements"]
                nxt = max(range(cur + 1, len(pts)), key=lambda j: ((e0 - pts[j][1]) / ((pts[j][0] - b0) * el), pts[j][0]))
                moves.append(((e0 - pts[nxt][1]) / ((pts[nxt][0] - b0) * el), i, b0, pts[nxt][0]))
                cur = nxt
        stopped = set()
        for _, i, b0, b1 in sorted(moves, key=lambda m: -m[0]):
            l = layers[i]
            if i in stopped or l["bits"] != b0:
                continue
            extra = (b1 - b0) * l["elements"]
            if used + extra <= budget_bits:
                l["bits"], used = b1, used + extra
            else:
                stopped.add(i)
        for l in layers:
            if l["bits"] == l["own_bits"]:
                continue
            n, key, old = l["node"], l["key"], qparams[l["key"]]
            qmax = 2 ** (l["bits"] - 1) - 1
            qp = solve_mse(floats[n].detach().float(), -qmax, qmax, True, old.axis, name=key)
            buf = _attr(gm, n.target)
            buf.copy_(low[n, l["bits"]].to(buf))
            qparams[key] = QParams(qp.scale.to(old.scale), qp.zero_point.to(old.zero_point), qp.qmin, qp.qmax,
                                   old.axis, old.groups)
        err_sum = sum(l["points"][l["bits"]] for l in layers) or 1.0
        table = [{"key": l["key"], "bits": l["bits"], "own_bits": l["own_bits"], "elements": l["elements"],
                  "bytes": l["elements"] * l["bits"] / 8, "error": l["points"][l["bits"]]} for l in layers]
        for r in table:
            r["share"] = r["error"] / err_sum
        table.sort(key=lambda r: -r["error"])
        return {"budget": float(self.budget), "widths": self.widths, "average_bits": used / total, "weights": total,
                "bytes": sum(r["bytes"] for r in table), "bytes_at_own_bits": sum(l["own_bits"] * l["elements"] / 8
                                                                                for l in layers),
                "layers": table}
