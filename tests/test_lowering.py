"""int8 kernels and the lower pass on the CPU: Triton under TRITON_INTERPRET=1 against the
integer-exact reference, and the lowered graph against the fake-quant graph."""

import copy
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ptq4dm
from ptq4dm.backends import reference as R
from ptq4dm.ir.graph import StepGraph
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import NDTC, PassContext, PassManager, QuantPolicy
from ptq4dm.passes.lower import Lower

from ptq4dm.backends import triton_kernels  # imports without triton (HAVE_TRITON = False)
needs_interpreter = pytest.mark.skipif(
    not (triton_kernels.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with TRITON_INTERPRET=1 (set by tests/conftest.py) to run kernels on the CPU")


def _codes(shape, g, lo=-128):
    return torch.randint(lo, 128, shape, generator=g, dtype=torch.int8)


@needs_interpreter
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 24), per_sample=st.booleans(),
       bias=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_int8_gemm_kernel_matches_reference(m, k, n, per_sample, bias, residual, seed):
    g = torch.Generator().manual_seed(seed)
    xq, wq = _codes((m, k), g), _codes((n, k), g, -127)
    if per_sample and m % 2 == 0:
        zp, sx, rps = torch.randint(-128, 128, (2,), generator=g).int(), torch.rand(2, generator=g) + 0.01, m // 2
    else:
        zp, sx, rps = torch.randint(-128, 128, (), generator=g).int(), torch.rand((), generator=g) + 0.01, m
    sw, b = torch.rand(n, generator=g) * 0.01, (torch.randn(n, generator=g) if bias else None)
    r = torch.randn(n, m, generator=g).T if residual else None   # a strided (non-contiguous) residual
    out, acc = triton_kernels.int8_gemm(xq, zp, sx, wq.T.contiguous(), wq.int().sum(1), sw, b,
                                        rows_per_sample=rps, residual=r, return_acc=True)
    want_acc = R.int8_linear_acc(xq, zp, wq, rps)
    assert torch.equal(acc, want_acc)                      # exact int32 accumulation
    want = R.epilogue(want_acc, sx, sw, b, rps) + (r if residual else 0)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)  # epilogue within float rounding
    assert torch.allclose(R.linear_q(xq, sx, zp, wq.T, wq.int().sum(1), sw, b, r), want, rtol=1e-6, atol=1e-6)


@needs_interpreter
@given(b=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(1, 7), w=st.integers(1, 7), oc=st.integers(1, 6),
       ks=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]),
       per_sample=st.booleans(), channels_last=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_int8_conv_kernel_matches_reference(b, c, h, w, oc, ks, stride, pad, per_sample, channels_last, residual, seed):
    if h + 2 * pad < ks or w + 2 * pad < ks:
        return
    g = torch.Generator().manual_seed(seed)
    x, wq = _codes((b, c, h, w), g), _codes((oc, c, ks, ks), g, -127)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if per_sample:
        zp, sx = torch.randint(-128, 128, (b,), generator=g).int(), torch.rand(b, generator=g) + 0.01
    else:
        zp, sx = torch.randint(-128, 128, (), generator=g).int(), torch.rand((), generator=g) + 0.01
    sw, bias = torch.rand(oc, generator=g) * 0.01, torch.randn(oc, generator=g)
    wp = R.pack_conv_weight(wq).T.contiguous()
    oh, ow = (h + 2 * pad - ks) // stride + 1, (w + 2 * pad - ks) // stride + 1
    r = torch.randn(b, oc, oh, ow, generator=g) if residual else None   # NCHW residual, channels-last output
    out, acc = triton_kernels.int8_conv2d(x, zp, sx, wp, wp.int().sum(0), sw, bias, ks, ks, stride, pad,
                                          residual=r, return_acc=True, block_k=8)
    want_acc, _, _ = R.int8_conv2d_acc(x.permute(0, 2, 3, 1), zp, wq, stride, pad)
    assert torch.equal(acc, want_acc)
    want = R.conv2d_q(x, sx, zp, wp, wp.int().sum(0), sw, bias, r, ks, ks, stride, pad)
    assert out.shape == want.shape == (b, oc, oh, ow)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)


@needs_interpreter
@given(b=st.integers(1, 3), heads=st.integers(1, 2), m=st.integers(1, 20), k=st.integers(1, 40), n=st.integers(1, 20),
       per_sample=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_int8_bmm_kernel_matches_reference(b, heads, m, k, n, per_sample, seed):
    """Attention matmuls: both operands int8 activations with their own zero points."""
    g = torch.Generator().manual_seed(seed)
    aq, bq = _codes((b, heads, m, k), g), _codes((b, heads, k, n), g)
    shape = (b,) if per_sample else ()
    za, zb = (torch.randint(-128, 128, shape, generator=g).int() for _ in range(2))
    sa, sb = (torch.rand(shape, generator=g) + 0.01 for _ in range(2))
    out, acc = triton_kernels.int8_bmm(aq, za, sa, bq, zb, sb, return_acc=True)
    want_acc = R.int8_matmul_acc(aq, za, bq, zb)
    assert torch.equal(acc, want_acc)
    scale = (sa * sb).reshape(-1, 1, 1, 1) if per_sample else sa * sb
    assert torch.allclose(out, want_acc.float() * scale, rtol=1e-6, atol=1e-6)


def _check_codes(got: torch.Tensor, y: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    """Kernel codes vs ``reference.requantize(y)``: equal wherever y / s is not within float
    rounding of a .5 boundary (there the kernel's and the reference's float32 epilogues may
    round apart by one code)."""
    want = R.requantize(y, s, z)
    assert got.dtype == torch.int8 and got.shape == want.shape
    v = (y.float() * (1.0 / R._per_sample(s, y.dim()))).abs()
    near = ((v - v.floor()) - 0.5).abs() < 1e-3 * (1 + v)
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and torch.equal(got[~near], want[~near])


@needs_interpreter
@given(m=st.integers(1, 30), k=st.integers(1, 40), n=st.integers(1, 20), per_sample=st.booleans(),
       residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_requantizing_epilogue_gemm(m, k, n, per_sample, residual, seed):
    """qlinear with out_scale / out_zp returns the codes its consumer's quantize would produce."""
    g = torch.Generator().manual_seed(seed)
    xq, wq = _codes((m, k), g), _codes((n, k), g, -127)
    B = 2 if per_sample and m % 2 == 0 else 1
    shape = (B,) if B == 2 else ()
    zp, sx = torch.randint(-128, 128, shape, generator=g).int(), torch.rand(shape, generator=g) + 0.01
    sw, b = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g) if residual else None
    wp = wq.T.contiguous()
    y = R.linear_q(xq, sx, zp, wp, wq.int().sum(1), sw, b, r)
    s_out = (y.abs().amax() / 100 + 1e-3) * (torch.rand(shape, generator=g) + 0.5)   # some codes clamp
    z_out = torch.randint(-20, 21, shape, generator=g).int()
    got = triton_kernels.int8_gemm(xq, zp, sx, wp, wq.int().sum(1), sw, b, rows_per_sample=m // B, residual=r,
                                   out_scale=s_out, out_zp=z_out)
    _check_codes(got, y, s_out.repeat_interleave(m // B) if B == 2 else s_out,
                 z_out.repeat_interleave(m // B) if B == 2 else z_out)
    # the registered op on the reference (CPU) path, with the graph's (B, L, K) layout
    x3, r3 = xq.reshape(B, m // B, k), (r.reshape(B, m // B, n) if residual else None)
    op = torch.ops.ptq4dm.qlinear(x3, sx, zp, wp, wq.int().sum(1), sw, b, r3, torch.float32, s_out, z_out)
    assert torch.equal(op, R.requantize(y.reshape(B, m // B, n), s_out, z_out))


@needs_interpreter
def test_requantizing_epilogue_rounds_half_to_even():
    """Exact .5 cases (y = odd / 2, scale 1): the kernel rounds them like torch.round (to even),
    not away from zero or by truncation."""
    xq = torch.arange(-60, 60, dtype=torch.int8).reshape(-1, 1)
    wq = torch.ones(1, 1, dtype=torch.int8)
    one, zero = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    got = triton_kernels.int8_gemm(xq, zero, one, wq, wq.int().sum(0), torch.tensor([0.5]), out_scale=one, out_zp=zero)
    want = torch.round(xq.float() * 0.5).to(torch.int8)
    assert torch.equal(got, want) and (xq % 2 != 0).any()


@needs_interpreter
@given(b=st.integers(1, 2), c=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), oc=st.integers(1, 5),
       ks=st.sampled_from([1, 3]), per_sample=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_requantizing_epilogue_conv(b, c, h, w, oc, ks, per_sample, seed):
    if h + 2 < ks or w + 2 < ks:
        return
    g = torch.Generator().manual_seed(seed)
    x, wq = _codes((b, c, h, w), g).contiguous(memory_format=torch.channels_last), _codes((oc, c, ks, ks), g, -127)
    shape = (b,) if per_sample else ()
    zp, sx = torch.randint(-128, 128, shape, generator=g).int(), torch.rand(shape, generator=g) + 0.01
    sw, bias = torch.rand(oc, generator=g) * 0.01, torch.randn(oc, generator=g)
    wp = R.pack_conv_weight(wq).T.contiguous()
    y = R.conv2d_q(x, sx, zp, wp, wp.int().sum(0), sw, bias, None, ks, ks, 1, 1)
    s_out = (y.abs().amax() / 100 + 1e-3) * (torch.rand(shape, generator=g) + 0.5)
    z_out = torch.randint(-20, 21, shape, generator=g).int()
    got = triton_kernels.int8_conv2d(x, zp, sx, wp, wp.int().sum(0), sw, bias, ks, ks, 1, 1,
                                     out_scale=s_out, out_zp=z_out, block_k=8)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _check_codes(got, y, s_out, z_out)


@given(seed=st.integers(0, 2**31 - 1), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]))
def test_reference_conv_equals_float_conv_of_dequantized_values(seed, stride, pad):
    """The oracle itself: int8 conv + epilogue == float conv on the dequantized operands."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 5, generator=g)
    s, z = torch.tensor(0.03), torch.tensor(7, dtype=torch.int32)
    wq, ws, bias = _codes((4, 3, 3, 3), g, -127), torch.rand(4, generator=g) * 0.01, torch.randn(4, generator=g)
    got = R.int8_conv2d(x, s, z, wq, ws, bias, stride, pad)
    xd = (R.quantize_act(x, s, z).float() - 7) * 0.03
    want = torch.nn.functional.conv2d(xd, wq.float() * ws[:, None, None, None], bias, stride=stride, padding=pad)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 5])
def test_lowered_graph_equals_fakequant_graph(tiny_unet, groups):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=10)).eval()
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False, policy=QuantPolicy(timestep_groups=groups))
    fq = StepGraph(copy.deepcopy(r.graph.gm), r.graph.example_inputs, dict(r.graph.meta), True)
    unfused = StepGraph(copy.deepcopy(r.graph.gm), r.graph.example_inputs, dict(r.graph.meta), True)
    ctx = PassContext(progress=False)
    PassManager.from_pipeline("lower{backend=triton}").run(r.graph, ctx)
    PassManager([Lower(backend="triton", fuse_requant=False)]).run(unfused, PassContext(progress=False))
    counts = ctx.results["lower"]["counts"]
    # q, k, v of every attention go to the int8 matmuls as int8 straight from the linear's epilogue
    assert counts["requant_fused"] == 3 * r.report.counts["attn_matmul"] // 2 > 0
    assert {k: counts[k] for k in ("qconv2d", "qlinear", "qmatmul")} == {
        "qconv2d": r.report.counts["conv"], "qlinear": r.report.counts["linear"], "qmatmul": r.report.counts["attn_matmul"]}
    assert counts["residual_fused"] > 0   # the resnet blocks' skip adds went into the conv epilogue
    assert not any(n.target is torch.ops.ptq4dm.fake_quant.default and any(
        u.target in (torch.ops.ptq4dm.qconv2d.default, torch.ops.ptq4dm.qlinear.default) for u in n.users)
        for n in r.graph.graph.nodes)   # the int8 ops read int8 codes, not fake-quantized floats
    assert not any(n.target is torch.ops.aten.conv2d.default for n in r.graph.graph.nodes)
    assert any(b.dtype == torch.int8 for b in r.graph.gm.buffers())
    cs = r.calibration_set
    for batch in (1, 4):  # batch 1 through the dynamic graph is not allowed; use repeat for it
        x, t = cs.x[:max(batch, 2)], cs.t[:max(batch, 2)]
        n = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            low, ref, low_unfused = r.graph(x, t, n), fq(x, t, n), unfused(x, t, n)
        for a, b in zip(low, low_unfused):
            assert torch.equal(a, b)   # the requantizing epilogue rounds exactly as the quantize it replaced
        for a, b in zip(low, ref):
            # the output quantizer's step bounds the difference (rounding can flip one code)
            assert (a - b).abs().max() <= 1.01 * r.graph.meta["qparams"][
                next(k for k in r.graph.meta["qparams"] if k.endswith(":out"))].scale.max() + 1e-6


def test_batch1_static_graph_lowers_and_runs(tiny_unet):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=10)).eval()
    graph = ptq4dm.capture_step(step, batch=1, dynamic_batch=False)
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False, graph=graph)
    PassManager.from_pipeline("lower{backend=triton}").run(r.graph, PassContext(progress=False))
    x, t, n = r.calibration_set.x[:1], r.calibration_set.t[:1], torch.zeros(1, 1, 8, 8)
    with torch.no_grad():
        out = r.graph(x, t, n)
    assert out.prev_sample.shape == (1, 1, 8, 8) and torch.isfinite(out.prev_sample).all()


@needs_interpreter
def test_registered_ops_launch_the_kernels_and_trace(monkeypatch):
    """The ops are torch.library.triton_ops. Eager calls launch the Triton kernels (CPU tensors
    reach them here through PTQ4DM_TRITON_ON_CPU + the interpreter); traced calls (torch.compile
    with aot_eager, fullgraph) decompose the op into its body: on the CPU the reference's ATen ops.
    Tracing the CUDA branch into Triton launches needs a GPU (the interpreter's kernels cannot be
    wrapped), so it is not checked here."""
    g = torch.Generator().manual_seed(0)
    xq = _codes((2, 3, 5, 4), g).contiguous(memory_format=torch.channels_last)
    wq = _codes((6, 3, 3, 3), g, -127)
    wp = R.pack_conv_weight(wq).T.contiguous()
    zp, sx = torch.tensor([3, -7], dtype=torch.int32), torch.tensor([0.02, 0.05])
    sw, bias, res = torch.rand(6, generator=g) * 0.01, torch.randn(6, generator=g), torch.randn(2, 6, 5, 4, generator=g)
    args = (xq, sx, zp, wp, wp.int().sum(0), sw, bias, res, 3, 3, 1, 1, torch.float32)
    want = R.conv2d_q(*args[:-1])
    conv = torch.ops.ptq4dm.qconv2d.default
    traced = torch.compile(lambda *a: conv(*a) * 1.0, backend="aot_eager", fullgraph=True)(*args)
    monkeypatch.setenv("PTQ4DM_TRITON_ON_CPU", "1")
    eager = conv(*args)
    for got in (eager, traced):
        assert got.shape == (2, 6, 5, 4) and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    a, b = _codes((2, 2, 5, 16), g), _codes((2, 2, 16, 3), g)
    za, zb = torch.tensor([1, -2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    sa, sb = torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.01])
    got = torch.ops.ptq4dm.qmatmul(a, sa, za, b, sb, zb, torch.float32)
    assert torch.allclose(got, R.matmul_q(a, sa, za, b, sb, zb), rtol=1e-6, atol=1e-6)


def test_inductor_fuses_groupnorm_silu_quantize_into_one_kernel():
    """The activation quantizer is a composite op, so Inductor fuses it into its producer: the
    lowered graph's GroupNorm -> SiLU -> quantize -> channels-last copy (what a conv reads)
    compiles to one kernel whose only activation-sized buffer is the int8 output (no float
    SiLU output is written). Checked on Inductor's CPU code; the GPU path generates Triton
    from the same fused graph."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    gn = torch.nn.GroupNorm(4, 16).eval()
    s, z = torch.tensor(0.02), torch.tensor(3, dtype=torch.int32)

    def f(x):
        y = torch.nn.functional.silu(gn(x))
        return torch.ops.ptq4dm.quantize(y, s, z, -128, 127, None).clone(memory_format=torch.channels_last)

    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, codes = run_and_get_code(torch.compile(f, fullgraph=True), x)
        want = f(x)
    assert got.dtype == torch.int8 and got.is_contiguous(memory_format=torch.channels_last)
    assert (got.int() - want.int()).abs().max() <= 1   # same codes up to float rounding of the norm
    src = "\n".join(codes)
    kernels = set(re.findall(r"cpp_fused\w*", src))
    assert len(kernels) == 1 and all(op in next(iter(kernels)) for op in ("group_norm", "silu", "round"))
    bufs = re.findall(r"empty_strided_cpu\(\(([\d, ]+)\), \([\d, ]+\), torch\.(\w+)\)", src)
    full = [dtype for shape, dtype in bufs if math.prod(int(d) for d in shape.split(",") if d.strip()) == x.numel()]
    assert full == ["int8"], bufs


@needs_interpreter
def test_kernels_write_bf16_output():
    """out_dtype=bfloat16 (a bf16 graph around the int8 ops): the epilogue runs in float32 and
    converts once to bf16, so the result is within one bf16 step (2**-7 relative) of the
    reference's float32 value. (On a GPU the conversion rounds to nearest; Triton's CPU
    interpreter truncates, even when asked for round-to-nearest, hence one step, not half.)"""
    g = torch.Generator().manual_seed(3)
    xq, wq = _codes((2, 5, 6, 6), g).contiguous(memory_format=torch.channels_last), _codes((7, 5, 3, 3), g, -127)
    zp, sx = torch.tensor(4, dtype=torch.int32), torch.tensor(0.03)
    sw, bias = torch.rand(7, generator=g) * 0.01, torch.randn(7, generator=g)
    r = torch.randn(2, 7, 6, 6, generator=g).to(torch.bfloat16)
    wp = R.pack_conv_weight(wq).T.contiguous()
    got = triton_kernels.int8_conv2d(xq, zp, sx, wp, wp.int().sum(0), sw, bias, 3, 3, 1, 1, residual=r,
                                     out_dtype=torch.bfloat16, block_k=8)
    want = R.conv2d_q(xq, sx, zp, wp, wp.int().sum(0), sw, bias, r, 3, 3, 1, 1)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-6)
    x2, w2 = _codes((9, 20), g), _codes((6, 20), g, -127)
    got = triton_kernels.int8_gemm(x2, zp, sx, w2.T.contiguous(), w2.int().sum(1), sw[:6], bias[:6], out_dtype=torch.bfloat16)
    want = R.linear_q(x2, sx, zp, w2.T.contiguous(), w2.int().sum(1), sw[:6], bias[:6])
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-6)


def test_split_cat_quantizes_each_part_and_lowers_one_conv_per_part(tiny_unet):
    """QuantPolicy(split_cat=True): a skip `cat` read by a GroupNorm and a conv gets a copy for the
    conv whose parts carry their own quantizers (the GroupNorm keeps reading float values); lower
    splits that conv into one int8 conv per part (weight codes sliced, the adds fused as
    residuals) on both backends, and the lowered graph computes the fake-quant graph's values."""
    aten = torch.ops.aten
    FQ = torch.ops.ptq4dm.fake_quant.default
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=10)).eval()
    r = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), progress=False,
                        policy=QuantPolicy(split_cat=True))
    cats = [n for n in r.graph.graph.nodes if n.target is aten.cat.default and
            any(u.target is aten.group_norm.default for u in n.users)]
    own = [n for n in r.graph.graph.nodes if n.target is aten.cat.default and
           all(isinstance(a, torch.fx.Node) and a.target is FQ for a in n.args[0])]
    assert len(cats) == len(own) > 0
    assert not any(a.target is FQ for c in cats for a in c.args[0])   # GroupNorm reads the float cat
    assert all([u.target for u in c.users] == [aten.conv2d.default] for c in own)
    fq = StepGraph(copy.deepcopy(r.graph.gm), r.graph.example_inputs, dict(r.graph.meta), True)
    x86 = StepGraph(copy.deepcopy(r.graph.gm), r.graph.example_inputs, dict(r.graph.meta), True)
    ctx = PassContext(progress=False)
    PassManager.from_pipeline("lower{backend=triton}").run(r.graph, ctx)
    info = ctx.results["lower"]
    assert len(info["split_cat"]) == len(own) and not info["kept"]
    parts = sum(len(c.args[0]) for c in own)
    assert info["counts"]["qconv2d"] == r.report.counts["conv"] - len(own) + parts
    assert not any(n.target is aten.conv2d.default for n in r.graph.graph.nodes)
    cs = r.calibration_set
    x, t = cs.x[:4], cs.t[:4]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out_step = max(float(q.scale.max()) for k, q in r.graph.meta["qparams"].items() if k.endswith(":out"))
    with torch.no_grad():
        for a, b in zip(r.graph(x, t, noise), fq(x, t, noise)):
            assert (a - b).abs().max() <= 1.01 * out_step + 1e-6
    ctx = PassContext(progress=False)
    PassManager.from_pipeline("lower{backend=x86,min_k=1,min_n=1}").run(x86, ctx)
    assert len(ctx.results["lower"]["split_cat"]) == len(own)
    assert ctx.results["lower"]["counts"]["qconv2d"] == info["counts"]["qconv2d"]
