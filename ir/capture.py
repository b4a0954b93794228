"""Capture a ``DiffusionStep`` as an ATen-level torch.fx graph with torch.export (non-strict).

Why torch.export and not ``fx.symbolic_trace``: diffusers' UNet2DModel calls ``len()`` on
shapes in its time embedding, which symbolic tracing rejects; non-strict export traces the
real Python with fake tensors and records ATen ops exactly.

One capture-time rewrite: diffusers' ``Upsample2D.forward`` branches on ``batch >= 64`` only
to call ``.contiguous()`` (a no-op on the contiguous NCHW tensors here). That branch would
pin the exported batch range to [2, 63], so during export each such module runs an
equivalent forward without it. The weights and module paths are unchanged.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, export

from .graph import StepGraph

MAX_BATCH = 8192


class CaptureError(RuntimeError):
    """torch.export rejected the model; the message names the construct and the module path."""


def _upsample_forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs):
    # Upsample2D.forward minus the batch-size branch around .contiguous() (see module doc).
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv_transpose:
        return self.conv(hidden_states)
    if self.interpolate:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    if self.use_conv:
        hidden_states = self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
    return hidden_states


@contextlib.contextmanager
def _export_friendly(model: nn.Module) -> Iterator[None]:
    from diffusers.models.upsampling import Upsample2D

    patched = [m for m in model.modules() if type(m) is Upsample2D]
    for m in patched:
        m.forward = types.MethodType(_upsample_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def _module_tracker(model: nn.Module) -> Iterator[list[str]]:
    """Keep the stack of module paths being executed, to name where tracing failed."""
    stack: list[str] = []  # post-hooks do not run on an exception, so the failing path stays on top
    handles = []

    def pre(path):
        def hook(mod, args):
            stack.append(path)
        return hook

    def post(path):
        def hook(mod, args, out):
            if stack and stack[-1] == path:
                stack.pop()
        return hook

    for path, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(path or "<root>")))
        handles.append(mod.register_forward_hook(post(path or "<root>")))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if "DataDependent" in name or "data-dependent" in str(exc) or "data dependent" in str(exc):
        return f"data-dependent control flow or value (a Python branch on a tensor's value): {msg}"
    if "Unsupported" in name:
        return f"an operation torch.export does not support: {msg}"
    return f"{name}: {msg}"


def capture(step: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, dynamic_batch: bool = True,
            meta: dict[str, Any] | None = None) -> StepGraph:
    """Export ``step`` (``forward(x_t, t, noise) -> (prev_sample, mean, variance)``) to a StepGraph.

    ``dynamic_batch=True`` exports a batch dimension ``Dim(min=2)`` shared by the three inputs
    (torch.export specialises size 1, so batch 1 needs ``dynamic_batch=False`` with a batch-1
    example: the static path).
    """
    x = example_inputs[0]
    if dynamic_batch and x.shape[0] < 2:
        raise ValueError("dynamic_batch capture needs an example batch >= 2 (torch.export specialises "
                         "size 1); use dynamic_batch=False for a static batch-1 graph")
    dyn = None
    if dynamic_batch:
        batch = Dim("batch", min=2, max=MAX_BATCH)
        dyn = tuple({0: batch} for _ in example_inputs)
    was_training = step.training
    step.eval()
    stack: list[str] = []
    try:
        with torch.no_grad(), _export_friendly(step), _module_tracker(step) as stack:
            ep = export(step, tuple(example_inputs), dynamic_shapes=dyn, strict=False)
    except Exception as e:
        where = stack[-1] if stack else "<root>"
        raise CaptureError(f"torch.export could not capture {type(step).__name__}: {_describe(e)} "
                           f"(in module '{where}'). Rewrite that construct to be traceable "
                           f"(e.g. torch.where instead of `if tensor:`).") from e
    finally:
        step.train(was_training)
    gm = ep.module()
    graph = StepGraph(gm, tuple(example_inputs), meta=dict(meta or {}), dynamic_batch=dynamic_batch)
    graph.assign_roles()
    return graph
