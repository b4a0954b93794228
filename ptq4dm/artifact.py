"""Save a quantized step as an int8 artifact and rebuild the quantized graph from one.

``save(result, step, path)`` stores int8 weights + qparams + annotations (ir/serialize.py has
the format). ``load(path)`` rebuilds the UNet from the stored config, dequantized weights and
float parameters, re-captures the step and re-applies the stored qparams: the rebuilt
fake-quant graph computes exactly what the in-memory one did.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ptq4dm.api import QuantResult, capture_step, weights_hash
from ptq4dm.ir.graph import StepGraph
from ptq4dm.ir.quant import QParams, dequantize, pack_bits, pack_int4, quantize, unpack_bits, unpack_int4
from ptq4dm.ir.serialize import ArtifactError, load_artifact, save_artifact
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import PassContext, PassManager, QuantPolicy
from ptq4dm.passes.observe import QTENSOR, qtensors
from ptq4dm.passes.solve import getattr_path

REBUILD_PIPELINE = "decompose_attention,mark,observe"


def _weight_param_name(graph: StepGraph, node_name: str) -> str:
    node = next(n for n in graph.graph.nodes if n.name == node_name)
    return str(node.target)


def save(result: QuantResult, step: DiffusionStep, path: str | Path, extra: dict[str, Any] | None = None) -> int:
    """Write the artifact of ``result`` (made from ``step``). Returns its size in bytes. Inside a
    torch.distributed group only rank 0 writes (the others return 0); the header records the
    calibration's ``world_size``."""
    import ptq4dm
    from ptq4dm import distributed

    if not distributed.is_main():
        return 0
    extra = dict(extra or {})
    extra["calibration"] = {**extra.get("calibration", {}),
                            "world_size": int(result.report.calibration.get("world_size", 1))}

    graph, qparams = result.fp_graph, result.graph.meta["qparams"]
    policy: QuantPolicy = result.graph.meta["report"].policy_obj
    tensors: dict[str, torch.Tensor] = {}
    specs = []
    quantized_params = set()
    simulated = {n.meta[QTENSOR].key: result.graph.gm.get_buffer(str(n.target))
                 for n in result.graph.graph.nodes
                 if n.op == "get_attr" and QTENSOR in n.meta and n.meta[QTENSOR].spec.role == "weight"}
    for qt in qtensors(result.graph):
        qp = qparams[qt.key]
        bits = (qp.qmax - qp.qmin).bit_length()   # the grid's width: a widened or mixed-precision tensor differs from its spec
        spec = {"key": qt.key, "role": qt.spec.role, "bits": bits, "qmin": qp.qmin, "qmax": qp.qmax,
                "axis": qp.axis, "groups": qp.groups, "symmetric": qt.spec.symmetric, "consumer": qt.consumer,
                "source": qt.source}
        if qt.spec.role == "weight":
            pname = _weight_param_name(result.fp_graph, qt.source)
            # the simulated graph's weight (on the grid: nearest rounding, or what reconstruct learned)
            w = (simulated[qt.key] if qt.key in simulated
                 else getattr_path(result.fp_graph.gm, qt.source, result.fp_graph)).detach().float()
            codes = quantize(w, qp, torch.int8 if bits <= 8 else torch.int16)
            if bits <= 4:   # two codes per byte
                tensors[f"w4/{qt.key}"] = pack_int4(codes)
                spec["shape"] = list(codes.shape)
            elif bits < 8:   # a stream of `bits` bits per code
                tensors[f"wb/{qt.key}"] = pack_bits(codes, bits)
                spec["shape"] = list(codes.shape)
            else:
                tensors[f"w/{qt.key}"] = codes
            tensors[f"w_scale/{qt.key}"], tensors[f"w_zp/{qt.key}"] = qp.scale.float(), qp.zero_point
            spec["param"] = pname
            quantized_params.add(pname.removeprefix("unet."))
        else:
            tensors[f"a_scale/{qt.key}"], tensors[f"a_zp/{qt.key}"] = qp.scale.float(), qp.zero_point
        specs.append(spec)
    # bias_correct's new biases replace the FP ones: the artifact stores the corrected model
    corrected = {}
    for target, buf in result.graph.meta.get("bias_corrected", {}).items():
        if target.endswith(":no-bias"):
            raise ArtifactError(f"bias_correct gave layer {target.split(':')[0]} a bias it did not have; the artifact "
                                "format stores biases as UNet parameters and cannot hold it. Save without bias_correct.")
        corrected[target.removeprefix("unet.")] = getattr(result.graph.gm, buf).detach()
    # bias_correct{groups>1}: a (G, C) table per layer, added after it, and the group of each t
    for target, buf in result.graph.meta.get("bias_correct_tables", {}).items():
        tensors[f"bc_table/{target.removeprefix('unet.')}"] = getattr(result.graph.gm, buf).detach().float()
    if result.graph.meta.get("bias_correct_tables"):
        tensors["bc_group_of_t"] = result.graph.gm.ptq4dm_bc_group_of_t.detach().long()
    # noise_correct: the (G, C) scale / shift tables after the UNet output, and the group of each t
    nc = result.graph.meta.get("noise_correct")
    if nc:
        gm = result.graph.gm
        tensors["nc_scale"], tensors["nc_shift"] = gm.ptq4dm_nc_scale.detach().float(), gm.ptq4dm_nc_shift.detach().float()
        tensors["nc_group_of_t"] = gm.ptq4dm_nc_group_of_t.detach().long()
    for name, p in step.unet.state_dict().items():
        if name not in quantized_params:
            tensors[f"fp/{name}"] = corrected.get(name, p)
    header = {"unet_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(step.unet.config).items()
                              if not k.startswith("_")},
              "sampler": step.sampler.config(), "policy": dataclasses.asdict(policy),
              "fp_weights_sha256": weights_hash(step.unet), "ptq4dm_version": ptq4dm.__version__,
              "torch_version": torch.__version__, "specs": specs, "bias_corrected": sorted(corrected),
              "bias_correct_groups": int(result.graph.meta.get("bias_correct_groups", 1)),
              "error_feedback": result.graph.meta.get("error_feedback"),
              "noise_correct": {k: nc[k] for k in ("groups", "fit")} if nc else None, **(extra or {})}
    return save_artifact(path, tensors, header)


def _sampler_from_config(cfg: dict):
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    return make_sampler(kind, **{k: v for k, v in cfg.items()})


def load(path: str | Path, expect_fp_weights: torch.nn.Module | None = None, device: str | torch.device = "cpu",
         progress: bool = False) -> tuple[StepGraph, DiffusionStep, dict]:
    """Rebuild ``(quantized graph, dequantized step, header)`` from an artifact.

    ``expect_fp_weights``: the FP UNet the artifact should have been made from; a hash mismatch
    raises ``ArtifactError``.
    """
    from diffusers import UNet2DModel

    tensors, header = load_artifact(path)
    if expect_fp_weights is not None:
        got = weights_hash(expect_fp_weights)
        if got != header["fp_weights_sha256"]:
            raise ArtifactError(f"{path} was made from other FP weights (sha256 {header['fp_weights_sha256'][:12]}..., "
                                f"these are {got[:12]}...); quantize this model again")
    try:
        unet = UNet2DModel.from_config(header["unet_config"])
        sampler = _sampler_from_config(header["sampler"])
        policy = QuantPolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in header["policy"].items()})
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: the header's model / sampler / policy config is invalid: {e}") from None
    state = unet.state_dict()
    new_state = {}
    specs = {s["key"]: s for s in header["specs"]}
    qps: dict[str, QParams] = {}
    for key, s in specs.items():
        prefix = "w" if s["role"] == "weight" else "a"
        try:
            qp = QParams(tensors[f"{prefix}_scale/{key}"], tensors[f"{prefix}_zp/{key}"], s["qmin"], s["qmax"],
                         s["axis"], s["groups"])
        except KeyError as e:
            raise ArtifactError(f"{path}: tensor {e} is missing; the file is incomplete") from None
        qps[key] = qp
        if s["role"] == "weight":
            name = s["param"].removeprefix("unet.")
            try:
                if f"w4/{key}" in tensors:
                    codes = unpack_int4(tensors[f"w4/{key}"], math.prod(s["shape"])).reshape(s["shape"])
                elif f"wb/{key}" in tensors:
                    codes = unpack_bits(tensors[f"wb/{key}"], s["bits"], math.prod(s["shape"])).reshape(s["shape"])
                else:
                    codes = tensors[f"w/{key}"]
            except KeyError as e:
                raise ArtifactError(f"{path}: tensor {e} is missing; the file is incomplete") from None
            new_state[name] = dequantize(codes, qp).reshape(state[name].shape)
    for k, v in tensors.items():
        if k.startswith("fp/"):
            new_state[k[3:]] = v
    missing = sorted(set(state) - set(new_state))
    if missing:
        raise ArtifactError(f"{path}: parameters missing from the artifact: {missing[:5]}")
    unet.load_state_dict(new_state)
    step = DiffusionStep(unet.to(device), sampler.to(device)).eval()
    graph = capture_step(step, device=device)
    ctx = PassContext(progress=progress)
    PassManager.from_pipeline(REBUILD_PIPELINE, pass_options={"mark": {"policy": policy}}).run(graph, ctx)
    rebuilt = {qt.key for qt in qtensors(graph)}
    if rebuilt != set(specs):
        diff = sorted(rebuilt ^ set(specs))[:5]
        raise ArtifactError(f"{path}: the rebuilt graph's quantized tensors differ from the artifact's ({diff}); "
                            f"it was made with another ptq4dm / torch version ({header.get('ptq4dm_version')}, "
                            f"{header.get('torch_version')})")
    graph.meta["qparams"] = {k: q.to(device) for k, q in qps.items()}
    PassManager.from_pipeline("fakequant").run(graph, ctx)
    _restore_group_tables(graph, tensors, path)
    if header.get("noise_correct"):
        _restore_noise_correct(graph, tensors, header["noise_correct"], path)
    if header.get("error_feedback"):   # sampler-side state, no tensors: the pass again, with its option
        bits = int(header["error_feedback"].get("residual_bits", 0))
        PassManager.from_pipeline(f"error_feedback{{residual_bits={bits}}}").run(graph, ctx)
    return graph, step, header


def _restore_group_tables(graph: StepGraph, tensors: dict, path) -> None:
    """Re-insert bias_correct{groups>1}'s per-group tables after the layers whose bias they correct."""
    from torch import fx

    from ptq4dm.passes.bias_correct import LAYER_OPS, insert_group_tables

    stored = {k.removeprefix("bc_table/"): v for k, v in tensors.items() if k.startswith("bc_table/")}
    if not stored:
        return
    if "bc_group_of_t" not in tensors:
        raise ArtifactError(f"{path}: it has bias correction tables but no bc_group_of_t; the file is incomplete")
    layers = {}
    for n in graph.graph.nodes:
        b = n.args[2] if n.op == "call_function" and n.target in LAYER_OPS and len(n.args) > 2 else None
        target = str(b.target).removeprefix("unet.") if isinstance(b, fx.Node) and b.op == "get_attr" else None
        if target in stored:
            layers[n] = (f"ptq4dm_bc_{len(layers)}_groups", stored[target].to(graph.example_inputs[0].device))
    if len(layers) != len(stored):
        raise ArtifactError(f"{path}: {len(stored)} bias correction tables but {len(layers)} matching layers in the "
                            "rebuilt graph; it was made with another ptq4dm / torch version")
    insert_group_tables(graph, layers, tensors["bc_group_of_t"])
    graph.graph.eliminate_dead_code()
    graph.gm.recompile()


def _restore_noise_correct(graph: StepGraph, tensors: dict, meta: dict, path) -> None:
    """Re-insert noise_correct's per-group affine correction after the UNet output (after bias_correct's tables)."""
    from ptq4dm.passes.noise_correct import insert_correction, unet_output_node

    missing = [k for k in ("nc_scale", "nc_shift", "nc_group_of_t") if k not in tensors]
    if missing:
        raise ArtifactError(f"{path}: its header says noise_correct but tensors {missing} are missing; the file is "
                            "incomplete")
    node = unet_output_node(graph)
    a, b, table = tensors["nc_scale"], tensors["nc_shift"], tensors["nc_group_of_t"]
    C = node.meta["val"].shape[1] if isinstance(node.meta.get("val"), torch.Tensor) else a.shape[1]
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] != C:
        raise ArtifactError(f"{path}: noise_correct tables {tuple(a.shape)} / {tuple(b.shape)} do not fit the UNet "
                            f"output's {C} channels; it was made with another ptq4dm / torch version")
    insert_correction(graph, node, table, a, b)
    graph.meta["noise_correct"] = {"node": node.name, **meta}
