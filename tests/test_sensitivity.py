"""sensitivity: each quantized tensor's part of the step's error, and widen (the costliest
activations at 16 bits)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptq4dm
from conftest import step_x_error as _x_err
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, QuantPolicy

FQ = torch.ops.ptq4dm.fake_quant.default
W4 = QuantPolicy(weight_bits=4)


def _step(unet, sampler="ddim"):
    return DiffusionStep(unet, make_sampler(sampler, num_inference_steps=10)).eval()


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


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
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
    # lowering: triton leaves the layers that read a 16-bit activation in float and says so; x86
    # runs each as two int8 ops (split16) unless its cost rule keeps it, or keeps all with split16=false
    readers = {n.name for n in wide.graph.graph.nodes if n.op == "call_function" and n.args
               and getattr(n.args[0], "target", None) is FQ and n.args[0].meta["ptq4dm.qtensor"].key in acts[:3]
               and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)}
    kept = {name for name, why in ptq4dm.lower(copy.deepcopy(graph), backend="triton")["kept"]
            if "wider than int8" in why or "not 8 bits" in why}
    assert readers and readers <= kept, ("triton", readers, kept)
    off = ptq4dm.lower(copy.deepcopy(graph), backend="x86", split16=False)
    assert readers <= {name for name, why in off["kept"] if "16 bits" in why or "cost rule" in why}, off["kept"]
    on = ptq4dm.lower(copy.deepcopy(graph), backend="x86", split16=True)
    by_cost = {name for name, why in on["kept"] if "cost rule" in why}
    assert not any("16 bits" in why for _, why in on["kept"])
    assert on["counts"]["split16"] == len(readers - by_cost), (on["counts"], readers, by_cost)
    every = ptq4dm.lower(copy.deepcopy(graph), backend="x86", min_k=1, min_n=1, split16=True)   # the tiny convs too
    assert every["counts"]["split16"] == len(readers), every["counts"]


def _assert_loads_to_the_same_graph(path, result, step):
    """The artifact at ``path`` loads to a graph that gives ``result.graph``'s x_{t-1} (noisy, middle, quiet steps)."""
    from ptq4dm import artifact

    graph, _, _ = artifact.load(path)
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn((3, *step.sample_shape(1)[1:]), generator=g), torch.zeros(3, *step.sample_shape(1)[1:])
    t = step.sampler.timesteps[[0, 4, 9]]
    with torch.no_grad():
        torch.testing.assert_close(graph(x, t, noise)[0], result.graph(x, t, noise)[0], rtol=0, atol=1e-5)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_a_bit_budget_puts_4_bits_where_they_cost_least(tiny_unet, tmp_path):
    """sensitivity{budget=B,widths=ends}: average weight bits within B, the lowered weights are 4-bit in the
    graph, the report and the artifact (two codes per byte, a smaller file), and the mixed graph
    is closer to float than every weight at 4 bits."""
    step = _step(tiny_unet)
    cal = NDTC(n=16)
    mixed = ptq4dm.quantize(step, calibration=cal, progress=False,
                            pipeline=DEFAULT_PIPELINE + ",sensitivity{n=16,budget=6,widths=ends}")
    m = mixed.report.sensitivity["mixed"]
    assert 4.0 <= m["average_bits"] <= 6.0 and m["widths"] == "ends"
    assert sum(r["elements"] * r["bits"] for r in m["layers"]) <= 6.0 * m["weights"]
    low = {r["key"] for r in m["layers"] if r["bits"] == 4}
    high = {r["key"] for r in m["layers"] if r["bits"] == 8}
    assert low and high and len(low) + len(high) == len(m["layers"])
    for k in low:
        assert (mixed.graph.meta["qparams"][k].qmin, mixed.graph.meta["qparams"][k].qmax) == (-7, 7)
    assert all("int4" in r.spec for r in mixed.report.tensors if r.key in low)
    # the greedy order: a weight kept at 8 bits saves at least as much error per extra bit as any
    # 4-bit weight that would also have fitted
    rows = {r["key"]: r for r in mixed.report.sensitivity["rows"]}
    el = {r["key"]: r["elements"] for r in m["layers"]}
    per_bit = lambda k: (rows[k]["error_w4"] - rows[k]["error"]) / (4 * el[k])   # noqa: E731
    spare = 6.0 * m["weights"] - sum(r["elements"] * r["bits"] for r in m["layers"])
    fits = [k for k in low if 4 * el[k] <= spare]
    assert not fits   # greedy stops only when no lowered weight fits in what is left
    assert max(per_bit(k) for k in high) >= min(per_bit(k) for k in low)
    w4 = ptq4dm.quantize(step, calibration=cal, progress=False, policy=W4,
                         pipeline=DEFAULT_PIPELINE + ",sensitivity{n=16}")
    w8 = ptq4dm.quantize(step, calibration=cal, progress=False, pipeline=DEFAULT_PIPELINE + ",sensitivity{n=16}")
    assert w8.report.sensitivity["error_all"] <= mixed.report.sensitivity["error_all_mixed"]
    assert mixed.report.sensitivity["error_all_mixed"] < w4.report.sensitivity["error_all"]
    assert _x_err(mixed, step) < _x_err(w4, step)
    assert "lowered" in mixed.report.bits_table()
    # the artifact: 4-bit codes two per byte, bits in the header, the same graph after loading
    from ptq4dm import artifact
    from ptq4dm.ir.serialize import load_artifact

    pm, p8 = tmp_path / "mixed.safetensors", tmp_path / "w8.safetensors"
    artifact.save(mixed, step, pm)
    artifact.save(w8, step, p8)
    tensors, header = load_artifact(pm)
    bits = {s["key"]: s["bits"] for s in header["specs"]}
    assert {k for k in bits if bits[k] == 4} == low
    assert all(f"w4/{k}" in tensors and tensors[f"w4/{k}"].numel() == (el[k] + 1) // 2 for k in low)
    saved = sum(el[k] for k in low) / 2
    assert pm.stat().st_size < p8.stat().st_size - 0.9 * saved
    _assert_loads_to_the_same_graph(pm, mixed, step)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_refine_rechooses_activation_scales_against_the_output(tiny_unet):
    """refine: the activations' scales move only where the step's x_{t-1} error falls, the graph and
    the qparams agree afterwards, and the error on inputs it never saw does not grow by much."""
    step = _step(tiny_unet)
    base = ptq4dm.quantize(step, calibration=NDTC(n=32), progress=False,
                           pipeline=DEFAULT_PIPELINE + ",sensitivity{n=32,weights=false}")
    ref = ptq4dm.quantize(step, calibration=NDTC(n=32), progress=False,
                          pipeline=DEFAULT_PIPELINE + ",sensitivity{n=32,weights=false,refine=-1}")
    r = ref.report.sensitivity["refined"]
    assert r["tensors"] == sum(1 for x in base.report.sensitivity["rows"] if x["role"] != "weight")
    assert r["error_after"] <= r["error_before"] == pytest.approx(base.report.sensitivity["error_all"])
    qb, qr = base.graph.meta["qparams"], ref.graph.meta["qparams"]
    for k in qb:
        f = r["factors"].get(k, 1.0)
        torch.testing.assert_close(qr[k].scale, qb[k].scale * f)
    fq = {n.meta["ptq4dm.qtensor"].key: n for n in ref.graph.graph.nodes if n.target is FQ}
    for k, f in r["factors"].items():
        s_node = fq[k].args[1]
        torch.testing.assert_close(getattr(ref.graph.gm, s_node.target), qr[k].scale)
    if r["factors"]:
        assert r["error_after"] < r["error_before"]
    assert _x_err(ref, step, n=48, seed=11) < 1.25 * _x_err(base, step, n=48, seed=11)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=0, max_size=67))
def test_int4_packing_round_trips(codes):
    from ptq4dm.ir.quant import pack_int4, unpack_int4

    c = torch.tensor(codes, dtype=torch.int8)
    packed = pack_int4(c)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_int4(packed, len(codes)), c)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(-(1 << (b - 1)), (1 << (b - 1)) - 1),
                                                                           min_size=0, max_size=67))))
def test_n_bit_packing_round_trips_in_n_bits_per_code(case):
    from ptq4dm.ir.quant import pack_bits, unpack_bits

    bits, codes = case
    c = torch.tensor(codes, dtype=torch.int8)
    packed = pack_bits(c, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, len(codes)), c)
    if codes:
        with pytest.raises(ValueError, match=f"{bits}-bit codes must lie in"):
            pack_bits(torch.tensor([1 << (bits - 1)]), bits)


def test_a_budget_over_every_width_moves_weights_along_their_error_hull(tiny_unet, tmp_path):
    """sensitivity{budget=B,widths=all}: each weight at any width from 4 to its own 8 bits, measured at each; the
    average within the budget; the greedy stops only when no weight's next move fits; the widths in between land in
    the graph's qparams and in the artifact as a 5- to 7-bit stream (ceil(n * bits / 8) bytes), loading to the same
    graph. On this model the budget at 5 bits puts some weights at a width in between."""
    step = _step(tiny_unet)
    cal = NDTC(n=16)
    mixed = ptq4dm.quantize(step, calibration=cal, progress=False,
                            pipeline=DEFAULT_PIPELINE + ",sensitivity{n=16,budget=5,widths=all}")
    m = mixed.report.sensitivity["mixed"]
    rows = {r["key"]: r for r in mixed.report.sensitivity["rows"]}
    assert m["average_bits"] <= 5.0
    assert sum(r["elements"] * r["bits"] for r in m["layers"]) <= 5.0 * m["weights"]
    assert all(f"error_w{b}" in rows[r["key"]] for r in m["layers"] for b in range(4, 8))
    between = {r["key"]: r["bits"] for r in m["layers"] if 4 < r["bits"] < 8}
    assert between, [r["bits"] for r in m["layers"]]
    for r in m["layers"]:
        qp = mixed.graph.meta["qparams"][r["key"]]
        assert (qp.qmin, qp.qmax) == (-(2 ** (r["bits"] - 1) - 1), 2 ** (r["bits"] - 1) - 1)
    spare = 5.0 * m["weights"] - sum(r["elements"] * r["bits"] for r in m["layers"])
    for r in m["layers"]:   # the greedy stops a weight only when its next move along its hull does not fit
        if r["bits"] < 8:
            e = {b: rows[r["key"]][f"error_w{b}"] for b in range(4, 8)} | {8: rows[r["key"]]["error"]}
            b0 = r["bits"]
            b1 = max(range(b0 + 1, 9), key=lambda b: ((e[b0] - e[b]) / (b - b0), b))
            assert (b1 - b0) * r["elements"] > spare, (r, e)
    from ptq4dm import artifact
    from ptq4dm.ir.serialize import load_artifact

    path = tmp_path / "mixed.safetensors"
    artifact.save(mixed, step, path)
    tensors, header = load_artifact(path)
    el = {r["key"]: r["elements"] for r in m["layers"]}
    for k, b in between.items():
        assert tensors[f"wb/{k}"].numel() == (el[k] * b + 7) // 8
    _assert_loads_to_the_same_graph(path, mixed, step)
    with pytest.raises(ValueError, match="widths must be 'ends'"):
        ptq4dm.quantize(step, calibration=cal, progress=False,
                        pipeline=DEFAULT_PIPELINE + ",sensitivity{n=16,budget=5,widths=some}")


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_sensitivity_says_where_it_belongs(tiny_unet):
    step = _step(tiny_unet)
    with pytest.raises(ValueError, match="before bias_correct"):
        ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",bias_correct,sensitivity")
    with pytest.raises(ValueError, match="run 'fakequant' before it"):
        ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                        pipeline="decompose_attention,mark,observe,calibrate,solve,sensitivity")
    with pytest.raises(ValueError, match="needs weights=true"):
        ptq4dm.quantize(step, calibration=NDTC(n=8), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",sensitivity{budget=5,weights=false}")
    with pytest.raises(ValueError, match="budget=3 bits per weight is below"):
        ptq4dm.quantize(step, calibration=NDTC(n=8), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",sensitivity{n=8,budget=3}")
    with pytest.raises(ValueError, match="widen must be >= 0"):
        ptq4dm.quantize(step, calibration=NDTC(n=16), progress=False,
                        pipeline=DEFAULT_PIPELINE + ",sensitivity{widen=-1}")


def test_chain_weighted_errors_count_each_sample_by_its_step(tiny_unet):
    """sensitivity{t_weight=g}: each sample's squared x_{t-1} error counts by ||d x_0 / d x_{t-1}||^2 of its step
    (float chains) to the power g. Two limits a user can check: a vanishing power gives the unweighted errors, a large
    one the errors measured on the samples of the heaviest step alone (DDIM, eta 0: the step's noise plays no part).
    The report carries the per-step sensitivity; misuse is named."""
    import math

    from ptq4dm.passes import PassContext, Sensitivity
    from ptq4dm.passes.calibrate import CalibrationSet

    step = _step(tiny_unet)
    res = ptq4dm.quantize(step, calibration=NDTC(n=32), policy=W4, progress=False, pipeline=DEFAULT_PIPELINE)
    cs = res.calibration_set

    def errors(g, cset, **kw):
        ctx = PassContext(options={"calibration_set": cset, "fp_step": step}, progress=False)
        Sensitivity(**{"n": 1000, "batch_size": 16, "weight_bits": 0, "t_weight": g, "t_chains": 8, **kw}).run(
            res.graph, ctx)
        r = ctx.results["sensitivity"]
        return {row["key"]: row["error"] for row in r["rows"]}, r

    plain, _ = errors(0.0, cs)
    tiny, rep = errors(1e-9, cs)
    assert tiny.keys() == plain.keys()
    for k in plain:
        assert tiny[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-12)
    per = torch.tensor(rep["t_weight"]["sensitivity_per_step"], dtype=torch.float64)
    assert per.shape == (step.sampler.S,) and bool((per > 0).all())
    present = cs.step.unique()
    ranked = per[present].sort(descending=True)
    top = int(present[ranked.indices[0]])
    g = math.log(1e15) / math.log(float(ranked.values[0] / ranked.values[1]))   # the other steps at <= 1e-15
    heavy, _ = errors(g, cs)
    m = cs.step == top
    only, _ = errors(0.0, CalibrationSet(cs.x[m], cs.t[m], cs.step[m]))
    for k in plain:   # up to the batches' rounding flips at the quantizers' grid (the subset runs in other batches)
        assert heavy[k] == pytest.approx(only[k], rel=2e-2, abs=1e-12)
    assert max(abs(only[k] - plain[k]) / plain[k] for k in plain if plain[k] > 0) > 0.2   # the weighting changed them
    with pytest.raises(ValueError, match="t_chains"):
        errors(1.0, cs, t_chains=0)
    ctx = PassContext(options={"calibration_set": cs}, progress=False)
    with pytest.raises(ValueError, match=r"needs ctx.options\['fp_step'\]"):
        Sensitivity(n=16, t_weight=1.0, t_chains=4).run(res.graph, ctx)
