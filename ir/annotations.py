"""Quantization annotations: data on nodes, in torchao's PT2E form.

Key: ``node.meta["quantization_annotation"]`` (the key PT2E's ``prepare_pt2e`` reads) holds a
``torchao.quantization.pt2e.quantizer.QuantizationAnnotation``:

* ``input_qspec_map[arg_node]`` quantizes that *input edge* (conv / linear / matmul operands:
  what an int8 kernel consumes);
* ``output_qspec`` quantizes the node's output for every user (the paper's mu, Sigma and
  x_{t-1}).

Specs are ``TensorSpec``, a ``QuantizationSpec`` subclass that also records the tensor's
``role`` ("weight", "act", "attn", "mean", "variance", "prev_sample") and its bit width.
Integer ranges: symmetric specs use [-(2^(b-1) - 1), 2^(b-1) - 1] (zero point 0, so an int8
GEMM needs no correction); affine specs use [-2^(b-1), 2^(b-1) - 1] with a zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

ANNOTATION_KEY = "quantization_annotation"
ROLES = ("weight", "act", "attn", "mean", "variance", "prev_sample")
# the roles whose range may follow the timestep (QuantPolicy.timestep_groups / grouped_roles)
GROUPABLE_ROLES = ROLES[1:]


class _SpecObserverCtr:
    """Placeholder constructor so a TensorSpec satisfies QuantizationSpec's field; ptq4dm's
    observe pass builds its own observers from the spec."""

    def __call__(self, *args, **kwargs):
        from ptq4dm.passes.observe import ReservoirObserver

        return ReservoirObserver(*args, **kwargs)

    def __repr__(self) -> str:
        return "ReservoirObserver"


_CTR = _SpecObserverCtr()


@dataclass(eq=True, frozen=True)
class TensorSpec(QuantizationSpec):
    role: str = "act"
    bits: int = 8

    @property
    def symmetric(self) -> bool:
        return self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    def short(self) -> str:
        gran = f"per-channel(axis={self.ch_axis})" if self.per_channel else "per-tensor"
        return f"{self.role}:int{self.bits} {'sym' if self.symmetric else 'affine'} {gran}"


def make_spec(role: str, bits: int = 8, symmetric: bool = True, ch_axis: int | None = None) -> TensorSpec:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        scheme = torch.per_channel_symmetric if ch_axis is not None else torch.per_tensor_symmetric
    else:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scheme = torch.per_channel_affine if ch_axis is not None else torch.per_tensor_affine
    dtype = torch.int8 if bits <= 8 else torch.int16
    return TensorSpec(dtype=dtype, observer_or_fake_quant_ctr=_CTR, quant_min=qmin, quant_max=qmax,
                      qscheme=scheme, ch_axis=ch_axis, role=role, bits=bits)


def get_annotation(node: fx.Node) -> QuantizationAnnotation | None:
    return node.meta.get(ANNOTATION_KEY)


def annotate_input(node: fx.Node, arg: fx.Node, spec: TensorSpec) -> None:
    ann = node.meta.setdefault(ANNOTATION_KEY, QuantizationAnnotation(_annotated=True))
    ann.input_qspec_map[arg] = spec


def annotate_output(node: fx.Node, spec: TensorSpec) -> None:
    ann = node.meta.setdefault(ANNOTATION_KEY, QuantizationAnnotation(_annotated=True))
    ann.output_qspec = spec


def annotated_tensors(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node | None, TensorSpec]]:
    """Every quantized tensor as (consumer node, input node or None for an output spec, spec)."""
    out = []
    for n in graph.nodes:
        ann = get_annotation(n)
        if ann is None:
            continue
        for arg, spec in ann.input_qspec_map.items():
            if spec is not None:
                out.append((n, arg, spec))
        if ann.output_qspec is not None:
            out.append((n, None, ann.output_qspec))
    return out


def format_annotation(ann: QuantizationAnnotation) -> str:
    parts = []
    for arg, spec in ann.input_qspec_map.items():
        if spec is not None:
            parts.append(f"%{arg.name}->{spec.short() if isinstance(spec, TensorSpec) else spec}")
    if ann.output_qspec is not None:
        s = ann.output_qspec
        parts.append(f"out->{s.short() if isinstance(s, TensorSpec) else s}")
    return "q{" + "; ".join(parts) + "}"
