"""sensitivity: each quantized tensor's part of the step's error, and widen (the costliest
activations at 16 bits)."""

import copy

import pytest
import torch

import ptq4dm
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, QuantPolicy

FQ = torch.ops.ptq4dm.fake_quant.default
W4 = QuantPolicy(weight_bits=4)


def _step(unet, sampler="ddim"):
    return DiffusionStep(unet, make_sampler(sampler, num_inference_steps=10)).eval()


def _x_err(result, step, n=32, seed=5):
    """Relative squared error of x_{t-1} of the quantized graph against the float step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *step.sample_shape(1)[1:]), generator=g)
    t = step.sampler.timesteps[torch.randint(0, step.sampler.S, (n,), generator=g)]
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        ref = step(x, t, noise)[0]
        out = result.graph(x, t, noise)[0]
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.fixture(scope="module")
def analysed(tiny_unet):
    step = _step(tiny_unet)
    res = ptq4dm.quantize(step, calibration=NDTC(n=32), policy=W4, progress=False,
                          pipeline=DEFAULT_PIPELINE + ",sensitivity{n=32,batch_size=16}")
    return step, res


def test_every_quantized_tensor_is_ranked_once(analysed):
    _, res = analysed
    sens = res.report.sensitivity
    keys = [r["key"] for r in sens["rows"]]
    assert sorted(keys) == sorted(res.graph.meta["qparams"])
    errs = [r["error"] for r in sens["rows"]]
    assert errs == sorted(errs, reverse=True) and min(errs) >= 0
    assert sum(r["share"] for r in sens["rows"]) == pytest.approx(1.0)
    # weights are also measured at 4 bits: (these are already 4-bit: nothing lower to measure)
    assert all("error_w4" not in r for r in sens["rows"])
    assert "tensor" in res.report.sensitivity_table() and "all together" in res.report.sensitivity_table()


def test_the_errors_add_up_to_the_whole_step(analysed):
    """The shares mean something only if one-at-a-time errors roughly add up to the error of all
    quantizers together (small, nearly independent errors)."""
    _, res = analysed
    s = res.report.sensitivity
    assert 0.5 * s["error_sum"] < s["error_all"] < 2.0 * s["error_sum"], s


def test_the_ranking_finds_what_matters(tiny_unet):
    """Keeping the top-ranked layers in float removes more of the step's error than keeping the
    same number of bottom-ranked ones: the property a user of the ranking relies on."""
    step = _step(tiny_unet)
    res = ptq4dm.quantize(step, calibration=NDTC(n=32), policy=W4, progress=False,
                          pipeline=DEFAULT_PIPELINE + ",sensitivity{n=32}")
    rows = [r for r in res.report.sensitivity["rows"] if r["role"] == "weight"]
    layers = lambda rs: tuple(dict.fromkeys(r["key"].split(":")[0] for r in rs))   # noqa: E731
    top, bottom = layers(rows[:3]), layers(rows[-3:])
    err = {}
    for name, skip in (("top", top), ("bottom", bottom)):
        r = ptq4dm.quantize(step, calibration=NDTC(n=32), policy=QuantPolicy(weight_bits=4, skip=skip),
                            progress=False, pipeline=DEFAULT_PIPELINE)
        err[name] = _x_err(r, step)
    assert err["top"] < err["bottom"], err


def test_weights_at_8_bits_are_also_measured_at_4(tiny_unet):
    step = _step(tiny_unet)
    res = ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                          pipeline=DEFAULT_PIPELINE + ",sensitivity{n=16}")
    w = [r for r in res.report.sensitivity["rows"] if r["role"] == "weight"]
    assert w and all("error_w4" in r for r in w)
    # 4-bit rounding is 16x coarser: far more error, in total and for nearly every layer
    assert sum(r["error_w4"] for r in w) > 20 * sum(r["error"] for r in w)
    assert sum(r["error_w4"] > r["error"] for r in w) >= 0.9 * len(w)
    assert "at 4 bits" in res.report.sensitivity_table()


def test_widen_gives_the_costliest_activations_16_bits(tiny_unet, tmp_path):
    step = _step(tiny_unet)
    base = ptq4dm.quantize(step, calibration=NDTC(n=32), progress=False, pipeline=DEFAULT_PIPELINE + ",sensitivity{n=32}")
    wide = ptq4dm.quantize(step, calibration=NDTC(n=32), progress=False,
                           pipeline=DEFAULT_PIPELINE + ",sensitivity{n=32,widen=3}")
    acts = [r["key"] for r in base.report.sensitivity["rows"] if r["role"] != "weight" and r["bits"] <= 8]
    assert wide.report.sensitivity["widened"] == acts[:3]
    for k, qp in wide.graph.meta["qparams"].items():
        wide_now = k in acts[:3]
        assert (qp.qmin, qp.qmax) == ((-32768, 32767) if wide_now else
                                      (base.graph.meta["qparams"][k].qmin, base.graph.meta["qparams"][k].qmax)), k
    # the fake-quant nodes read the new qparams: the step is closer to float
    fq = {n.meta["ptq4dm.qtensor"].key: n for n in wide.graph.graph.nodes if n.target is FQ}
    assert all(fq[k].args[3:5] == (-32768, 32767) for k in acts[:3])
    assert wide.report.sensitivity["error_all_widened"] < wide.report.sensitivity["error_all"]
    assert _x_err(wide, step) < _x_err(base, step)
    # the artifact keeps the 16-bit ranges: the loaded graph is the one that was saved
    from ptq4dm import artifact

    path = tmp_path / "wide.safetensors"
    artifact.save(wide, step, path)
    graph, _, header = artifact.load(path)
    assert {s["key"]: s["bits"] for s in header["specs"] if s["key"] in acts[:3]} == {k: 16 for k in acts[:3]}
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn((4, *step.sample_shape(1)[1:]), generator=g), torch.zeros(4, *step.sample_shape(1)[1:])
    t = step.sampler.timesteps[[0, 3, 6, 9]]
    with torch.no_grad():
        torch.testing.assert_close(graph(x, t, noise)[0], wide.graph(x, t, noise)[0], rtol=0, atol=1e-5)
    # lowering leaves the layers that read a 16-bit activation in float and says so
    readers = {n.name for n in wide.graph.graph.nodes if n.op == "call_function" and n.args
               and getattr(n.args[0], "target", None) is FQ and n.args[0].meta["ptq4dm.qtensor"].key in acts[:3]
               and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)}
    for backend in ("triton", "x86"):
        kept = {name for name, why in ptq4dm.lower(copy.deepcopy(graph), backend=backend)["kept"]
                if "wider than int8" in why or "not 8 bits" in why}
        assert readers and readers <= kept, (backend, readers, kept)


def test_sensitivity_says_where_it_belongs(tiny_unet):
    step = _step(tiny_unet)
    with pytest.raises(ValueError, match="before bias_correct"):
        ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",bias_correct,sensitivity")
    with pytest.raises(ValueError, match="run 'fakequant' before it"):
        ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                        pipeline="decompose_attention,mark,observe,calibrate,solve,sensitivity")
    with pytest.raises(ValueError, match="widen must be >= 0"):
        ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=-1}")
