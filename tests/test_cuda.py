"""The Triton int8 kernels and the lowered graph on a GPU: what the interpreter tests
(tests/test_lowering.py, on the CPU) cannot show. The autotuned launches (every block shape of
``TUNE_CONFIGS`` that wins somewhere) and the fixed 16-blocks launch at UNet-sized shapes against
the integer-exact reference; the lowered graph, eager and under torch.compile (Inductor traces
into the Triton launches), against the fake-quant graph. Skipped without CUDA: the CPU path of
the same ops is tests/test_lowering.py."""

import copy

import pytest
import torch

import ptq4dm
from ptq4dm.backends import reference as R
from ptq4dm.backends import triton_kernels as TK
from ptq4dm.ir.graph import StepGraph
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import NDTC

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU); the CPU path is "
                                 "tests/test_lowering.py"),
              pytest.mark.skipif(not TK.HAVE_TRITON, reason="needs triton")]


def _codes(shape, g, lo=-128):
    return torch.randint(lo, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("block", [None, 16], ids=["autotuned", "blocks16"])
@pytest.mark.parametrize("b,c,h,oc,ks,stride,per_sample", [
    (3, 128, 16, 128, 3, 1, True),    # a resnet conv, per-timestep ranges
    (2, 256, 8, 256, 3, 2, False),    # a downsample
    (5, 96, 7, 40, 1, 1, True),       # a 1x1 skip conv, odd sizes
    (1, 3, 32, 128, 3, 1, False),     # conv_in: K = 27
])
def test_conv_kernel_matches_reference_on_cuda(b, c, h, oc, ks, stride, per_sample, block):
    g = torch.Generator().manual_seed(b * 1000 + c)
    x, wq = _codes((b, c, h, h), g), _codes((oc, c, ks, ks), g, -127)
    zp = torch.randint(-128, 128, (b,) if per_sample else (), generator=g).int()
    sx = torch.rand(zp.shape, generator=g) + 0.01
    sw, bias, pad = torch.rand(oc, generator=g) * 0.01, torch.randn(oc, generator=g), ks // 2
    wp = R.pack_conv_weight(wq).T.contiguous()
    oh = (h + 2 * pad - ks) // stride + 1
    res = torch.randn(b, oc, oh, oh, generator=g)
    dev = torch.device("cuda")
    xc = x.to(dev).contiguous(memory_format=torch.channels_last)
    out, acc = TK.int8_conv2d(xc, zp.to(dev), sx.to(dev), wp.to(dev), wp.int().sum(0).to(dev), sw.to(dev), bias.to(dev),
                              ks, ks, stride, pad, residual=res.to(dev), return_acc=True, block_m=block, block_n=block,
                              block_k=block)
    want_acc, _, _ = R.int8_conv2d_acc(x.permute(0, 2, 3, 1), zp, wq, stride, pad)
    assert torch.equal(acc.cpu(), want_acc)      # exact int32 accumulation
    want = R.conv2d_q(x, sx, zp, wp, wp.int().sum(0), sw, bias, res, ks, ks, stride, pad)
    assert torch.allclose(out.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 16], ids=["autotuned", "blocks16"])
@pytest.mark.parametrize("m,k,n", [(1, 128, 512), (300, 256, 256), (4096, 256, 768)])
def test_gemm_kernel_matches_reference_on_cuda(m, k, n, block):
    g = torch.Generator().manual_seed(m + k + n)
    xq, wq = _codes((m, k), g), _codes((n, k), g, -127)
    zp, sx = torch.randint(-128, 128, (), generator=g).int(), torch.rand((), generator=g) + 0.01
    sw, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    dev = torch.device("cuda")
    wp = wq.T.contiguous()
    out, acc = TK.int8_gemm(xq.to(dev), zp.to(dev), sx.to(dev), wp.to(dev), wq.int().sum(1).to(dev), sw.to(dev),
                            bias.to(dev), return_acc=True, block_m=block, block_n=block, block_k=block)
    want_acc = R.int8_linear_acc(xq, zp, wq, m)
    assert torch.equal(acc.cpu(), want_acc)
    assert torch.allclose(out.cpu(), R.epilogue(want_acc, sx, sw, bias, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 16], ids=["autotuned", "blocks16"])
def test_bmm_kernel_matches_reference_on_cuda(block):
    g = torch.Generator().manual_seed(7)
    a, b = _codes((4, 1, 256, 64), g), _codes((4, 1, 64, 256), g)
    za, zb = torch.randint(-128, 128, (4,), generator=g).int(), torch.randint(-128, 128, (4,), generator=g).int()
    sa, sb = torch.rand(4, generator=g) + 0.01, torch.rand(4, generator=g) + 0.01
    dev = torch.device("cuda")
    got = TK.int8_bmm(a.to(dev), za.to(dev), sa.to(dev), b.to(dev), zb.to(dev), sb.to(dev), block_m=block,
                      block_n=block, block_k=block)
    assert torch.allclose(got.cpu(), R.matmul_q(a, sa, za, b, sb, zb), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_lowered_graph_on_cuda_equals_fakequant_graph(tiny_unet, compiled):
    """lower's default backend on a CUDA graph is Triton; eager and compiled, x_{t-1} is within
    one step of the output quantizer of the fake-quant graph's."""
    dev = torch.device("cuda")
    step = DiffusionStep(copy.deepcopy(tiny_unet).to(dev), make_sampler("ddim", num_inference_steps=10)).eval()
    graph = ptq4dm.capture_step(step, batch=2, device=dev)
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False, graph=graph)
    fq = StepGraph(copy.deepcopy(r.graph.gm), r.graph.example_inputs, dict(r.graph.meta), True)
    info = ptq4dm.lower(r.graph)
    assert info["backend"] == "triton" and info["counts"]["qconv2d"] > 0
    run = torch.compile(r.graph.gm) if compiled else r.graph
    step_q = max(q.scale.max() for k, q in r.graph.meta["qparams"].items() if k.endswith(":out"))
    cs = r.calibration_set
    for batch in (2, 4):
        x, t = cs.x[:batch].to(dev), cs.t[:batch].to(dev)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch)).to(dev)
        with torch.no_grad():
            low, ref = run(x, t, noise), fq(x, t, noise)
        for a, b in zip(low, ref):
            assert a.is_cuda and torch.isfinite(a).all()
            assert (a.float() - b.float()).abs().max() <= 1.01 * step_q.to(dev) + 1e-5
