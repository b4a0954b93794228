"""bias_correct: each quantized conv / linear's mean output error is folded out of its bias."""

import pytest
import torch
from torch import fx

import ptq4dm
from ptq4dm.ir.graph import ROLE
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, PassContext, PassManager, QuantPolicy
from ptq4dm.passes.bias_correct import LAYER_OPS

FQ = torch.ops.ptq4dm.fake_quant.default
W4 = QuantPolicy(weight_bits=4)   # coarse weights: a mean error large enough to see on the tiny UNet


def _step(unet):
    return DiffusionStep(unet, make_sampler("ddpm", num_inference_steps=10)).eval()


def _local_mean_errors(result, bias_targets: dict, groups: int = 1) -> dict:
    """Per layer, the per-channel mean over the calibration set of y_q - op(x, W, b): the layer's
    output against the float op on the same float input with the float weight and the ORIGINAL bias.
    (G, C) per layer: one row per group of sampler steps."""
    from ptq4dm.passes.calibrate import group_table

    table = group_table(result.graph.meta["sampler"], groups)
    state = {}
    gm = result.graph.gm
    fp_params = dict(result.fp_graph.gm.named_parameters())
    layers = {n: n for n in result.graph.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS
              and n.name in bias_targets}
    sums, counts = {}, {}

    def grouped_add(n):   # bias_correct{groups>1}: the layer's output + its group's row, the add right after it
        return next((u for u in n.users if u.target is torch.ops.aten.add.Tensor and u.meta.get(ROLE) == "quant"), None)

    def record(name, conv, d):
        dims = list(range(2, d.dim())) if conv else list(range(1, d.dim() - 1))
        per_sample = d.sum(dims) if dims else d   # (B, C)
        sums.setdefault(name, torch.zeros(groups, per_sample.shape[1], dtype=torch.float64))
        counts.setdefault(name, torch.zeros(groups, dtype=torch.float64))
        for gi in range(groups):
            sel = state["group"] == gi
            sums[name][gi] += per_sample[sel].sum(0)
            counts[name][gi] += int(sel.sum()) * (d[0].numel() // per_sample.shape[1])

    pending = {}

    class Measure(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in layers:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                args = list(args)
                src = n.args[0]
                args[0] = self.env[src.args[0]] if src.target is FQ else self.env[src]
                w_target, b_target = bias_targets[n.name]
                args[1] = fp_params[w_target]
                args[2] = fp_params[b_target] if b_target else None
                ref = n.target(*args, **kwargs)
                conv = n.target is not torch.ops.aten.linear.default
                add = grouped_add(n)
                if add is None:
                    record(n.name, conv, (out - ref).double())
                else:
                    pending[add] = (n.name, conv, ref)
            elif n in pending:
                name, conv, ref = pending.pop(n)
                record(name, conv, (out - ref).double())
            return out

    cs = result.calibration_set
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for x, t in cs.batches(16):
            state["group"] = table[t]
            Measure(gm, garbage_collect_values=False).run(x, t, torch.randn(x.shape, generator=gen))
    return {k: sums[k] / counts[k].clamp(min=1)[:, None] for k in sums}


def test_corrected_layers_have_no_mean_error_left(tiny_unet):
    step = _step(tiny_unet)
    plain = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=32), policy=W4, progress=False)
    corrected = ptq4dm.quantize(step, calibration=NDTC(n=32), policy=W4, progress=False,
                                pipeline=DEFAULT_PIPELINE + ",bias_correct")
    # the float weight and original bias behind each quantized layer, by the layers' (shared) node names
    targets = {}
    fp_nodes = {n.name: n for n in plain.fp_graph.graph.nodes}
    for n in plain.graph.graph.nodes:
        if n.op == "call_function" and n.target in LAYER_OPS and "ptq4dm.float_weight" in n.args[1].meta:
            b = fp_nodes[n.name].args[2] if len(fp_nodes[n.name].args) > 2 else None
            targets[n.name] = (n.args[1].meta["ptq4dm.float_weight"], b.target if isinstance(b, fx.Node) else None)
    report = corrected.report.bias_correction
    assert report["layers"] == len(targets) == corrected.report.counts["conv"] + corrected.report.counts["linear"]
    assert report["samples"] == 32
    before = _local_mean_errors(plain, targets)
    after = _local_mean_errors(corrected, targets)
    # the correction was measured on the uncorrected graph's layer inputs; it is local, so on the
    # corrected graph (whose upstream layers changed) each layer's mean error is still nearly gone
    b2 = sum(float(v.pow(2).sum()) for v in before.values())
    a2 = sum(float(v.pow(2).sum()) for v in after.values())
    assert b2 > 0
    assert a2 < 0.05 * b2, (a2, b2)
    # the corrected graph is the plain one plus a bias: same quantizers, no other change
    assert corrected.graph.meta["qparams"].keys() == plain.graph.meta["qparams"].keys()
    assert all(torch.equal(corrected.graph.meta["qparams"][k].scale, plain.graph.meta["qparams"][k].scale)
               for k in plain.graph.meta["qparams"])


def test_bias_correct_lowers_to_the_int8_ops(tiny_unet):
    import copy

    from ptq4dm.ir.graph import StepGraph

    r = ptq4dm.quantize(_step(tiny_unet), calibration=NDTC(n=16), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",bias_correct")
    fq = StepGraph(copy.deepcopy(r.graph.gm), r.graph.example_inputs, dict(r.graph.meta), True)
    ctx = PassContext(progress=False)
    PassManager.from_pipeline("lower{backend=triton}").run(r.graph, ctx)
    counts = ctx.results["lower"]["counts"]
    assert counts["qconv2d"] == r.report.counts["conv"] and counts["qlinear"] == r.report.counts["linear"]
    cs = r.calibration_set
    x, t = cs.x[:4], cs.t[:4]
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low, ref = r.graph(x, t, n), fq(x, t, n)
    out_scale = max(qp.scale.max() for k, qp in r.graph.meta["qparams"].items() if k.endswith(":out"))
    for a, b in zip(low, ref):   # the int8 graph keeps the corrected bias: within one output code
        assert (a - b).abs().max() <= 1.01 * out_scale + 1e-6


def test_bias_correct_says_what_it_needs(tiny_unet):
    step = _step(tiny_unet)
    r = ptq4dm.quantize(step, calibration=NDTC(n=8), progress=False, pipeline="decompose_attention,mark,observe,calibrate,solve")
    with pytest.raises(ValueError, match="run 'fakequant' before it"):
        PassManager.from_pipeline("bias_correct").run(r.graph, PassContext(
            options={"calibration_set": r.calibration_set}, progress=False))
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False)
    with pytest.raises(ValueError, match="needs the calibration set"):
        PassManager.from_pipeline("bias_correct").run(r.graph, PassContext(progress=False))


def test_artifact_stores_the_corrected_biases(tiny_unet, tmp_path):
    from ptq4dm import artifact

    step = _step(tiny_unet)
    r = ptq4dm.quantize(step, calibration=NDTC(n=16), policy=W4, progress=False,
                        pipeline=DEFAULT_PIPELINE + ",bias_correct")
    path = tmp_path / "bc.ptq4dm.safetensors"
    artifact.save(r, step, path)
    g, _, header = artifact.load(path, expect_fp_weights=step.unet)
    assert len(header["bias_corrected"]) == r.report.bias_correction["layers"]
    x, t = r.calibration_set.x[:3], r.calibration_set.t[:3]
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = r.graph(x, t, n), g(x, t, n)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    plain = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), policy=W4, progress=False)
    with torch.no_grad():   # and the correction is really in it: the uncorrected graph differs
        assert not torch.equal(plain.graph(x, t, n).mean, got.mean)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_groups_remove_the_part_of_the_error_that_follows_t(tiny_unet, tmp_path):
    """bias_correct{groups=2}: a correction per half of the sampler's steps on top of the all-t one.
    Measured per half, the mean error the single correction leaves is larger than what the
    grouped one leaves; the artifact rebuilds the grouped graph bit for bit; it lowers to int8 ops."""
    import copy

    from ptq4dm.ir.graph import StepGraph

    step = _step(tiny_unet)
    runs = {g: ptq4dm.quantize(step, calibration=NDTC(n=64, mu=0.5), policy=W4, progress=False,
                               pipeline=DEFAULT_PIPELINE + f",bias_correct{{groups={g}}}") for g in (1, 2)}
    per_group = runs[2].report.bias_correction["samples_per_group"]
    assert min(per_group) >= 10, per_group   # both halves corrected (none fell back)
    plain = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=64, mu=0.5), policy=W4, progress=False)
    targets = {}
    fp_nodes = {n.name: n for n in plain.fp_graph.graph.nodes}
    for n in plain.graph.graph.nodes:
        if n.op == "call_function" and n.target in LAYER_OPS and "ptq4dm.float_weight" in n.args[1].meta:
            b = fp_nodes[n.name].args[2]
            targets[n.name] = (n.args[1].meta["ptq4dm.float_weight"], b.target)
    left = {}
    for g, r in runs.items():
        errs = _local_mean_errors(r, targets, groups=2)
        # the grouped graph adds its table after the layer: measure the layer's output with it
        left[g] = sum(float(v.pow(2).sum()) for v in errs.values())
    before = sum(float(v.pow(2).sum()) for v in _local_mean_errors(plain, targets, groups=2).values())
    assert left[1] < 0.5 * before
    assert left[2] < 0.5 * left[1], (before, left)
    g = runs[2]
    from ptq4dm import artifact

    path = tmp_path / "g.ptq4dm.safetensors"
    artifact.save(g, step, path)
    loaded, _, header = artifact.load(path, expect_fp_weights=step.unet)
    assert header["bias_correct_groups"] == 2
    x, t = g.calibration_set.x, g.calibration_set.t
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = g.graph(x, t, n), loaded(x, t, n)
        one = runs[1].graph(x, t, n)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not torch.equal(one.mean, got.mean)   # the tables are really in it
    fq = StepGraph(copy.deepcopy(g.graph.gm), g.graph.example_inputs, dict(g.graph.meta), True)
    PassManager.from_pipeline("lower{backend=triton}").run(g.graph, PassContext(progress=False))
    x, t = g.calibration_set.x[:4], g.calibration_set.t[:4]
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low, ref = g.graph(x, t, n), fq(x, t, n)
    out_scale = max(qp.scale.max() for k, qp in g.graph.meta["qparams"].items() if k.endswith(":out"))
    for a, b in zip(low, ref):
        assert (a - b).abs().max() <= 1.01 * out_scale + 1e-6
