"""noise_correct: the PTQD-style affine correction of the UNet's output, fitted on the calibration set
or on the quantized graph's own sampling chains (fit=chains)."""

import pytest
import torch

import ptq4dm
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep, trajectory
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, PassContext, QuantPolicy
from ptq4dm.passes.noise_correct import Capture, NoiseCorrect, unet_output_node

W4 = QuantPolicy(weight_bits=4)


@pytest.fixture(scope="module")
def setup(tiny_unet):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=8)).eval()
    res = ptq4dm.quantize(step, calibration=NDTC(n=32), policy=W4, progress=False, pipeline=DEFAULT_PIPELINE)
    return step, res


def _clone(g):
    import copy

    from ptq4dm.ir.graph import StepGraph

    return StepGraph(copy.deepcopy(g.gm), g.example_inputs, dict(g.meta), g.dynamic_batch)


def _copy(res):
    return _clone(res.graph)


def _outputs_along_chains(graph, step, node_name, chains, seed):
    """Per step: the graph's corrected UNet output and the FP UNet's, on the graph's own chain from seed."""
    node = next(n for n in graph.graph.nodes if n.name == node_name)
    corrected = next(iter(u for u in node.users if u.target == torch.ops.aten.mul.Tensor)).users
    new = next(iter(corrected))
    interp, rows = Capture(graph.gm, node, new), []
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((chains, *step.sample_shape(1)[1:]), generator=gen)
    with torch.no_grad():
        for _, t, x, _ in trajectory(lambda x, t, n: interp.run(x, t, n), step.sampler, x_T, gen):
            rows.append((interp.seen[node], interp.seen[new], step.unet(x, t).sample))
    return rows


def test_chain_fit_removes_the_mean_error_on_the_states_it_was_fitted_on(setup):
    """With one group per step, every row is fitted on its step's chain states and applied to them: run
    again from the same seed, the corrected output's mean per channel equals the FP UNet's at every step
    (to float precision), where the uncorrected output's did not; the gain is PTQD's, in [0.5, 2]."""
    step, res = setup
    g, ctx = _copy(res), PassContext(options={"fp_step": step}, progress=False)
    NoiseCorrect(groups=step.sampler.S, fit="chains", chains=12, chain_seed=7).run(g, ctx)
    r = ctx.results["noise_correct"]
    assert r["fit"] == "chains" and r["groups"] == step.sampler.S and r["samples_per_group"] == [12] * step.sampler.S
    scale = torch.tensor(r["scale"])
    assert bool(((scale >= 0.5 - 1e-6) & (scale <= 2.0 + 1e-6)).all())
    raw_err, fixed_err = 0.0, 0.0
    for q, y, f in _outputs_along_chains(g, step, r["node"], 12, 7):
        dims = [0] + list(range(2, q.dim()))
        raw_err = max(raw_err, float((q - f).mean(dims).abs().max()))
        fixed_err = max(fixed_err, float((y - f).mean(dims).abs().max()))
    assert raw_err > 1e-4
    assert fixed_err < 1e-3 * raw_err + 1e-6


def test_chain_fit_is_seeded_and_deterministic(setup):
    step, res = setup
    tables = []
    for _ in range(2):
        g, ctx = _copy(res), PassContext(options={"fp_step": step}, progress=False)
        NoiseCorrect(groups=4, fit="chains", chains=6, chain_seed=3).run(g, ctx)
        tables.append((g.gm.ptq4dm_nc_scale.clone(), g.gm.ptq4dm_nc_shift.clone()))
    assert torch.equal(tables[0][0], tables[1][0]) and torch.equal(tables[0][1], tables[1][1])
    g, ctx = _copy(res), PassContext(options={"fp_step": step}, progress=False)
    NoiseCorrect(groups=4, fit="chains", chains=6, chain_seed=4).run(g, ctx)
    assert not torch.equal(g.gm.ptq4dm_nc_shift, tables[0][1])


def test_calibration_fit_centres_the_error_on_the_calibration_set(setup):
    """The calibration form: over the calibration set, per group and channel, the corrected output's mean
    is the FP output's (E[y' | y] = y, so the means agree)."""
    step, res = setup
    cs = res.calibration_set
    g, ctx = _copy(res), PassContext(options={"fp_step": step, "calibration_set": cs}, progress=False)
    NoiseCorrect(groups=2, min_samples=1, batch_size=64).run(g, ctx)
    node = unet_output_node(g)
    interp = Capture(g.gm, node)
    table = g.gm.ptq4dm_nc_group_of_t
    sums = torch.zeros(2, 2, dtype=torch.float64)   # (group, [sum of y' - f, count])
    with torch.no_grad():
        for x, t in cs.batches(64):
            interp.run(x, t, torch.zeros_like(x))
            d = (interp.seen[node] - step.unet(x, t).sample).double().mean(list(range(1, x.dim())))
            for gi in (0, 1):
                m = table[t] == gi
                sums[gi] += torch.stack([d[m].sum(), m.sum().double()])
    assert bool((sums[:, 1] > 0).all())
    assert float((sums[:, 0] / sums[:, 1]).abs().max()) < 1e-4


def test_noise_correct_misuse_is_named(setup):
    step, res = setup
    with pytest.raises(ValueError, match="fit must be 'calibration'.*or 'chains'"):
        NoiseCorrect(fit="both").run(_copy(res), PassContext(options={"fp_step": step}, progress=False))
    with pytest.raises(ValueError, match="chains must be >= 1"):
        NoiseCorrect(fit="chains", chains=0).run(_copy(res), PassContext(options={"fp_step": step}, progress=False))
    with pytest.raises(ValueError, match="needs the calibration set"):
        NoiseCorrect().run(_copy(res), PassContext(options={"fp_step": step}, progress=False))
    with pytest.raises(ValueError, match=r"needs the FP step \(fit=chains\)"):
        NoiseCorrect(fit="chains").run(_copy(res), PassContext(options={}, progress=False))
    with pytest.raises(ValueError, match="fit must be"):
        ptq4dm.quantize(step, calibration=NDTC(n=8), policy=W4, progress=False,
                        pipeline=DEFAULT_PIPELINE + ",noise_correct{fit=chain}")


def test_the_artifact_keeps_the_correction(setup, tmp_path):
    """save / load: the rebuilt graph samples exactly what the corrected in-memory graph does, and a file
    whose tables were removed is refused by name."""
    import dataclasses

    from ptq4dm.artifact import load, save
    from ptq4dm.ir.serialize import ArtifactError, load_artifact, save_artifact

    step, res = setup
    g, ctx = _copy(res), PassContext(options={"fp_step": step}, progress=False)
    NoiseCorrect(groups=4, fit="chains", chains=6, chain_seed=3).run(g, ctx)
    assert float((g.gm.ptq4dm_nc_shift).abs().max()) > 0
    corrected = dataclasses.replace(res, graph=g)
    save(corrected, step, tmp_path / "nc.pt2q")
    graph, _, header = load(tmp_path / "nc.pt2q")
    assert header["noise_correct"] == {"groups": 4, "fit": "chains"}
    with torch.no_grad():
        a = ptq4dm.sample(g, step.sampler, step.sample_shape(4), seed=2)
        b = ptq4dm.sample(graph, step.sampler, step.sample_shape(4), seed=2)
        c = ptq4dm.sample(res.graph, step.sampler, step.sample_shape(4), seed=2)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-5)
    tensors, head = load_artifact(tmp_path / "nc.pt2q")
    del tensors["nc_shift"]
    save_artifact(tmp_path / "cut.pt2q", tensors, head)
    with pytest.raises(ArtifactError, match="nc_shift"):
        load(tmp_path / "cut.pt2q")


def test_the_correction_survives_lowering(setup):
    """lower (the triton backend's integer-exact reference ops on the CPU) keeps the correction: the lowered
    corrected graph is as close to the corrected fake-quant graph as the lowered plain graph is to the plain one."""
    from ptq4dm.passes import PassManager

    step, res = setup
    g, ctx = _copy(res), PassContext(options={"fp_step": step}, progress=False)
    NoiseCorrect(groups=4, fit="chains", chains=6, chain_seed=3).run(g, ctx)
    plain = _copy(res)
    low_nc, low_plain = _clone(g), _copy(res)
    for h in (low_nc, low_plain):
        PassManager.from_pipeline("lower{backend=triton}").run(h, PassContext(progress=False))
    x, t = res.calibration_set.x[:4], res.calibration_set.t[:4]
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c, d = low_nc(x, t, n)[0], g(x, t, n)[0], low_plain(x, t, n)[0], plain(x, t, n)[0]
    assert float((b - d).abs().max()) > 1e-4              # the correction moves x_{t-1}
    assert float((a - b).abs().max()) <= 2 * float((c - d).abs().max()) + 1e-5
    assert float((a - c).abs().max()) > 0.5 * float((b - d).abs().max())
