"""The PTQ4DM pipeline over a captured step graph."""

import resource

import pytest
import torch

import ptq4dm
from ptq4dm.api import capture_step
from ptq4dm.ir.annotations import annotated_tensors
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import NDTC, PassContext, PassManager, QuantPolicy
from ptq4dm.passes.observe import CalibrationNaN


def _step(unet, steps=10, kind="ddpm"):
    return DiffusionStep(unet, make_sampler(kind, num_inference_steps=steps)).eval()


def _inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.tensor([900, 500, 100, 0][:batch]), torch.randn(batch, 1, 8, 8, generator=g)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def test_observers_change_no_output(tiny_unet):
    step = _step(tiny_unet)
    graph = capture_step(step)
    x, t, n = _inputs()
    with torch.no_grad():
        want = [o.clone() for o in graph(x, t, n)]
    ctx = PassContext(options={"calibration": NDTC(n=8), "fp_step": step}, progress=False)
    PassManager.from_pipeline("mark,observe,calibrate", verify_execution=True).run(graph, ctx)
    with torch.no_grad():
        got = graph(x, t, n)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_16_bit_is_close_and_8_bit_quantizes_every_annotated_tensor(tiny_unet):
    step = _step(tiny_unet)
    wide = QuantPolicy(weight_bits=16, act_bits=16, attn_bits=16, output_bits=16)
    r16 = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), policy=wide, progress=False)
    r8 = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False)
    # in-distribution inputs: the real (x_t, t) pairs of the FP sampler (static ranges clip
    # values outside what calibration saw, by design)
    cs = r8.calibration_set
    x, t = cs.x[:8], cs.t[:8]
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = step(x, t, n)
    with torch.no_grad():
        y16, y8 = r16.graph(x, t, n), r8.graph(x, t, n)
    assert _rel(y16.mean, fp.mean) < 1e-3
    assert _rel(y8.mean, fp.mean) < 0.1
    counts = r8.report.counts
    n_conv = sum(1 for nd in r8.fp_graph.graph.nodes if nd.target is torch.ops.aten.conv2d.default)
    n_lin = sum(1 for nd in r8.fp_graph.graph.nodes if nd.target is torch.ops.aten.linear.default)
    n_sdpa = sum(1 for nd in r8.fp_graph.graph.nodes if nd.target is torch.ops.aten.scaled_dot_product_attention.default)
    assert counts == {"conv": n_conv, "linear": n_lin, "attn_matmul": 2 * n_sdpa, "output": 3}
    fq = [nd for nd in r8.graph.graph.nodes if nd.target is torch.ops.ptq4dm.fake_quant.default]
    wq = [nd for nd in r8.graph.graph.nodes if nd.op == "get_attr" and nd.target.startswith("ptq4dm_wq_")]
    assert len(wq) == n_conv + n_lin
    assert len(fq) == n_conv + n_lin + 2 * 2 * n_sdpa + 3
    assert len(r8.report.tensors) == len(fq) + len(wq)
    assert not any(nd.op == "call_module" and "ptq4dm_obs" in str(nd.target) for nd in r8.graph.graph.nodes)


def test_report_mse_never_worse_than_minmax(tiny_unet):
    r = ptq4dm.quantize(_step(tiny_unet), pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False)
    assert all(t.error <= t.error_minmax * (1 + 1e-6) + 1e-30 for t in r.report.tensors)
    assert r.report.total_error <= r.report.total_error_minmax
    assert "TOTAL" in r.report.table()


def test_policy_exceptions(tiny_unet):
    step = _step(tiny_unet)
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False,
                        policy=QuantPolicy(keep_first_last_fp=True, quantize_outputs=False, skip=("unet.mid_block",)))
    names = [n for n, _ in r.report.left_in_float]
    assert r.report.counts["output"] == 0 and len(names) >= 2
    with pytest.raises(ValueError, match="unet.no_such_block"):
        ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False, policy=QuantPolicy(skip=("unet.no_such_block",)))


def test_unknown_op_is_left_in_float_and_listed(tiny_unet):
    """Without decompose_attention, SDPA stays: reported as float, not a crash."""
    r = ptq4dm.quantize(_step(tiny_unet), calibration=NDTC(n=8), progress=False,
                        pipeline="mark,observe,calibrate,solve,fakequant")
    assert any("scaled_dot_product_attention" in why for _, why in r.report.left_in_float)


def test_nan_in_calibration_names_node_and_timestep(tiny_unet):
    import copy

    unet = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        unet.mid_block.resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationNaN) as e:
        ptq4dm.quantize(_step(unet), pipeline="ptq4dm-paper", calibration=NDTC(n=4, batch_size=4), progress=False)
    assert "timesteps" in str(e.value) and ":" in str(e.value)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_cifar10_pipeline_ndtc64(cifar_unet):
    step = _step(cifar_unet, steps=4, kind="ddim")
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=64, batch_size=64), progress=False)
    assert r.report.counts["conv"] == 65 and r.report.counts["linear"] == 48 and r.report.counts["attn_matmul"] == 12
    assert r.report.total_error <= r.report.total_error_minmax
    x, t = r.calibration_set.x[:2], r.calibration_set.t[:2]
    noise = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        q, fp = r.graph(x, t, noise), step(x, t, noise)
    assert _rel(q.prev_sample, fp.prev_sample) < 0.1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert r.report.calibration["observer_bytes"] < 200 * 2**20, peak_mib


def test_per_timestep_scales_are_gathered_by_t(tiny_unet):
    """timestep_groups = S: every sampler step gets its own activation / output range, and the
    graph picks each sample's range from its own t (samples in one batch may differ)."""
    step = _step(tiny_unet, steps=10)
    with pytest.warns(UserWarning, match="few calibration samples"):   # 40 samples over 10 steps: said so
        r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=40, batch_size=40), progress=False,
                            policy=QuantPolicy(timestep_groups=10))
    per_group = r.report.calibration["samples_per_group"]
    assert len(per_group) == 10 and sum(per_group) == 40 and min(per_group) < 10
    tables = [b for name, b in r.graph.gm.named_buffers() if name.startswith("ptq4dm_qp_") and name.endswith("_scale")]
    assert tables and all(tb.shape == (10,) for tb in tables)
    out_scale = next(b for name, b in r.graph.gm.named_buffers()
                     if name.startswith("ptq4dm_qp_") and name.endswith("_scale") and b.unique().numel() > 1)
    assert out_scale.unique().numel() > 1  # ranges really differ across timesteps
    cs = r.calibration_set
    x, t = cs.x[:6], cs.t[:6]
    n = torch.zeros_like(x)
    with torch.no_grad():
        together = r.graph(x, t, n).prev_sample
        alone = torch.cat([r.graph(x[i:i + 1].repeat(2, 1, 1, 1), t[i:i + 1].repeat(2), n[i:i + 1].repeat(2, 1, 1, 1)).prev_sample[:1]
                           for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-6)
    assert all(tr.error <= tr.error_minmax * (1 + 1e-6) + 1e-30 for tr in r.report.tensors)
    with pytest.raises(ValueError, match="timestep_groups"):
        QuantPolicy(timestep_groups=0)


def test_grouped_roles_give_per_step_ranges_to_the_outputs_only(tiny_unet):
    """QuantPolicy(grouped_roles=outputs): mean / variance / x_{t-1} get one range per sampler
    step while the UNet's activations keep one range for all t. The fixed-small variance is a
    function of t alone, so a per-step range represents it (almost) exactly, where one range
    for all t cannot."""
    step = _step(tiny_unet, steps=10)
    outs = ("mean", "variance", "prev_sample")
    cal = NDTC(n=120, batch_size=60)
    per_step = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=cal, progress=False,
                               policy=QuantPolicy(timestep_groups=10, grouped_roles=outs))
    one = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=cal, progress=False)
    qps = per_step.graph.meta["qparams"]
    for tr in per_step.report.tensors:
        assert qps[tr.key].groups == (10 if tr.role in outs else 0), tr
    var = {r.role: r for r in per_step.report.tensors}["variance"]
    var_one = {r.role: r for r in one.report.tensors}["variance"]
    assert var.error < 1e-3 * var_one.error
    assert "(mean/variance/prev_sample)" in per_step.report.policy
    with pytest.raises(ValueError, match="grouped_roles"):
        QuantPolicy(timestep_groups=10, grouped_roles=("weight",))


def test_output_roles_keep_mean_and_variance_in_float(tiny_unet):
    """QuantPolicy(output_roles=("prev_sample",)): only x_{t-1} is rounded to 8 bits; the
    sampler's mean and variance come out exactly as the step with the same quantized UNet
    computes them in float (the variance, a function of t alone, equals the FP step's)."""
    step = _step(tiny_unet)
    cal = NDTC(n=16)
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=cal, progress=False, policy=QuantPolicy(output_roles=("prev_sample",)))
    full = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=cal, progress=False)
    assert r.report.counts["output"] == 1 and full.report.counts["output"] == 3
    assert {tr.role for tr in r.report.tensors} & {"mean", "variance"} == set()
    assert "prev_sample" in {tr.role for tr in r.report.tensors}
    assert "outputs quantized: prev_sample" in r.report.policy
    x, t, n = _inputs()
    with torch.no_grad():
        fp, y, yf = step(x, t, n), r.graph(x, t, n), full.graph(x, t, n)
    assert torch.equal(y.variance, fp.variance)
    assert not torch.equal(yf.variance, fp.variance)   # the full policy does round it
    # x_{t-1} is on the 8-bit grid of its range, the mean is not
    qp = r.graph.meta["qparams"][next(tr.key for tr in r.report.tensors if tr.role == "prev_sample")]
    codes = y.prev_sample / qp.scale + qp.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    mcodes = y.mean / qp.scale + qp.zero_point
    assert not torch.allclose(mcodes, mcodes.round(), atol=1e-3)
    with pytest.raises(ValueError, match="output_roles"):
        QuantPolicy(output_roles=("eps",))


@pytest.mark.parametrize("groups,lowered", [(1, False), (10, False), (10, True)])
def test_share_xt_range_makes_the_next_steps_input_quantizer_exact(tiny_unet, groups, lowered):
    """QuantPolicy(share_xt_range): the convs reading x_t take the range the previous step
    quantized x_{t-1} to, so in a quantized chain their input quantizer changes nothing. In the
    lowered (int8) graph this is the x_{t-1} handoff: the next step's conv_in reads exactly the
    int8 codes the previous step emitted x_{t-1} as."""
    from ptq4dm.ir.quant import fake_quant
    from ptq4dm.passes import PassContext, PassManager

    step = _step(tiny_unet, steps=10, kind="ddim")
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=40, batch_size=40), progress=False,
                        policy=QuantPolicy(timestep_groups=groups, share_xt_range=True))
    if lowered:
        PassManager.from_pipeline("lower{backend=triton}").run(r.graph, PassContext(progress=False))
    ties = r.graph.meta["shared_ranges"]
    assert len(ties) == 1   # conv_in reads x_t
    (dst, src), = ties.items()
    qp, qs = r.graph.meta["qparams"][dst], r.graph.meta["qparams"][src]
    if groups == 1:
        assert torch.equal(qp.scale, qs.scale) and torch.equal(qp.zero_point, qs.zero_point)
    else:
        assert torch.equal(qp.scale[1:], qs.scale[:-1]) and torch.equal(qp.zero_point[1:], qs.zero_point[:-1])
    ts = step.sampler.timesteps
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(3):  # run the quantized chain; check each produced x_t against the next step's range
            x = r.graph(x, ts[i].repeat(4), torch.zeros_like(x)).prev_sample
            g = (i + 1) * groups // len(ts) if groups > 1 else None
            s, z = (qp.scale, qp.zero_point) if g is None else (qp.scale[g], qp.zero_point[g])
            assert torch.equal(fake_quant(x, s, z, qp.qmin, qp.qmax), x)
    entry = next(t for t in r.report.tensors if t.key == dst)
    assert "one step earlier" in entry.spec


def test_share_xt_range_refuses_what_it_cannot_shift(tiny_unet):
    step = _step(tiny_unet, steps=10, kind="ddim")
    with pytest.raises(ValueError, match="one range per sampler step"):
        ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False,
                        policy=QuantPolicy(timestep_groups=5, share_xt_range=True))
    with pytest.raises(ValueError, match="same bits"):
        ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False,
                        policy=QuantPolicy(output_bits=6, share_xt_range=True))


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_the_default_is_the_recommended_pipeline(tiny_unet):
    """ptq4dm.quantize(step) as a user calls it: the paper's passes, the 4 costliest activations
    widened to 16 bits by the sensitivity pass, the weights' rounding learned (reconstruct),
    bias_correct per 1/10 of the steps, conv_in / conv_out in float, mean / variance / x_{t-1} at
    16 bits; the same without reconstruct and the paper's setting one name away."""
    from ptq4dm.passes import PRESETS

    step = _step(tiny_unet, kind="ddim")
    r = ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False)
    assert r.report.policy_obj == PRESETS["recommended"][1]
    assert r.report.bias_correction["groups"] == 10
    kept = [why for _, why in r.report.left_in_float if why == "kept in float by policy"]
    assert len(kept) == 2   # conv_in and conv_out
    assert any(why.startswith("time-embedding path") for _, why in r.report.left_in_float)
    outs = [t for t in r.report.tensors if t.role in ("mean", "variance", "prev_sample")]
    assert outs and all("int16" in t.spec for t in outs), [t.spec for t in outs]
    wide = r.report.sensitivity["widened"]
    assert len(wide) == 4 and all(r.graph.meta["qparams"][k].qmax == 32767 for k in wide)
    assert sorted(t.key for t in r.report.tensors if "sensitivity widen" in t.spec) == sorted(wide)
    rc = r.report.reconstruct   # every quantized conv / linear weight learned, none worse than nearest
    assert len(rc["layers"]) == r.report.counts["conv"] + r.report.counts["linear"]
    assert all(x["error_after"] <= x["error_before"] for x in rc["layers"])
    assert rc["error_after"] < rc["error_before"]
    fast = ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False, pipeline="recommended-fast")
    assert not fast.report.reconstruct and fast.report.policy_obj == r.report.policy_obj
    assert fast.report.bias_correction["groups"] == 10 and fast.report.sensitivity["widened"] == wide
    paper = ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False, pipeline="ptq4dm-paper")
    assert not paper.report.bias_correction and paper.report.policy_obj == QuantPolicy()
    assert all("int8" in t.spec for t in paper.report.tensors if t.role in ("mean", "variance", "prev_sample"))


def test_time_path_fp_keeps_exactly_the_t_only_layers_in_float(tiny_unet):
    """QuantPolicy(time_path_fp=True): the linears of the time embedding (their input is a function
    of t alone) stay float, every layer that reads x_t's features is still quantized."""
    step = _step(tiny_unet, kind="ddim")
    base = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False)
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False,
                        policy=QuantPolicy(time_path_fp=True))
    kept = [n for n, why in r.report.left_in_float if why.startswith("time-embedding path")]
    assert kept and r.report.counts["conv"] == base.report.counts["conv"]
    assert r.report.counts["linear"] == base.report.counts["linear"] - len(kept)
    paths = {r.fp_graph.module_path(n) for n in r.fp_graph.graph.nodes if n.name in kept}
    assert all("time_emb" in (p or "") for p in paths), paths
