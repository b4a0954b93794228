"""chain_gains: the low-bit weights' per-channel scales fitted against short unrolled float chains."""

import pytest
import torch

import ptq4dm
from ptq4dm.ir.quant import fake_quant
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import DEFAULT_PIPELINE, NDTC, PassContext, QuantPolicy
from ptq4dm.passes.chain_gains import ChainGains
from ptq4dm.passes.observe import QTENSOR

W4 = QuantPolicy(weight_bits=4)
CG = ",chain_gains{iters=20,chains=8,batch_size=4,steps=0.5,unroll=2,lr=0.01}"


def _weights(graph):
    """{key: (weight buffer, qparams)} of a fake-quantized graph."""
    gm, qps = graph.gm, graph.meta["qparams"]
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    return {n.meta[QTENSOR].key: (tensors[str(n.target)], qps[n.meta[QTENSOR].key])
            for n in graph.graph.nodes if n.op == "get_attr" and "ptq4dm.float_weight" in n.meta}


def _codes(w, qp):
    s = qp.scale.reshape([-1] + [1] * (w.dim() - 1))
    return w / s


@pytest.fixture(scope="module")
def pair(tiny_unet):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=8)).eval()
    kw = dict(calibration=NDTC(n=16), policy=W4, progress=False)
    return step, ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE, **kw), ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + CG, **kw)


def test_the_gains_keep_the_codes_and_bring_the_held_out_chains_closer_to_float(pair):
    """Only each output channel's scale moves: the weights stay on their (new) grid with the very codes they had,
    some scales changed, and the held-out chains' unrolled distance from the float chain fell (the pass keeps
    its gains only then)."""
    step, plain, cg = pair
    r = cg.report.chain_gains
    assert r["kept"] and r["held_after"] < r["held_before"], r
    assert r["weights"] == len(_weights(cg.graph)) and r["held_chains"] == 2 and r["start_steps"] == 4
    before, after = _weights(plain.graph), _weights(cg.graph)
    moved = 0
    for key, (w, qp) in after.items():
        w0, qp0 = before[key]
        assert torch.equal(fake_quant(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis), w), key
        torch.testing.assert_close(_codes(w, qp), _codes(w0, qp0), rtol=0, atol=1e-4)
        moved += int((qp.scale != qp0.scale).sum())
    assert moved > 0


def test_the_artifact_stores_the_gained_scales(pair, tmp_path):
    step, _, cg = pair
    from ptq4dm import artifact

    path = tmp_path / "cg.ptq4dm.safetensors"
    artifact.save(cg, step, path)
    graph, _, _ = artifact.load(path, expect_fp_weights=step.unet)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(step.sample_shape(4), generator=g)
    t = step.sampler.timesteps[torch.randint(0, step.sampler.S, (4,), generator=g)]
    with torch.no_grad():
        torch.testing.assert_close(graph(x, t, torch.zeros_like(x))[0], cg.graph(x, t, torch.zeros_like(x))[0],
                                   rtol=0, atol=1e-5)


def test_chain_gains_names_its_misuse(pair):
    step, plain, _ = pair
    with pytest.raises(ValueError, match="fp_step"):
        ChainGains().run(plain.graph, PassContext(options={}))
    with pytest.raises(ValueError, match="steps in"):
        ChainGains(steps=0).run(plain.graph, PassContext(options={"fp_step": step}))
    with pytest.raises(ValueError, match="at most 4 bits"):   # an 8-bit graph: no 4-bit weight to gain
        ptq4dm.quantize(step, pipeline=DEFAULT_PIPELINE + ",chain_gains", calibration=NDTC(n=8), progress=False)
