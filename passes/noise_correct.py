"""noise_correct: a per-step affine correction of the UNet's output, fitted on the calibration set.

reads:  the quantized graph (after ``fakequant`` / ``bias_correct``); ``ctx.options['calibration_set']``;
        ``ctx.options['fp_step']`` (the full-precision step, for the target output)
writes: after the UNet's output node (the prediction the sampler reads: eps, or eps and the
        variance interpolation v for learned-range models), ``y' = y * a[g] + b[g]`` with ``a``,
        ``b`` (G, C) tables (buffers ``ptq4dm_nc_scale`` / ``ptq4dm_nc_shift``) gathered by the
        group g of each sample's t; ``graph.meta['noise_correct']``; ``ctx.results['noise_correct']``

Quantization error in the predicted noise is not independent of the noise: PTQD (He et al.,
NeurIPS 2023, "PTQD: Accurate Post-Training Quantization for Diffusion Models", Sec. 3.2) finds
``eps_q ~= (1 + k) eps + b + r`` with r uncorrelated, k and b depending on the step. A
deterministic sampler (DDIM, eta 0) applies the correlated part at every step in the same
direction, so it accumulates along the chain where ancestral noise would hide it.
``bias_correct`` removes each layer's own mean error; this pass removes what is left at the
output, end to end: per group of sampler steps and per output channel, PTQD's fit of the
quantized graph's output on the FP UNet's output on the same (x_t, t) of the calibration set,
``y_q = (1 + k) y + c`` (``1 + k = cov(y_q, y) / var(y)``, clamped to [0.5, 2]), inverted:
``y' = (y_q - c) / (1 + k)``, so that ``E[y' | y] = y``. (The other regression, y on y_q, is
the least-squares estimate of each step's y but shrinks it towards its mean, a drift that a
deterministic chain accumulates: measured worse on DDIM-50, docs/results/history.md.) Groups with fewer than
``min_samples`` calibration samples keep the identity. Cost at run time: one fused
multiply-add on the UNet's output.

``fit=chains`` fits the tables on the states the quantized sampler itself visits instead of the
calibration set's (FP-chain) x_t: ``chains`` chains of the graph's own sampler from ``chain_seed``,
run with the correction in place; at each step the quantized UNet output on the chain's x_t is
regressed on the FP UNet's output on the same x_t, the step's group row refitted from that group's
moments so far and applied to the step's output before the chain moves on, so that each step is
fitted on the states the corrected sampler reaches (the one-signed mean drift that accumulates along
a chain is measured where it accumulates). Its cost: ``chains`` x steps of the quantized step and
the FP UNet, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ptq4dm.ir.graph import ROLE, StepGraph

from .base import PassContext, register_pass

aten = torch.ops.aten


def unet_output_node(graph: StepGraph) -> fx.Node:
    """The UNet's prediction as the sampler reads it: the last UNet node that feeds a node outside
    the UNet, followed through the passes' own elementwise epilogues on it (``bias_correct``'s
    group tables: ``add(y, table row)``)."""
    found = None
    for n in graph.graph.nodes:
        if n.meta.get(ROLE) == "unet" and n.op == "call_function" and any(u.meta.get(ROLE) != "unet" for u in n.users):
            found = n
    if found is None:
        raise ValueError("noise_correct found no UNet output read by the sampler in this graph; is it a "
                         "captured step graph (ptq4dm.capture_step)?")
    while len(found.users) == 1:
        u = next(iter(found.users))
        if u.meta.get(ROLE) != "quant" or u.target not in (aten.add.Tensor, aten.mul.Tensor) or u.args[0] is not found:
            break
        found = u
    return found


@register_pass
@dataclass
class NoiseCorrect:
    name = "noise_correct"
    reads = "quantized graph; ctx.options['calibration_set'] (fit=calibration); ctx.options['fp_step']"
    writes = "y * a[g] + b[g] after the UNet output, (G, C) tables ptq4dm_nc_scale / ptq4dm_nc_shift"
    preserves_semantics = False

    groups: int = 10        # groups of sampler steps (clamped to the sampler's step count)
    batch_size: int = 128
    seed: int = 0
    min_samples: int = 10   # a group with fewer samples keeps the identity
    fit: str = "calibration"   # or "chains": on the quantized graph's own sampling chains
    chains: int = 64        # fit=chains: how many chains
    chain_seed: int = 123_456_789   # fit=chains: their seed (keep it away from the seeds results are judged on)

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        from .calibrate import group_table

        cs, fp_step = ctx.options.get("calibration_set"), ctx.options.get("fp_step")
        if self.fit not in ("calibration", "chains"):
            raise ValueError(f"noise_correct fit must be 'calibration' (the calibration set's x_t) or 'chains' "
                             f"(the quantized graph's own sampling chains), got {self.fit!r}")
        if fp_step is None or (cs is None and self.fit == "calibration"):
            need = "the calibration set and the FP step" if self.fit == "calibration" else "the FP step (fit=chains)"
            raise ValueError(f"noise_correct needs {need}: run it after 'calibrate' (and 'fakequant') in a "
                             "ptq4dm.quantize pipeline, e.g. '...,fakequant,noise_correct'")
        if self.groups < 1:
            raise ValueError(f"noise_correct groups must be >= 1, got {self.groups}")
        if self.chains < 1:
            raise ValueError(f"noise_correct chains must be >= 1, got {self.chains}")
        gm = graph.gm
        sampler = graph.meta["sampler"]
        G = min(self.groups, sampler.S)
        table = group_table(sampler, G)
        node = unet_output_node(graph)
        if self.fit == "chains":
            samples = self._fit_chains(graph, node, table, G, fp_step, ctx.progress)
        else:
            a, b = _solve(self._calibration_stats(graph, node, table, G, cs, fp_step, ctx.progress))
            samples = torch.bincount(table[cs.t.cpu()], minlength=G)
            thin = samples < self.min_samples
            a[thin], b[thin] = 1.0, 0.0
            insert_correction(graph, node, table, a, b)
        graph.meta["noise_correct"] = {"node": node.name, "groups": G, "fit": self.fit}
        ctx.results["noise_correct"] = {"node": node.name, "groups": G, "fit": self.fit,
                                        "samples_per_group": samples.tolist(),
                                        "scale": gm.ptq4dm_nc_scale.tolist(), "shift": gm.ptq4dm_nc_shift.tolist()}

    def _calibration_stats(self, graph, node, table, G, cs, fp_step, progress) -> torch.Tensor:
        """(G, C, 5) moments of the (quantized, FP) UNet outputs over the calibration set's (x_t, t)."""
        device = graph.example_inputs[0].device
        size = self.batch_size if graph.dynamic_batch else int(graph.example_inputs[0].shape[0])
        batches = [b for b in cs.batches(size) if graph.dynamic_batch or b[0].shape[0] == size]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="noise_correct", unit="batch", leave=False)
        stats = None
        gen = torch.Generator().manual_seed(self.seed)
        interp = Capture(graph.gm, node)
        with torch.no_grad():
            for x, t in batches:
                x, t = x.to(device), t.to(device)
                interp.run(x, t, torch.randn(x.shape, generator=gen).to(device))
                s = _moments(interp.seen.pop(node), _fp_output(fp_step, x, t, node), table[t.cpu()], G)
                stats = s if stats is None else stats + s
        return stats

    def _fit_chains(self, graph, node, table, G, fp_step, progress) -> torch.Tensor:
        """The tables fitted along ``chains`` chains of the graph's own sampler with the correction in
        place (identity at first): at each step, the quantized UNet output on the chain's x_t and the FP
        UNet's on the same x_t add to the moments of the step's group, whose row is refitted before the
        graph goes on to apply it, so every later step sees the corrected chain's states. Returns the
        samples seen per group (chains x steps in the group)."""
        from ptq4dm.models.step import trajectory

        gm, ex = graph.gm, graph.example_inputs[0]
        sampler = graph.meta["sampler"]
        if graph.dynamic_batch:
            sizes = [min(self.chains, self.batch_size)] * (self.chains // self.batch_size)
            if self.chains % self.batch_size:
                sizes.append(self.chains % self.batch_size)
        else:   # a static batch: whole batches of the graph's size
            b = int(ex.shape[0])
            sizes = [b] * -(-self.chains // b)
        C = int(ex.shape[1]) if not isinstance(node.meta.get("val"), torch.Tensor) else int(node.meta["val"].shape[1])
        stats = torch.zeros(G, C, 5, dtype=torch.float64)
        insert_correction(graph, node, table, torch.ones(G, C), torch.zeros(G, C))
        seen = torch.zeros(G, dtype=torch.long)
        cur, min_samples = {}, self.min_samples

        class Fit(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n is node:
                    x, t = cur["x"], cur["t"]
                    grp = table[t.cpu()]
                    stats.add_(_moments(out, _fp_output(fp_step, x, t, node), grp, G))
                    seen.add_(torch.bincount(grp, minlength=G))
                    rows = [r for r in grp.unique().tolist() if int(seen[r]) >= min_samples]
                    if rows:
                        a, c = _solve(stats[rows])
                        gm.ptq4dm_nc_scale[rows] = a.to(gm.ptq4dm_nc_scale)
                        gm.ptq4dm_nc_shift[rows] = c.to(gm.ptq4dm_nc_shift)
                return out

        interp = Fit(gm)

        def step_fn(x, t, noise):
            cur["x"], cur["t"] = x, t
            return interp.run(x, t, noise)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sampler.S * len(sizes), desc="noise_correct chains", unit="step", leave=False)
        with torch.no_grad():
            for j, m in enumerate(sizes):
                gen = torch.Generator().manual_seed(self.chain_seed + j)
                x_T = torch.randn((m, *ex.shape[1:]), generator=gen).to(ex.device, ex.dtype)
                for _ in trajectory(step_fn, sampler, x_T, gen):
                    if bar is not None:
                        bar.update()
        if bar is not None:
            bar.close()
        return seen


class Capture(fx.Interpreter):
    """Runs the graph and keeps the values of the given nodes in ``seen`` (node -> value)."""

    def __init__(self, gm: fx.GraphModule, *nodes: fx.Node):
        super().__init__(gm)
        self.nodes, self.seen = set(nodes), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.nodes:
            self.seen[n] = out
        return out


def _fp_output(fp_step, x: torch.Tensor, t: torch.Tensor, node: fx.Node) -> torch.Tensor:
    f = fp_step.unet(x, t)
    f = f.sample if hasattr(f, "sample") else f
    want = node.meta.get("val")
    if isinstance(want, torch.Tensor) and tuple(f.shape[1:]) != tuple(want.shape[1:]):
        raise ValueError(f"noise_correct: the FP UNet returns {tuple(f.shape)} but the graph's UNet "
                         f"output node {node.name} is {tuple(want.shape)}")
    return f


def _moments(q: torch.Tensor, f: torch.Tensor, group: torch.Tensor, G: int) -> torch.Tensor:
    """(G, C, 5) sums of 1, q, f, f^2, q f per group of steps and channel (float64, on the CPU)."""
    q, f = q.double(), f.double()
    if f.shape != q.shape:
        raise ValueError(f"noise_correct: the FP UNet returns {tuple(f.shape)} but the quantized graph's UNet "
                         f"output is {tuple(q.shape)}")
    B, C = q.shape[:2]
    q, f = q.reshape(B, C, -1), f.reshape(B, C, -1)
    per = torch.stack([torch.full_like(q[..., 0], q.shape[-1]), q.sum(-1), f.sum(-1), (f * f).sum(-1),
                       (q * f).sum(-1)], -1)                                      # (B, C, 5)
    onehot = torch.nn.functional.one_hot(group.to(per.device), G).double()       # (B, G)
    return torch.einsum("bg,bck->gck", onehot, per).cpu()


def _solve(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PTQD's fit y_q = (1 + k) y + c per row and channel, inverted: (a, b) with y' = a y_q + b, E[y' | y] = y."""
    n, sq, sf, sff, sqf = stats.unbind(-1)
    nz = n.clamp(min=1)
    var_f = sff / nz - (sf / nz) ** 2
    cov = sqf / nz - (sq / nz) * (sf / nz)
    gain = torch.where(var_f > 1e-12, cov / var_f.clamp(min=1e-12), torch.ones_like(var_f))   # 1 + k
    gain = gain.clamp(min=0.5, max=2.0)
    a = 1.0 / gain                                     # y' = (y - c) / (1 + k)
    b = -(sq / nz - gain * sf / nz) * a
    return a, b


def insert_correction(graph: StepGraph, node: fx.Node, table: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``y' = y * a[g] + b[g]`` right after ``node``, the (G, C) tables buffers gathered by t's group."""
    g, gm = graph.graph, graph.gm
    device = graph.example_inputs[0].device
    dtype = node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor) else torch.float32
    gm.register_buffer("ptq4dm_nc_group_of_t", table.to(device))
    gm.register_buffer("ptq4dm_nc_scale", a.to(dtype).to(device))
    gm.register_buffer("ptq4dm_nc_shift", b.to(dtype).to(device))
    rank = node.meta["val"].dim() if isinstance(node.meta.get("val"), torch.Tensor) else 4
    shape = [-1, int(a.shape[1])] + [1] * (rank - 2)
    with g.inserting_before(node.next):   # right after the output, in order
        tab = g.get_attr("ptq4dm_nc_group_of_t")
        grp = g.call_function(aten.index.Tensor, (tab, [graph.placeholders()[1]]))
        sa, sb = g.get_attr("ptq4dm_nc_scale"), g.get_attr("ptq4dm_nc_shift")
        ra = g.call_function(aten.view.default, (g.call_function(aten.index.Tensor, (sa, [grp])), shape))
        rb = g.call_function(aten.view.default, (g.call_function(aten.index.Tensor, (sb, [grp])), shape))
        mul = g.call_function(aten.mul.Tensor, (node, ra))
        new = g.call_function(aten.add.Tensor, (mul, rb))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not mul)
    for m in (tab, grp, sa, sb, ra, rb, mul, new, *ra.args, *rb.args):
        if isinstance(m, fx.Node):
            m.meta[ROLE] = "quant"
    if "val" in node.meta:
        new.meta["val"] = node.meta["val"]
    gm.recompile()
