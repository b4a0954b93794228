"""error_feedback: carry x_{t-1}'s rounding residual into the next step (noise shaping).

reads:  the quantized graph (after ``fakequant``): the fake_quant node that produces x_{t-1}
        (QuantPolicy.quantize_outputs with "prev_sample" among its output_roles)
writes: around that node, ``v' = v + r`` before it and ``r = clamp(v' - q, -s/2, s/2)`` after it
        (modules ``ptq4dm_ef_in`` / ``ptq4dm_ef_out`` sharing one chain state);
        ``graph.meta['error_feedback']``; ``ctx.results['error_feedback']``

Why: on a deterministic sampler (DDIM, eta 0) the chain keeps every rounding of x_t. Late in the
chain a pixel moves by less than half an 8-bit step between two steps, so rounding to nearest
returns the same code again and again: the error is a bias that the chain integrates, not noise
that averages out. Measured on the default model, DDIM-50, everything in float except x_{t-1} at
8 bits: 24.0 dB PSNR vs FP with one range, 23.3 dB with one range per step, 26.9 / 28.9 dB with
stochastic rounding; with this pass 36.5 / 43.6 dB (docs/results/details.md, "8-bit x_{t-1} on DDIM").

Error feedback (sigma-delta modulation; the issue's "carry the residual into the next step"):
the rounding residual r of step i is added to the value step i + 1 rounds, so the sum of the
rounded states follows the sum of the exact ones and the error that reaches x_0 is a difference
of residuals, not their sum. The residual is bounded by half a quantization step (clipping error
is not carried: a value outside the range would otherwise grow it without bound).

What stays 8-bit and what does not, plainly: x_{t-1} leaves the step as 8-bit codes (what the next
step's UNet reads); the residual is sampler state beside it, ``residual_bits`` per element
(0: float32; b > 0: 2^b levels (k + 1/2) s / 2^b, symmetric about zero: a grid with a level at 0
and an uneven count of levels either side biases every step by a fraction of s, which the chain
integrates; measured, docs/results/details.md). With b = 2, 10 bits of state per element in all.

The residual belongs to one chain: it is applied only when the x_t handed to the step is exactly
the x_{t-1} the step returned last (same shape and values: the sampling loop passes it back
unchanged). Any other input (a new chain from x_T, teacher-forced x_t, another batch) starts
without a residual, i.e. plain rounding. One chain at a time per graph; ``reset_error_feedback``
clears the state. ``lower`` refuses a graph with this pass (the state lives in Python modules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ptq4dm.ir.graph import ROLE, StepGraph
import ptq4dm.ir.quant  # noqa: F401  (defines torch.ops.ptq4dm.fake_quant)

from .base import PassContext, register_pass

FAKE_QUANT = torch.ops.ptq4dm.fake_quant.default
EF_IN, EF_OUT = "ptq4dm_ef_in", "ptq4dm_ef_out"


class ChainState:
    """The residual of the last rounding and the codes it belongs to (one chain)."""

    def __init__(self):
        self.last: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.last = self.residual = None


class ErrorFeedbackIn(nn.Module):
    """v -> v + r when x_t is the x_{t-1} this step returned last, else v."""

    def __init__(self, state: ChainState):
        super().__init__()
        self.state = state

    def forward(self, x_t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.state
        if (st.last is not None and st.last.shape == x_t.shape and st.last.device == x_t.device
                and st.residual.shape == v.shape and torch.equal(st.last, x_t)):
            return v + st.residual
        return v


class ErrorFeedbackOut(nn.Module):
    """Keep r = clamp(v - q, -s/2, s/2) (on 2^bits mid-rise levels of s / 2^bits when bits > 0); return q."""

    def __init__(self, state: ChainState, bits: int):
        super().__init__()
        self.state, self.bits = state, bits

    def forward(self, v: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.float()
        if s.numel() > 1:   # one scale per sample (per-step ranges gathered by t)
            s = s.reshape(-1, *([1] * (v.dim() - 1)))
        r = (v.float() - q.float())
        r = torch.maximum(torch.minimum(r, s / 2), -s / 2)
        if self.bits:   # mid-rise levels (k + 1/2) s / 2^b: symmetric about 0, so no bias the chain would integrate
            step = s / 2 ** self.bits
            lim = 2 ** (self.bits - 1)
            r = (torch.clamp(torch.floor(r / step), -lim, lim - 1) + 0.5) * step
        self.state.residual = r.to(v.dtype)
        self.state.last = q
        return q


def reset_error_feedback(gm: nn.Module) -> None:
    """Forget the carried residual (the next call starts a chain with plain rounding)."""
    ef = getattr(gm, EF_IN, None)
    if ef is not None:
        ef.state.reset()


def has_error_feedback(gm: nn.Module) -> bool:
    return isinstance(getattr(gm, EF_IN, None), ErrorFeedbackIn)


def prev_sample_fake_quant(graph: StepGraph) -> fx.Node:
    """The fake_quant node whose value is the step's x_{t-1}."""
    prev = graph.output_values()[0]
    if prev.op != "call_function" or prev.target != FAKE_QUANT:
        raise ValueError("error_feedback needs x_{t-1} quantized: the step's prev_sample output is "
                         f"{prev.op} {prev.target}, not a fake_quant. Quantize it (QuantPolicy(quantize_outputs=True, "
                         "output_bits=8) with 'prev_sample' in output_roles) and put error_feedback after fakequant.")
    return prev


@register_pass
@dataclass
class ErrorFeedback:
    name = "error_feedback"
    reads = "the fake_quant node producing x_{t-1} (after fakequant)"
    writes = "ptq4dm_ef_in / ptq4dm_ef_out modules around it; meta['error_feedback']; ctx.results['error_feedback']"
    preserves_semantics = False

    residual_bits: int = 0   # 0: the residual in float32; b in [1, 8]: b bits of the quantization step

    def run(self, graph: StepGraph, ctx: PassContext) -> None:
        if not 0 <= int(self.residual_bits) <= 8:
            raise ValueError(f"error_feedback{{residual_bits={self.residual_bits}}}: use 0 (float32) or 1..8 bits")
        g, gm = graph.graph, graph.gm
        if has_error_feedback(gm):
            raise ValueError("error_feedback is already in this graph; list it once in the pipeline")
        fq = prev_sample_fake_quant(graph)
        x_t = graph.placeholders()[0]
        state = ChainState()
        gm.add_module(EF_IN, ErrorFeedbackIn(state))
        gm.add_module(EF_OUT, ErrorFeedbackOut(state, int(self.residual_bits)))
        v = fq.args[0]
        with g.inserting_before(fq):
            v2 = g.call_module(EF_IN, (x_t, v))
        fq.replace_input_with(v, v2)
        with g.inserting_after(fq):
            q2 = g.call_module(EF_OUT, (v2, fq, fq.args[1]))
        fq.replace_all_uses_with(q2, delete_user_cb=lambda u: u is not q2)
        for n in (v2, q2):
            n.meta[ROLE] = "quant"
            if "val" in fq.meta:
                n.meta["val"] = fq.meta["val"]
        g.lint()
        gm.recompile()
        info = {"residual_bits": int(self.residual_bits), "node": fq.name,
                "output_bits": int(fq.args[4] - fq.args[3]).bit_length()}
        graph.meta["error_feedback"] = info
        ctx.results["error_feedback"] = info
