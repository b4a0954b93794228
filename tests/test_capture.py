"""Capture: the exported step graph computes exactly what the eager module computes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ptq4dm.api import capture_step
from ptq4dm.ir.capture import CaptureError, _export_friendly, capture
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.models.unets import build_unet

SAMPLERS = {
    "ddpm-small": dict(kind="ddpm", variance_type="fixed_small", num_inference_steps=50),
    "ddpm-large": dict(kind="ddpm", variance_type="fixed_large", num_inference_steps=1000),
    "ddim-0": dict(kind="ddim", eta=0.0, num_inference_steps=20),
    "ddim-0.5-cos": dict(kind="ddim", eta=0.5, schedule="cosine", num_inference_steps=100),
}
_GRAPHS: dict = {}


def _graph(tiny_unet, name):
    if name not in _GRAPHS:
        kw = dict(SAMPLERS[name])
        step = DiffusionStep(tiny_unet, make_sampler(kw.pop("kind"), **kw)).eval()
        _GRAPHS[name] = (step, capture_step(step))
    return _GRAPHS[name]


@given(name=st.sampled_from(sorted(SAMPLERS)), batch=st.integers(2, 40), seed=st.integers(0, 2**31 - 1))
def test_graph_equals_eager_bit_exact(tiny_unet, name, batch, seed):
    step, graph = _graph(tiny_unet, name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = step.sampler.timesteps[torch.randint(0, step.sampler.S, (batch,), generator=g)]
    noise = torch.randn(batch, 1, 8, 8, generator=g)
    with torch.no_grad():
        got, want = graph(x, t, noise), step(x, t, noise)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_learned_variance_step_captures(tiny_unet):
    unet = build_unet({**build_unet("tiny").config, "out_channels": 2}).eval()
    step = DiffusionStep(unet, make_sampler("ddpm", variance_type="learned_range", num_inference_steps=10)).eval()
    graph = capture_step(step, batch=3)
    x, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([900, 400, 0])
    with torch.no_grad():
        for a, b in zip(graph(x, t, noise), step(x, t, noise)):
            assert torch.equal(a, b)


def test_static_batch1_path(tiny_unet):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=10)).eval()
    graph = capture_step(step, batch=1, dynamic_batch=False)
    x, noise, t = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), torch.tensor([500])
    with torch.no_grad():
        for a, b in zip(graph(x, t, noise), step(x, t, noise)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch >= 2"):
        capture_step(step, batch=1, dynamic_batch=True)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_cifar10_ddim_capture_exact_and_named(cifar_unet):
    assert sum(p.numel() for p in cifar_unet.parameters()) == 35_746_307
    step = DiffusionStep(cifar_unet, make_sampler("ddpm", num_inference_steps=100)).eval()
    graph = capture_step(step)
    counts = graph.op_counts()
    assert counts["aten.conv2d.default"] == 65 and counts["aten.linear.default"] == 48
    assert counts["aten.scaled_dot_product_attention.default"] == 6
    for batch in (2, 7):
        x, noise = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)
        t = torch.randint(0, 1000, (batch,))
        with torch.no_grad():
            for a, b in zip(graph(x, t, noise), step(x, t, noise)):
                assert torch.equal(a, b)
    # batch >= 64: eager diffusers calls .contiguous() there (a layout change, so a different float
    # summation order); the graph equals the capture-time forward exactly, eager within rounding.
    x, noise, t = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32), torch.randint(0, 1000, (64,))
    with torch.no_grad():
        got = graph(x, t, noise)
        with _export_friendly(step):
            want = step(x, t, noise)
        eager = step(x, t, noise)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, eager))
    dump = graph.dump()
    outs = graph.named_outputs()
    for role in ("prev_sample", "mean", "variance"):
        assert f"{role}=%{outs[role].name}" in dump
        assert f"output={role}" in dump or outs[role] is outs["prev_sample"]
    G = graph.to_networkx()
    assert G.number_of_nodes() == len(graph.graph.nodes)
    assert all(G.nodes[n]["role"] in ("input", "unet", "sampler", None) for n in G.nodes)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # branch on a tensor value: not traceable
            return y
        return -y


class _BadStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.unet = nn.Sequential(nn.Identity(), _DataDependent())

    def forward(self, x, t, noise):
        out = self.unet(x)
        return out, out, out


def test_untraceable_model_names_construct_and_module():
    step = _BadStep()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(CaptureError) as e:
        capture(step, (x, torch.tensor([1, 2]), x))
    msg = str(e.value)
    assert "data-dependent" in msg and "unet.1" in msg
