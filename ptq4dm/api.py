"""The public pipeline API.

    import ptq4dm
    step = ptq4dm.DiffusionStep(unet, ptq4dm.make_sampler("ddim", num_inference_steps=100))
    result = ptq4dm.quantize(step, calibration=ptq4dm.NDTC(n=1024), solver=ptq4dm.MSE(p=2))
    x0 = ptq4dm.sample(result.graph, step.sampler, (16, 1, 28, 28))
    print(result.report.table())
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq4dm.ir.capture import capture
from ptq4dm.ir.graph import StepGraph
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import MSE, NDTC, PRESETS, MinMax, PassContext, PassManager, QuantPolicy, TensorReport


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes and bytes), sorted by name."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode()); h.update(str(t.dtype).encode()); h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class QuantReport:
    """What the pipeline did: per-tensor qparams and errors, what stayed in float, timings."""

    tensors: list[TensorReport]
    left_in_float: list[tuple[str, str]]
    counts: dict[str, int]
    timings: dict[str, float]
    calibration: dict[str, Any] = field(default_factory=dict)
    policy: str = ""
    policy_obj: Any = None
    bias_correction: dict = field(default_factory=dict)   # the bias_correct pass's result, when it ran
    sensitivity: dict = field(default_factory=dict)       # the sensitivity pass's result, when it ran
    reconstruct: dict = field(default_factory=dict)       # the reconstruct pass's result, when it ran
    chain_gains: dict = field(default_factory=dict)       # the chain_gains pass's result, when it ran

    @property
    def total_error(self) -> float:
        return sum(t.error for t in self.tensors)

    @property
    def total_error_minmax(self) -> float:
        return sum(t.error_minmax for t in self.tensors)

    def table(self, limit: int | None = None) -> str:
        rows = self.tensors if limit is None else self.tensors[:limit]
        head = f"{'tensor':<58} {'role':<11} {'scale':>10} {'zp':>5} {'err (solver)':>13} {'err (minmax)':>13} {'gain':>6}"
        lines = [head, "-" * len(head)]
        for t in rows:
            lines.append(f"{t.key[:58]:<58} {t.role:<11} {t.scale:>10.3g} {t.zero_point:>5d} {t.error:>13.4g} "
                         f"{t.error_minmax:>13.4g} {min(t.gain, 999):>6.2f}")
        if limit is not None and len(self.tensors) > limit:
            lines.append(f"... {len(self.tensors) - limit} more tensors")
        lines.append(f"{'TOTAL (' + str(len(self.tensors)) + ' tensors)':<58} {'':<11} {'':>10} {'':>5} "
                     f"{self.total_error:>13.4g} {self.total_error_minmax:>13.4g} "
                     f"{self.total_error_minmax / max(self.total_error, 1e-30):>6.2f}")
        if self.left_in_float:
            lines.append(f"left in float: {len(self.left_in_float)} node(s): "
                         + "; ".join(f"{n} ({why})" for n, why in self.left_in_float[:6]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "counts": self.counts, "timings_s": self.timings,
                "total_error": self.total_error, "total_error_minmax": self.total_error_minmax,
                "left_in_float": [list(x) for x in self.left_in_float],
                "tensors": [dict(key=t.key, role=t.role, spec=t.spec, scale=t.scale, zero_point=t.zero_point,
                                 error=t.error, error_minmax=t.error_minmax) for t in self.tensors],
                **({"bias_correction": self.bias_correction} if self.bias_correction else {}),
                **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
                **({"reconstruct": self.reconstruct} if self.reconstruct else {}),
                **({"chain_gains": self.chain_gains} if self.chain_gains else {})}

    def sensitivity_table(self, limit: int | None = None) -> str:
        """The sensitivity pass's ranking: each tensor's part of the step's x_{t-1} error (that tensor
        alone quantized), costliest first; weights also at the pass's low width."""
        sens = self.sensitivity
        if not sens:
            return "no sensitivity analysis in this pipeline (add 'sensitivity' after 'fakequant')"
        rows = sens["rows"] if limit is None else sens["rows"][:limit]
        low = next((k for r in sens["rows"] for k in r if k.startswith("error_w")), None)
        head = (f"{'tensor':<58} {'role':<11} {'bits':>4} {'rel. error':>11} {'share':>7}"
                + (f" {'at ' + low[7:] + ' bits':>11}" if low else ""))
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['key'][:58]:<58} {r['role']:<11} {r['bits']:>4} {r['error']:>11.3e} {100 * r['share']:>6.1f}%"
                         + (f" {r[low]:>11.3e}" if low and low in r else ""))
        if limit is not None and len(sens["rows"]) > limit:
            lines.append(f"... {len(sens['rows']) - limit} more tensors")
        lines.append(f"each alone, summed: {sens['error_sum']:.3e}; all together: {sens['error_all']:.3e} "
                     f"(relative squared error of x_{{t-1}} on {sens['n']} calibration samples)")
        if sens.get("widened"):
            lines.append(f"widened to 16 bits: {', '.join(sens['widened'])}; all together after: "
                         f"{sens['error_all_widened']:.3e}")
        return "\n".join(lines)

    def bits_table(self, limit: int | None = None) -> str:
        """The sensitivity pass's mixed weight precision (``sensitivity{budget=B}``): per weight, the
        bits it got, its size and its share of the weights' summed error."""
        mixed = self.sensitivity.get("mixed") if self.sensitivity else None
        if not mixed:
            return "no mixed weight precision in this pipeline (add 'sensitivity{budget=5}' after 'fakequant')"
        rows = mixed["layers"] if limit is None else mixed["layers"][:limit]
        head = f"{'weight':<58} {'bits':>4} {'elements':>9} {'bytes':>9} {'rel. error':>11} {'share':>7}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['key'][:58]:<58} {r['bits']:>4} {r['elements']:>9,} {r['bytes']:>9,.0f} "
                         f"{r['error']:>11.3e} {100 * r['share']:>6.1f}%")
        if limit is not None and len(mixed["layers"]) > limit:
            lines.append(f"... {len(mixed['layers']) - limit} more weights")
        low = sum(r["bits"] < r["own_bits"] for r in mixed["layers"])
        lines.append(f"{low} of {len(mixed['layers'])} weights lowered; {mixed['average_bits']:.2f} bits per weight on "
                     f"average (budget {mixed['budget']}): {mixed['bytes'] / 1e3:,.1f} kB against "
                     f"{mixed['bytes_at_own_bits'] / 1e3:,.1f} kB; x_{{t-1}} error with everything quantized: "
                     f"{self.sensitivity['error_all']:.3e} -> {self.sensitivity['error_all_mixed']:.3e}")
        return "\n".join(lines)


@dataclass
class QuantResult:
    graph: StepGraph
    report: QuantReport
    fp_graph: StepGraph
    calibration_set: Any = None   # the (x_t, t) pairs the observers saw


def capture_step(step: DiffusionStep, batch: int = 2, device: str | torch.device = "cpu",
                 dynamic_batch: bool = True, seed: int = 0) -> StepGraph:
    """Capture ``step`` with example inputs of the right shape (batch >= 2 for a dynamic batch)."""
    g = torch.Generator().manual_seed(seed)
    shape = step.sample_shape(batch)
    x = torch.randn(shape, generator=g).to(device)
    t = step.sampler.timesteps[torch.randint(0, step.sampler.S, (batch,), generator=g)].to(device)
    noise = torch.randn(shape, generator=g).to(device)
    graph = capture(step, (x, t, noise), dynamic_batch=dynamic_batch,
                    meta={"sampler_config": step.sampler.config(), "unet_config": dict(step.unet.config)})
    graph.meta["sampler"] = step.sampler
    return graph


def quantize(step: DiffusionStep, calibration=None, solver=None, policy: QuantPolicy | None = None,
             pipeline: str = "recommended", progress: bool = True, cache_dir=None,
             verify: bool = True, dump_after: tuple[str, ...] = (), dump_dir=None,
             graph: StepGraph | None = None) -> QuantResult:
    """Run PTQ4DM on ``step``: capture, then ``pipeline``, and return the simulated quantized graph
    and a report. ``pipeline``: a named preset (``ptq4dm.passes.PRESETS``) or a pass list.
    "recommended" (the default): the paper's passes + ``sensitivity{widen=4,weights=false}`` (the
    four activations that cost x_{t-1} the most at 8 bits get 16) + ``reconstruct`` (each weight's
    rounding learned against its layer's float output, AdaRound) + ``bias_correct{groups=10}``, with conv_in /
    conv_out and the time-embedding path in float and mean / variance / x_{t-1} at 16 bits unless ``policy`` says otherwise
    (why: docs/results/history.md, "DDIM: where the W8A8 error comes from"). "recommended-fast": the same without ``reconstruct`` (about two
    minutes less on the default model at 2 threads; further from FP on DDIM). "ptq4dm-paper": the paper's full setting
    (``decompose_attention,mark,observe,calibrate,solve,fakequant``, everything at 8 bits). A
    pass list runs with ``policy`` or the paper's ``QuantPolicy()``."""
    calibration = calibration or NDTC()
    solver = solver or MSE()
    if pipeline in PRESETS:
        pipeline, preset_policy = PRESETS[pipeline]
        policy = policy or preset_policy
    policy = policy or QuantPolicy()
    step = step.eval()
    t0 = time.perf_counter()
    graph = graph or capture_step(step)
    fp_graph = StepGraph(copy.deepcopy(graph.gm), graph.example_inputs, dict(graph.meta), graph.dynamic_batch)
    capture_s = time.perf_counter() - t0
    ctx = PassContext(options={"calibration": calibration, "fp_step": step, "cache_dir": cache_dir,
                               "model_hash": weights_hash(step.unet) if cache_dir else None},
                      progress=progress)
    pm = PassManager.from_pipeline(pipeline, pass_options={"mark": {"policy": policy}, "solve": {"solver": solver}},
                                   verify=verify, dump_after=dump_after, dump_dir=dump_dir)
    pm.run(graph, ctx)
    mark = ctx.results.get("mark", {})
    report = QuantReport(tensors=ctx.results.get("solve", []),
                         left_in_float=list(ctx.results.get("unsupported", [])) + list(mark.get("left_in_float", [])),
                         counts=mark.get("counts", {}), timings={"capture": capture_s, **ctx.timings},
                         calibration={k: v for k, v in ctx.results.get("calibration", {}).items() if k != "timesteps"},
                         policy=policy.describe(), policy_obj=policy,
                         bias_correction=ctx.results.get("bias_correct", {}),
                         sensitivity=ctx.results.get("sensitivity", {}),
                         reconstruct=ctx.results.get("reconstruct", {}),
                         chain_gains=ctx.results.get("chain_gains", {}))
    graph.meta["report"] = report
    graph.meta["calibration_timesteps"] = ctx.results.get("calibration", {}).get("timesteps")
    return QuantResult(graph, report, fp_graph, ctx.options.get("calibration_set"))


def lower(graph: StepGraph, backend: str = "auto", progress: bool = False, **options) -> dict:
    """Run the ``lower`` pass on a quantized (fake-quant) graph, in place: ``backend`` auto follows
    the graph's device (cuda: the Triton int8 ops, cpu: x86 / Inductor + oneDNN). Returns what it
    lowered and what it kept in float, with reasons. ``options``: the pass's other fields
    (``weight_bits``, ``min_k``, ``min_n``, ...). Run the result through ``compile_step``."""
    ctx = PassContext(progress=progress)
    PassManager.from_pipeline("lower", pass_options={"lower": {"backend": backend, **options}}).run(graph, ctx)
    return ctx.results["lower"]


def compile_step(graph: StepGraph, dynamic: bool | None = None, cpp_wrapper: bool = True):
    """A fast callable (x, t, noise) -> outputs for a lowered (or fake-quant / FP) step graph. On
    the CPU: Inductor with freezing (weights become constants; the x86 backend's int8 rewrites
    need it, and float convs get prepacked weights too), with the kernel calls in a C++ wrapper
    (``cpp_wrapper``: less Python per kernel; set False to read the generated code as Python). On
    CUDA: plain ``torch.compile``. The first call compiles (seconds to minutes)."""
    if not graph.example_inputs[0].is_cuda:
        from ptq4dm.backends.x86 import CompiledStep

        return CompiledStep(graph.gm, dynamic=dynamic, cpp_wrapper=cpp_wrapper)
    return torch.compile(graph.gm, dynamic=dynamic)
