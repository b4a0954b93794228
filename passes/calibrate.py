"""calibrate: NDTC (normally distributed time-step calibration) and the paper's baselines.

reads:  the observed graph; ``ctx.options['fp_step']`` (the full-precision step function) and
        ``graph.meta['sampler']``; ``ctx.options['calibration']`` (an NDTC / Uniform / Single /
        RandomNoise config)
writes: observer statistics (runs the observed graph on the calibration set);
        ``ctx.results['calibration']``: the set's timesteps and its cache path

NDTC (PTQ4DM, Sec. 4): for each of N samples draw t ~ N(mu*T, (sigma*T)^2), clamp to [0, T-1]
and snap to the nearest timestep the sampler actually uses (respacing included). Start from
x_T ~ N(0, I), run the *full-precision* sampler, and keep the sample's x_t at its drawn step:
exactly the (x_t, t) pair the sampler feeds the UNet at inference. The chain of a batch stops
at the last step any of its samples needs.

``per_chain = K`` (NDTC and Uniform; ours, not the paper's): K consecutive samples share one chain, each
at its own drawn step, so the set has n samples from n / K chains. Every step is still drawn from the
same distribution (the set's marginal over t is unchanged); only the samples of one chain are no
longer independent. A batch's chain runs to its last needed step either way, so K samples per chain
cost about 1 / K of the chains' compute: the lever for the large sets that ``reconstruct`` learns
4-bit rounding on (Q-Diffusion also takes many timesteps from each of its calibration chains).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ptq4dm.ir.graph import StepGraph

from .base import PassContext, register_pass
from .observe import observers


@dataclass(frozen=True)
class NDTC:
    """t ~ N(mu*T, (sigma*T)^2); the paper: sigma = 1/2, mu <= 1/2 (reference script: 0.4, 0.4)."""

    mu: float = 0.4
    sigma: float = 0.5
    n: int = 1024
    batch_size: int = 128
    seed: int = 0
    kind: str = "ndtc"
    per_chain: int = 1   # samples taken from one chain (each at its own drawn step); ours, the paper: 1

    def validate(self) -> None:
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"NDTC mu must be a fraction of T in [0, 1] (the paper: mu <= 0.5), got {self.mu}")
        if not self.sigma > 0:
            raise ValueError(f"NDTC sigma must be > 0 (a fraction of T; the paper: 0.5), got {self.sigma}")
        _check_n(self)

    def draw(self, sampler, gen: torch.Generator) -> torch.Tensor:
        T = sampler.T
        t = torch.randn(self.n, generator=gen, dtype=torch.float64) * (self.sigma * T) + self.mu * T
        return t.clamp(0, T - 1)


@dataclass(frozen=True)
class Uniform:
    """Baseline: t uniform over the sampler's timesteps, x_t from the real chain."""

    n: int = 1024
    batch_size: int = 128
    seed: int = 0
    kind: str = "uniform"
    per_chain: int = 1   # samples taken from one chain, as NDTC.per_chain

    def validate(self) -> None:
        _check_n(self)

    def draw(self, sampler, gen):
        return torch.rand(self.n, generator=gen, dtype=torch.float64) * (sampler.T - 1)


@dataclass(frozen=True)
class Single:
    """Baseline: one timestep for every sample (``t_frac`` of T, snapped to the sampler's grid)."""

    t_frac: float = 0.5
    n: int = 1024
    batch_size: int = 128
    seed: int = 0
    kind: str = "single"

    def validate(self) -> None:
        if not 0.0 <= self.t_frac <= 1.0:
            raise ValueError(f"Single.t_frac must be in [0, 1], got {self.t_frac}")
        _check_n(self)

    def draw(self, sampler, gen):
        return torch.full((self.n,), self.t_frac * (sampler.T - 1), dtype=torch.float64)


@dataclass(frozen=True)
class RandomNoise:
    """Baseline: x ~ N(0, I) instead of the real trajectory, t uniform."""

    n: int = 1024
    batch_size: int = 128
    seed: int = 0
    kind: str = "random"

    def validate(self) -> None:
        _check_n(self)

    def draw(self, sampler, gen):
        return torch.rand(self.n, generator=gen, dtype=torch.float64) * (sampler.T - 1)


CALIBRATIONS = {"ndtc": NDTC, "uniform": Uniform, "single": Single, "random": RandomNoise}


def _check_n(c) -> None:
    if c.n < 1:
        raise ValueError(f"calibration needs n >= 1 samples, got {c.n}")
    if c.batch_size < 1:
        raise ValueError(f"calibration batch_size must be >= 1, got {c.batch_size}")
    k = getattr(c, "per_chain", 1)
    if k < 1 or c.batch_size % k:
        raise ValueError(f"calibration per_chain must be >= 1 and divide batch_size (a chain's samples stay in one "
                         f"batch); got per_chain={k}, batch_size={c.batch_size}")


@dataclass
class CalibrationSet:
    """The (x_t, t) pairs observers see: x (N, C, H, W) float32, t (N,) int64 training timesteps,
    step (N,) int64 index into the sampler's timestep list."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor
    config: dict = field(default_factory=dict)

    def batches(self, size: int):
        for i in range(0, self.x.shape[0], size):
            yield self.x[i:i + size], self.t[i:i + size]


MIN_SAMPLES_PER_GROUP = 10   # below this, per-group ranges were measured to lose (docs/results/history.md)


def group_table(sampler, groups: int) -> torch.Tensor:
    """(T,) int64: the timestep group of every training timestep t. Group i holds sampler steps
    [i*S/G, (i+1)*S/G) (step 0 is the noisiest); a t the sampler never uses gets its nearest step's group."""
    steps = snap_to_sampler(torch.arange(sampler.T, dtype=torch.float64), sampler)
    return (steps * groups // sampler.S).long()


def snap_to_sampler(t_cont: torch.Tensor, sampler) -> torch.Tensor:
    """Index (into sampler.timesteps) of the sampler timestep nearest to each continuous t."""
    ts = sampler.timesteps.double()
    return (t_cont[:, None] - ts[None, :]).abs().argmin(dim=1)


def cache_key(model_hash: str, sampler_cfg: dict, calib) -> str:
    cfg = asdict(calib)
    if cfg.get("per_chain") == 1:   # the sets cached before per_chain existed keep their keys
        del cfg["per_chain"]
    blob = json.dumps({"model": model_hash, "sampler": sampler_cfg, "calib": cfg, "v": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PTQ4DM_CACHE", Path.home() / ".cache" / "ptq4dm"))


@torch.no_grad()
def make_calibration_set(fp_step: Callable, sampler, calib, shape: tuple[int, ...], progress: bool = True,
                         cache_dir: Path | None = None, model_hash: str | None = None,
                         device: str | torch.device = "cpu") -> CalibrationSet:
    """Build (or load from the cache) the calibration set of ``calib`` for this model and sampler.

    The timesteps come from ``calib.seed``; batch ``b`` (``calib.batch_size`` samples, its chain
    run to the last step any of them needs) draws x_T and its noise from its own seed
    (``distributed.batch_seed(calib.seed, b)``), so inside a torch.distributed group every rank
    runs its share of the batches and the gathered set is the one a single process builds. Only
    rank 0 writes the cache."""
    from ptq4dm import distributed as dist

    calib.validate()
    path = None
    if cache_dir is not None and model_hash is not None:
        path = Path(cache_dir) / f"calib-{calib.kind}-{cache_key(model_hash, sampler.config(), calib)}.safetensors"
        if all(dist.agree("calibration cache lookup", path.exists)):
            from safetensors.torch import load_file

            d = load_file(str(path))
            return CalibrationSet(d["x"], d["t"], d["step"], {"cache": str(path), "cached": True, **asdict(calib)})
    gen = torch.Generator().manual_seed(calib.seed)
    steps = snap_to_sampler(calib.draw(sampler, gen), sampler)
    C = shape[1:]
    per_chain = getattr(calib, "per_chain", 1)
    batches = [steps[i:i + calib.batch_size] for i in range(0, calib.n, calib.batch_size)]
    mine = dist.my_batches(batches)

    def chains() -> dict[int, torch.Tensor]:
        bar = None
        if progress:
            from tqdm import tqdm

            total = sum(int(bs.max()) + 1 for _, bs in mine) if calib.kind != "random" else sum(bs.numel() for _, bs in mine)
            who = f" rank {dist.rank()}/{dist.world_size()}" if dist.world_size() > 1 else ""
            bar = tqdm(total=total, desc=f"calibration ({calib.kind}){who}",
                       unit="step" if calib.kind != "random" else "sample", leave=False)
        out = {}
        for b, bsteps in mine:
            g = torch.Generator().manual_seed(dist.batch_seed(calib.seed, b))
            nb = bsteps.numel()
            chain = torch.arange(nb) // per_chain   # the chain each sample of the batch is taken from
            nc = int(chain[-1]) + 1
            x = torch.randn((nc, *C), generator=g)
            if calib.kind == "random":
                out[b] = x
                if bar:
                    bar.update(nb)
                continue
            xb = torch.empty((nb, *C))
            last = int(bsteps.max())
            for i, t_val in enumerate(sampler.timesteps[: last + 1].tolist()):
                hit = bsteps == i
                if hit.any():
                    xb[hit] = x[chain[hit]].cpu()
                if i == last:
                    break
                t = torch.full((nc,), t_val, dtype=torch.long)
                noise = torch.randn(x.shape, generator=g)
                x = fp_step(x.to(device), t.to(device), noise.to(device))[0].float().cpu()
                if bar:
                    bar.update(1)
            out[b] = xb
        if bar:
            bar.close()
        return out

    parts = dist.gather_batches("calibration chains", chains)
    xs = torch.cat([parts[b] for b in range(len(batches))])
    t = sampler.timesteps[steps].long()
    cs = CalibrationSet(xs, t, steps.long(), {"cache": str(path) if path else None, "cached": False, **asdict(calib)})
    if path is not None and dist.is_main():
        from safetensors.torch import save_file

        from ptq4dm.ir.serialize import atomic_write

        atomic_write(path, lambda tmp: save_file({"x": xs.contiguous(), "t": t, "step": steps.long()}, tmp))
    return cs


@register_pass
@dataclass
class Calibrate:
    name = "calibrate"
    reads = "observer nodes; ctx.options['calibration_set'] or ctx.options['fp_step'] + graph.meta['sampler']"
    writes = "observer statistics; ctx.results['calibration']"
    preserves_semantics = True

    batch_size: int = 128
    seed: int = 0

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        cs: CalibrationSet | None = ctx.options.get("calibration_set")
        if cs is None:
            calib = ctx.options.get("calibration") or NDTC()
            fp_step = ctx.options.get("fp_step")
            sampler = graph.meta.get("sampler")
            if fp_step is None or sampler is None:
                raise ValueError("calibrate needs ctx.options['fp_step'] and graph.meta['sampler'] "
                                 "(or a ready ctx.options['calibration_set'])")
            cs = make_calibration_set(fp_step, sampler, calib, tuple(graph.example_inputs[0].shape),
                                      progress=ctx.progress, cache_dir=ctx.options.get("cache_dir"),
                                      model_hash=ctx.options.get("model_hash"))
            ctx.options["calibration_set"] = cs
        from ptq4dm import distributed as dist

        obs = observers(graph)
        if not obs:
            raise ValueError("calibrate found no observers: run 'mark,observe' before it")
        state: dict = {}
        for o in obs.values():
            o.state = state
        groups = int(graph.meta.get("timestep_groups", 1))
        table = group_table(graph.meta["sampler"], groups) if groups > 1 else None
        device = graph.example_inputs[0].device
        # a static graph (e.g. the batch-1 capture) takes exactly its captured batch size
        size = self.batch_size if graph.dynamic_batch else int(graph.example_inputs[0].shape[0])
        batches = [b for b in cs.batches(size) if graph.dynamic_batch or b[0].shape[0] == size]
        mine = dist.my_batches(batches)   # batch b runs on rank b % world_size; its noise and keys from (seed, b)

        def observe() -> dict:
            it = mine
            if ctx.progress:
                from tqdm import tqdm

                it = tqdm(mine, desc="observe", unit="batch", leave=False)
            with torch.no_grad():
                for b, (x, t) in it:
                    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(dist.batch_seed(self.seed, b)))
                    if x.shape[0] == 1 and graph.dynamic_batch:
                        x, t, noise = x.repeat(2, 1, 1, 1), t.repeat(2), noise.repeat(2, 1, 1, 1)
                    state["t"], state["batch"] = t, b
                    if table is not None:
                        state["group"] = table[t.cpu()]
                    graph.gm(x.to(device), t.to(device), noise.to(device))
            return {k: o.export() for k, o in obs.items()}

        exported = dist.agree("calibrate (observers)", observe)
        for k, o in obs.items():   # the merge, in rank order; one process: its own statistics, sorted
            o.absorb([e[k] for e in exported])
        state.pop("batch", None)
        ctx.results["calibration"] = {"n": int(cs.x.shape[0]), "timesteps": cs.t, "config": cs.config,
                                      "world_size": dist.world_size(),
                                      "observer_bytes": sum(o.nbytes() for o in obs.values())}
        if table is not None:
            per_group = torch.bincount(table[cs.t.cpu()], minlength=groups)
            ctx.results["calibration"]["samples_per_group"] = per_group.tolist()
            if int(per_group.min()) < MIN_SAMPLES_PER_GROUP:
                warnings.warn(
                    f"timestep_groups={groups}: some groups got few calibration samples (min {int(per_group.min())}, "
                    f"median {int(per_group.median())}; {int((per_group == 0).sum())} empty groups fall back to the "
                    f"all-t range). Per-group ranges fitted to a handful of images generalize badly; use about "
                    f"{MIN_SAMPLES_PER_GROUP * groups} calibration samples or fewer groups.", stacklevel=2)
