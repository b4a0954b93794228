"""reconstruct: learned rounding (AdaRound) of the weights against the float layer outputs."""

import pytest
import torch

import ptq4dm
from conftest import step_x_error as _x_err
from ptq4dm.ir.quant import fake_quant
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, QuantPolicy
from ptq4dm.passes.observe import QTENSOR

W4 = QuantPolicy(weight_bits=4)
REC = ",reconstruct{iters=30,batch_size=16,n=24}"


def _weights(result):
    """{key: (fake-quantized weight buffer, float weight, qparams)} of the simulated graph."""
    gm, qps = result.graph.gm, result.graph.meta["qparams"]
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    return {n.meta[QTENSOR].key: (tensors[str(n.target)], tensors[n.meta["ptq4dm.float_weight"]], qps[n.meta[QTENSOR].key])
            for n in result.graph.graph.nodes if n.op == "get_attr" and "ptq4dm.float_weight" in n.meta}


class _Loaded:
    def __init__(self, graph):
        self.graph = graph


@pytest.fixture(scope="module")
def pair(tiny_unet):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=10)).eval()
    kw = dict(calibration=NDTC(n=32), policy=W4, progress=False)
    return step, ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE, **kw), ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + REC, **kw)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_learned_rounding_stays_on_the_grid_and_moves_codes_by_one(pair):
    """The learned weights are codes of the same qparams (fake_quant leaves them unchanged), each
    one step at most from nearest rounding (AdaRound chooses floor or ceil), and some moved."""
    _, rtn, rec = pair
    moved, rtn_w = 0, _weights(rtn)
    for key, (w, w_fp, qp) in _weights(rec).items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
        nearest = rtn_w[key][0]
        s = qp.scale.reshape([-1] + [1] * (w.dim() - 1)) if qp.axis is not None else qp.scale
        assert float(((w - nearest) / s).abs().max()) <= 1.0 + 1e-4, key
        moved += int((w != nearest).sum())
    assert moved > 0


def test_reconstruct_lowers_the_layer_and_step_errors(pair):
    """Against float layer outputs on the calibration set: the summed relative output error drops
    well below nearest rounding's, and so does the step's x_{t-1} error on fresh inputs."""
    step, rtn, rec = pair
    rc = rec.report.reconstruct
    assert rc and len(rc["layers"]) == rtn.report.counts["conv"] + rtn.report.counts["linear"]
    assert rc["error_after"] < 0.9 * rc["error_before"]
    assert all(r["error_after"] <= r["error_before"] for r in rc["layers"])
    assert _x_err(rec, step) < 0.9 * _x_err(rtn, step)


def test_reconstruct_is_deterministic(pair, tiny_unet):
    step, _, rec = pair
    again = ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + REC, calibration=NDTC(n=32), policy=W4, progress=False)
    again_w = _weights(again)
    for key, (w, _, _) in _weights(rec).items():
        assert torch.equal(w, again_w[key][0]), key


def test_the_artifact_stores_the_learned_codes(pair, tmp_path):
    step, _, rec = pair
    path = tmp_path / "rec.ptq4dm.safetensors"
    from ptq4dm import artifact

    artifact.save(rec, step, path)
    graph, _, header = artifact.load(path)
    assert {s["bits"] for s in header["specs"] if s["role"] == "weight"} == {4}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(step.sample_shape(4), generator=g)
    t = step.sampler.timesteps[torch.randint(0, step.sampler.S, (4,), generator=g)]
    with torch.no_grad():
        torch.testing.assert_close(graph(x, t, torch.zeros_like(x))[0], rec.graph(x, t, torch.zeros_like(x))[0],
                                   rtol=0, atol=1e-5)
    # and nearest rounding of the float weights would not give that graph: the codes are the learned ones
    saved, loaded = _weights(rec), _weights(_Loaded(graph))
    codes_moved = [k for k, (w, w_fp, qp) in saved.items()
                   if not torch.equal(w, fake_quant(w_fp.float(), qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis))]
    assert codes_moved
    for k in codes_moved:
        assert torch.equal(saved[k][0], loaded[k][0]), k


def test_reconstruct_names_its_misuse(pair):
    step, _, _ = pair
    with pytest.raises(ValueError, match="before bias_correct"):
        ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",bias_correct" + REC, calibration=NDTC(n=16),
                        progress=False)
    with pytest.raises(ValueError, match="iters"):
        ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{iters=0}", calibration=NDTC(n=16),
                        progress=False)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_block_wise_reconstruction_learns_each_block_together(pair):
    """blocks=true (BRECQ): the layers of a resnet block / attention module share one unit and one
    loss on the block's float output; each unit's output error ends no higher than nearest
    rounding's, the step's x_{t-1} error drops, the codes stay on the grid within one step of
    nearest, and two runs give the same weights."""
    step, rtn, _ = pair
    pipe = DEFAULT_PIPELINE + ",reconstruct{iters=30,batch_size=8,n=24,blocks=true}"
    kw = dict(calibration=NDTC(n=32), policy=W4, progress=False)
    rec = ptq4dm.quantize(step, pipeline=pipe, **kw)
    rc = rec.report.reconstruct
    assert rc["blocks"]
    grouped = [r for r in rc["layers"] if len(r.get("layers", ())) > 1]
    assert grouped, "no block held more than one layer"
    assert any("resnets" in r["layer"] for r in grouped) and any("attentions" in r["layer"] for r in grouped)
    # every conv / linear is in exactly one unit
    names = [n for r in rc["layers"] for n in r.get("layers", [r["layer"]])]
    assert len(names) == len(set(names)) == rtn.report.counts["conv"] + rtn.report.counts["linear"]
    assert all(r["error_after"] <= r["error_before"] for r in rc["layers"])
    assert rc["error_after"] < 0.9 * rc["error_before"]
    assert _x_err(rec, step) < 0.9 * _x_err(rtn, step)
    rtn_w, again = _weights(rtn), _weights(ptq4dm.quantize(step, pipeline=pipe, **kw))
    for key, (w, _, qp) in _weights(rec).items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
        s = qp.scale.reshape([-1] + [1] * (w.dim() - 1)) if qp.axis is not None else qp.scale
        assert float(((w - rtn_w[key][0]) / s).abs().max()) <= 1.0 + 1e-4, key
        assert torch.equal(w, again[key][0]), key


def test_reconstruct_after_a_mixed_bit_budget(pair):
    """sensitivity{budget=B,widths=ends} leaves some weights at 4 bits with new qparams, then reconstruct learns
    the rounding of just those (min_bits=4): every 4-bit weight a unit, the 8-bit ones untouched."""
    step, _, _ = pair
    pipe = DEFAULT_PIPELINE + ",sensitivity{budget=6,n=16,widths=ends},reconstruct{iters=10,batch_size=8,n=16,min_bits=4}"
    mixed = ptq4dm.quantize(step, pipeline=pipe, calibration=NDTC(n=32), progress=False)
    bits = {r["key"]: r["bits"] for r in mixed.report.sensitivity["mixed"]["layers"]}
    assert set(bits.values()) == {4, 8}
    rc = mixed.report.reconstruct
    assert len(rc["layers"]) == sum(b == 4 for b in bits.values())
    for key, (w, w_fp, qp) in _weights(mixed).items():
        nearest = fake_quant(w_fp.float(), qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis)
        if bits[key] == 8:
            assert torch.equal(w, nearest.to(w.dtype)), key


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_learned_scales_keep_the_codes_on_the_new_grid_and_lower_the_error(pair, tmp_path):
    """scales=true: each weight's per-channel scale is learned with its rounding. The qparams the
    artifact and ``lower`` read are the learned ones, the weights are codes on that grid (within
    the bits), the scale moved, and the layer and step errors drop at least as far as with the
    rounding alone."""
    step, rtn, rec = pair
    pipe = DEFAULT_PIPELINE + ",reconstruct{iters=30,batch_size=16,n=24,scales=true,scale_lr=0.01}"
    sc = ptq4dm.quantize(step, pipeline=pipe, calibration=NDTC(n=32), policy=W4, progress=False)
    rc = sc.report.reconstruct
    assert all(r["error_after"] <= r["error_before"] for r in rc["layers"])
    assert rc["error_after"] < 0.9 * rc["error_before"]
    rtn_w, moved = _weights(rtn), 0
    for key, (w, _, qp) in _weights(sc).items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
        moved += int((qp.scale != rtn_w[key][2].scale).sum())
    assert moved > 0
    assert _x_err(sc, step) < 0.9 * _x_err(rtn, step)
    from ptq4dm import artifact   # the artifact stores the learned scales with the codes: the same graph back

    artifact.save(sc, step, tmp_path / "sc.ptq4dm.safetensors")
    graph, _, _ = artifact.load(tmp_path / "sc.ptq4dm.safetensors")
    x = torch.randn(step.sample_shape(4), generator=torch.Generator().manual_seed(2))
    t = step.sampler.timesteps[:4]
    with torch.no_grad():
        torch.testing.assert_close(graph(x, t, torch.zeros_like(x))[0], sc.graph(x, t, torch.zeros_like(x))[0],
                                   rtol=0, atol=1e-5)


def test_network_phase_learns_every_rounding_against_the_unet_output(pair):
    """network=N: after the layer-wise phase, all roundings together against the float UNet's output;
    the output error it reports never rises (it keeps the layer-wise codes if it would), the codes
    stay on the grid, and a wrong option is named."""
    step, rtn, _ = pair
    pipe = DEFAULT_PIPELINE + ",reconstruct{iters=10,batch_size=8,n=24,network=20,network_lr=0.05,network_reg=0.01}"
    net = ptq4dm.quantize(step, pipeline=pipe, calibration=NDTC(n=32), policy=W4, progress=False)
    ph = net.report.reconstruct["network"]
    assert ph["iters"] == 20 and ph["error_after"] <= ph["error_before"] and 0 <= ph["moved"] <= 1
    for key, (w, _, qp) in _weights(net).items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
    with pytest.raises(ValueError, match="blocks"):
        ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{scales=true,blocks=true}",
                        calibration=NDTC(n=16), progress=False)
    with pytest.raises(ValueError, match="network"):
        ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{network=-1}", calibration=NDTC(n=16),
                        progress=False)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_restarts_keep_the_reconstruction_whose_held_out_chains_land_closest_to_fp(pair):
    """reconstruct{restarts=k}: k reconstructions (seeds seed .. seed + k - 1), each judged by the PSNR from
    FP of held-out chains; the graph keeps the best one's codes and scales: exactly what a single
    reconstruction with the chosen seed gives."""
    step, _, _ = pair
    kw = dict(calibration=NDTC(n=32), policy=W4, progress=False)
    rec = ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{iters=30,batch_size=16,n=24,scales=true,"
                          "restarts=3,select_samples=4,seed=5}", **kw)
    rc = rec.report.reconstruct
    tries = rc["restarts"]
    assert [t["seed"] for t in tries] == [5, 6, 7]
    assert rc["chosen_seed"] == max(tries, key=lambda t: t["psnr"])["seed"]
    assert len({round(t["psnr"], 6) for t in tries}) > 1   # the seeds do reach different roundings
    alone = ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{iters=30,batch_size=16,n=24,scales=true,"
                            f"seed={rc['chosen_seed']}}}", **kw)
    got, want = _weights(rec), _weights(alone)
    for key in want:
        assert torch.equal(got[key][0], want[key][0]), key
        assert torch.equal(got[key][2].scale, want[key][2].scale), key
    with pytest.raises(ValueError, match="restarts"):
        ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{restarts=0}", **kw)


@pytest.mark.parametrize("op", ["conv", "linear"])
def test_refit_finds_each_channels_least_squares_scale(op):
    """reconstruct{refit=quantized}'s closed form: for fixed codes, the per-channel scale it returns recovers the scale
    that made the target (with its bias, through the layer), and with noise in the target no channel's error
    falls when its scale moves either way: the least-squares optimum, channel by channel."""
    from ptq4dm.passes.reconstruct import Reconstruct, aten

    g = torch.Generator().manual_seed(0)
    if op == "conv":
        f, x, codes, rest = aten.conv2d.default, torch.randn(40, 6, 7, 7, generator=g), \
            torch.randint(-8, 8, (5, 6, 3, 3), generator=g).float(), [torch.randn(5, generator=g), [1, 1], [1, 1], [1, 1], 1]
        shape, ch = (5, 1, 1, 1), 1
    else:
        f, x, codes, rest = aten.linear.default, torch.randn(40, 9, 12, generator=g), \
            torch.randint(-8, 8, (5, 12), generator=g).float(), [torch.randn(5, generator=g)]
        shape, ch = (5, 1), -1
    s_true = torch.rand(shape, generator=g) + 0.5
    target = f(x, codes * s_true, *rest)
    got = Reconstruct._refit(f, x, rest, target, codes, torch.ones(shape))
    torch.testing.assert_close(got, s_true, rtol=1e-4, atol=0)
    noisy = target + 0.3 * target.std() * torch.randn(target.shape, generator=g)
    best = Reconstruct._refit(f, x, rest, noisy, codes, torch.ones(shape))
    dims = [d for d in range(target.dim()) if d != ch % target.dim()]
    err = lambda s: (f(x, codes * s, *rest) - noisy).pow(2).sum(dims)
    for c in range(5):
        for k in (0.99, 1.01):
            moved = best.clone()
            moved[c] *= k
            assert float(err(moved)[c]) > float(err(best)[c])


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_refit_keeps_the_codes_and_lowers_the_first_layers_error(pair):
    """refit=quantized after the learned rounding: the first layer's codes are the ones it learned without refit (the
    refit comes after), its output error is no higher, the weights are codes on the refitted grid, and the
    refitted scales are the ones in the qparams the artifact stores."""
    step, _, _ = pair
    kw = dict(calibration=NDTC(n=32), policy=W4, progress=False)
    base = "reconstruct{iters=30,batch_size=16,n=24,scales=true,scale_lr=0.01"
    plain = ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + f",{base}}}", **kw)
    refit = ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + f",{base},refit=quantized}}", **kw)
    p0, r0 = plain.report.reconstruct["layers"][0], refit.report.reconstruct["layers"][0]
    assert p0["layer"] == r0["layer"] and r0["error_after"] <= p0["error_after"] + 1e-7
    first = next(n for n in refit.graph.graph.nodes if n.name == r0["layer"]).args[1].meta[QTENSOR].key
    (wp, _, qpp), (wr, _, qpr) = _weights(plain)[first], _weights(refit)[first]
    expand = lambda qp: qp.scale.reshape([-1] + [1] * (wp.dim() - 1))
    torch.testing.assert_close(wp / expand(qpp), wr / expand(qpr), rtol=0, atol=1e-4)   # the same codes
    assert not torch.equal(qpp.scale, qpr.scale)
    for key, (w, _, qp) in _weights(refit).items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_float_input_refit_and_qdrop_keep_codes_on_the_grid_and_name_their_misuse(pair):
    """refit=float with drop=0.5 (the layer learns on inputs mixed from the float model's): the weights are codes on
    the refitted grid, no layer ends worse than nearest rounding on the quantized inputs, some scales moved.
    refit takes '', 'quantized' or 'float', drop a probability; both are layer-wise: a wrong value is named."""
    step, rtn, _ = pair
    rec = ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",reconstruct{iters=20,batch_size=8,n=24,refit=float,"
                          "drop=0.5}", calibration=NDTC(n=32), policy=W4, progress=False)
    assert all(r["error_after"] <= r["error_before"] for r in rec.report.reconstruct["layers"])
    rtn_w, moved = _weights(rtn), 0
    for key, (w, _, qp) in _weights(rec).items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
        moved += int((qp.scale != rtn_w[key][2].scale).sum())
    assert moved > 0
    kw = dict(calibration=NDTC(n=16), progress=False)
    for opts, word in (("refit=both", "refit"), ("drop=1.5", "drop"), ("drop=0.5,blocks=true", "blocks")):
        with pytest.raises(ValueError, match=word):
            ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + f",reconstruct{{{opts}}}", **kw)


@pytest.mark.parametrize("op", ["conv", "linear"])
def test_weighted_refit_is_the_least_squares_scale_of_the_weighted_rows(op):
    """t_weight's plumbing in the refit: rows weighted 0 are left out, exactly (the scale is the one the other
    rows alone give), and weighting every row by the same factor changes nothing."""
    from ptq4dm.passes.reconstruct import Reconstruct, aten

    g = torch.Generator().manual_seed(1)
    if op == "conv":
        f, x, codes, rest = aten.conv2d.default, torch.randn(40, 6, 7, 7, generator=g), \
            torch.randint(-8, 8, (5, 6, 3, 3), generator=g).float(), [torch.randn(5, generator=g), [1, 1], [1, 1], [1, 1], 1]
        shape = (5, 1, 1, 1)
    else:
        f, x, codes, rest = aten.linear.default, torch.randn(40, 9, 12, generator=g), \
            torch.randint(-8, 8, (5, 12), generator=g).float(), [torch.randn(5, generator=g)]
        shape = (5, 1)
    target = f(x, codes * (torch.rand(shape, generator=g) + 0.5), *rest)
    target = target + 0.5 * target.std() * torch.randn(target.shape, generator=g)
    rw = (torch.arange(40) % 2).float()
    got = Reconstruct._refit(f, x, rest, target, codes, torch.ones(shape), rw)
    alone = Reconstruct._refit(f, x[1::2], rest, target[1::2], codes, torch.ones(shape))
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=0)
    plain = Reconstruct._refit(f, x, rest, target, codes, torch.ones(shape))
    torch.testing.assert_close(Reconstruct._refit(f, x, rest, target, codes, torch.ones(shape), torch.full((40,), 3.0)),
                               plain, rtol=1e-5, atol=0)
    assert not torch.allclose(got, plain, rtol=1e-3)


def test_chain_weighted_reconstruct_reports_its_step_weights_and_names_its_misuse(pair):
    """reconstruct{t_weight=1}: each sample's error weighted by its step's measured chain sensitivity. The report
    names the weight of every step of the sampler (positive); the weights are codes on the grid; no layer ends worse
    than nearest rounding on the weighted error; the result differs from the unweighted one (the step weights are
    seeded: test_samplers). No chains (t_chains=0), or blocks=true, is refused by name."""
    step, rtn, rec = pair
    kw = dict(calibration=NDTC(n=32), policy=W4, progress=False)
    pipe = DEFAULT_PIPELINE + ",reconstruct{iters=30,batch_size=16,n=24,t_weight=1,t_chains=4}"
    tw = ptq4dm.quantize(step, pipeline=pipe, **kw)
    info = tw.report.reconstruct["t_weight"]
    assert len(info["per_step"]) == step.sampler.S and min(info["per_step"]) > 0
    assert info["sample_weight_max"] > info["sample_weight_min"] > 0
    assert all(r["error_after"] <= r["error_before"] for r in tw.report.reconstruct["layers"])
    got, plain = _weights(tw), _weights(rec)
    for key, (w, _, qp) in got.items():
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
    assert any(not torch.equal(w, plain[key][0]) for key, (w, _, _) in got.items())
    for opts in ("t_weight=1,t_chains=0", "t_weight=1,blocks=true"):
        with pytest.raises(ValueError, match="t_weight"):
            ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + f",reconstruct{{{opts}}}", **kw)
