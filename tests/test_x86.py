"""The x86 CPU backend (lower{backend=x86} + Inductor/oneDNN int8): the compiled graph computes
what the fake-quant graph simulates, and it really runs the oneDNN int8 kernels.

Each example compiles a graph with Inductor (seconds), so the examples are few and small."""

import copy
import re
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptq4dm
from ptq4dm.backends.x86 import compiled_code, has_bf16, has_vnni, int8_kernel_calls
from ptq4dm.passes import NDTC, QuantPolicy


class _Config(dict):
    __getattr__ = dict.__getitem__   # diffusers-style: config.in_channels and dict(config)


class OneLayer(torch.nn.Module):
    """A 'UNet' that is one conv (or one linear over the channels) between SiLUs: the smallest
    step graph with a quantized input, a quantized weight and the sampler's output quantizers."""

    def __init__(self, cin, cout, size, kind, k=3, stride=1, seed=0):
        super().__init__()
        self.config = _Config(in_channels=cin, out_channels=cin, sample_size=size)
        self.kind, self.cout = kind, cout
        # its own seed: the weights do not depend on which tests ran before in this worker (pytest-xdist)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.layer = (torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2) if kind == "conv"
                          else torch.nn.Linear(cin, cout))
            self.back = torch.nn.Conv2d(cout, cin, 1)   # back to the sample's channels (kept float: a 1x1 from few channels)

    def forward(self, x, t):
        h = torch.nn.functional.silu(x + t[:, None, None, None].float() / 1000)
        if self.kind == "conv":
            h = self.layer(h)
        else:
            h = self.layer(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = torch.nn.functional.silu(h)
        if h.shape[-1] != x.shape[-1]:
            h = torch.nn.functional.interpolate(h, size=x.shape[-2:])
        return self.back(h)


def _quantized(layer, batch):
    torch.manual_seed(0)
    step = ptq4dm.DiffusionStep(layer.eval(), ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    graph = ptq4dm.capture_step(step, batch=batch, dynamic_batch=batch > 1)
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16, batch_size=16), policy=QuantPolicy(), progress=False, graph=graph)
    return step, res


def _inputs(step, batch, seed):
    g = torch.Generator().manual_seed(seed)
    shape = step.sample_shape(batch)
    return (torch.randn(shape, generator=g) * 2, step.sampler.timesteps[torch.randint(0, 5, (batch,), generator=g)],
            torch.randn(shape, generator=g))


def _out_steps(res):
    """The output quantizers' step sizes (scale), by output name (DDIM with eta 0: the mean is
    x_{t-1}, one quantizer)."""
    steps = {t.role: t.scale for t in res.report.tensors if t.role in ("prev_sample", "mean", "variance")}
    steps.setdefault("mean", steps["prev_sample"])
    return steps


@settings(max_examples=3)
@given(kind=st.sampled_from(["conv", "linear"]), cin=st.integers(32, 48), cout=st.integers(16, 48),
       size=st.sampled_from([6, 8]), stride=st.sampled_from([1, 2]), batch=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_compiled_int8_graph_equals_fake_quant_within_one_output_step(kind, cin, cout, size, stride, batch, seed):
    """Over conv / linear shapes, batch 1 (static) and a dynamic batch (two sizes through one
    compiled graph): the Inductor-compiled int8 graph gives x_{t-1} and the mean within one step
    of their output quantizers of the graph it was lowered from, and the graph in PT2E form
    (before compiling) with 8-bit weights is the fake-quant graph's arithmetic exactly."""
    layer = OneLayer(cin, cout, size, kind, stride=stride if kind == "conv" else 1, seed=seed)
    step, res = _quantized(layer, batch)
    fq = copy.deepcopy(res.graph)
    w8 = copy.deepcopy(res.graph)
    info = ptq4dm.lower(w8, backend="x86", weight_bits=8)
    assert info["counts"]["qconv2d" if kind == "conv" else "qlinear"] >= 1, info
    ptq4dm.lower(res.graph, backend="x86", mixed_bf16=False)   # auto weight bits: 7 without VNNI (int16 saturation)
    compiled = ptq4dm.compile_step(res.graph)
    steps = _out_steps(res)
    for b in ([batch] if batch == 1 else [batch, batch + 2]):
        x, t, noise = _inputs(step, b, seed)
        with torch.no_grad():
            want, pt2e_w8, eager = fq(x, t, noise), w8(x, t, noise), res.graph(x, t, noise)
            got = compiled(x, t, noise)
        for i, name in enumerate(("prev_sample", "mean")):
            assert torch.allclose(pt2e_w8[i], want[i], atol=1e-5), name
            tol = steps[name] * 1.01 + 1e-5
            assert float((got[i] - eager[i]).abs().max()) <= tol, (name, b)
            if has_vnni():   # 8-bit weights run as they are: the compiled graph is the simulated one
                assert float((got[i] - want[i]).abs().max()) <= tol, (name, b)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
@pytest.mark.parametrize("mixed_bf16", ["auto", False])
def test_compiled_code_runs_onednn_int8_kernels(tiny_unet, mixed_bf16):
    """Fails when Inductor silently falls back to float: the generated code must call oneDNN's
    int8 conv and linear, as many as the lowering rewrote, with int8-mixed-bf16 (the default
    where the CPU has bf16 instructions) and without."""
    step = ptq4dm.DiffusionStep(tiny_unet, ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8, batch_size=8), progress=False)
    # fold_time off: the tiny UNet's only linears are on the time path, which fold_time turns into tables
    info = ptq4dm.lower(res.graph, mixed_bf16=mixed_bf16, fold_time=False)          # the CPU's default backend
    assert info["backend"] == "x86"
    assert info["mixed_bf16"] == (has_bf16() if mixed_bf16 == "auto" else False)
    # the kernel calls in C++ (the default wrapper) or in Python: one wrapper per parametrization, so both
    # wrappers and both precisions are covered by two compiles, not four (each ~45 s on a 2-core AVX2 CPU)
    cpp_wrapper = mixed_bf16 == "auto"
    calls = int8_kernel_calls(compiled_code(ptq4dm.compile_step(res.graph, cpp_wrapper=cpp_wrapper), *_inputs(step, 2, 0)))
    assert calls["qconv"] >= info["counts"]["qconv2d"] > 0, (cpp_wrapper, calls)
    assert calls["qlinear"] >= info["counts"]["qlinear"] > 0, (cpp_wrapper, calls)
    assert all(reason for _, reason in info["kept"])


@pytest.mark.parametrize("batch", [1, 3])
def test_a_16_bit_input_runs_as_two_int8_convs_with_the_simulated_values(batch):
    """A conv whose input is quantized to 16 bits (the sensitivity pass's widened activations) is
    lowered as two oneDNN int8 convs, one on the codes' high byte and one on the low byte
    (split16): the PT2E graph computes the fake-quant graph's values, the compiled graph runs two
    qconvs for it and stays within one output step of the fake-quant graph; split16=false keeps
    it in float, with the reason."""
    layer = OneLayer(32, 24, 8, "conv")
    torch.manual_seed(0)
    step = ptq4dm.DiffusionStep(layer.eval(), ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    graph = ptq4dm.capture_step(step, batch=batch, dynamic_batch=batch > 1)
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16, batch_size=16),
                          policy=QuantPolicy(act_bits=16), progress=False, graph=graph)
    fq, kept = copy.deepcopy(res.graph), copy.deepcopy(res.graph)
    off = ptq4dm.lower(kept, backend="x86", split16=False, mixed_bf16=False)
    assert off["counts"]["split16"] == 0 and any("16 bits" in why for _, why in off["kept"])
    info = ptq4dm.lower(res.graph, backend="x86", weight_bits=8, mixed_bf16=False, split16=True)
    assert info["counts"]["split16"] == 1 and info["counts"]["qconv2d"] == 2, info
    x, t, noise = _inputs(step, batch, 1)
    with torch.no_grad():
        want, pt2e = fq(x, t, noise), res.graph(x, t, noise)
    steps = _out_steps(res)
    for a, b, name in zip(pt2e, want, ("prev_sample", "mean", "variance")):
        # the same values up to float rounding: the high / low byte sum sits on the output grid's rounding
        # boundary in another float order than the float conv, so a rare element lands one output step away
        # (1 of 6,144 on an AVX2 CPU, batch 3)
        d = (a - b).abs()
        assert float(d.max()) <= steps[name] * 1.01 + 1e-5, name
        assert int((d > 1e-5).sum()) <= max(1, d.numel() // 1000), name
    with torch.no_grad():   # split16=false keeps the layer in float on its fake-quantized input: the simulated values
        kept_out = kept(x, t, noise)
    for a, b in zip(kept_out, want):
        assert torch.allclose(a, b, atol=1e-5)
    if has_vnni():   # without VNNI oneDNN's int16 pair sums saturate on 8-bit weights (test above: 7-bit)
        compiled = ptq4dm.compile_step(res.graph)
        with torch.no_grad():
            got = compiled(x, t, noise)
        for i, name in enumerate(("prev_sample", "mean")):
            assert float((got[i] - want[i]).abs().max()) <= steps[name] * 1.01 + 1e-5, name
        assert int8_kernel_calls(compiled_code(compiled, x, t, noise))["qconv"] >= 2


def test_a_linear_over_tokens_runs_as_one_oneDNN_int8_linear():
    """A linear applied over the positions of a channels-last view (attention's q / k / v read the
    transposed GroupNorm output: a non-contiguous (B, L, C) input) is lowered as one int8 linear on
    (B L, C): Inductor turned it into a float batched matmul before (the default model's q / k / v)."""
    layer = OneLayer(32, 24, 8, "linear")
    step, res = _quantized(layer, 3)
    info = ptq4dm.lower(res.graph, backend="x86")
    assert info["counts"]["qlinear"] == 1, info
    assert int8_kernel_calls(compiled_code(ptq4dm.compile_step(res.graph), *_inputs(step, 3, 0)))["qlinear"] >= 1
    code = compiled_code(ptq4dm.compile_step(res.graph, cpp_wrapper=False), *_inputs(step, 3, 0))
    assert int8_kernel_calls(code)["qlinear"] >= 1 and "extern_kernels.bmm" not in code


@pytest.mark.parametrize("batch", [1, 4])
def test_bias_correct_tables_fold_into_the_biases(batch):
    """bias_correct's per-group tables (an add after each layer, indexed by t's group of sampler
    steps) are folded into the conv biases by lower (fold_tables, the default): no table add is
    left after a layer; for a batch that shares t (sampling) the compiled graph is within one
    output step of the fake-quant graph; a batch that mixes groups gives the same values through
    compile_step (which runs it group by group), and the lowered graph called directly refuses it
    with a message that names fold_tables. fold_tables=false keeps the adds."""
    layer = OneLayer(32, 24, 8, "conv")
    torch.manual_seed(0)
    step = ptq4dm.DiffusionStep(layer.eval(), ptq4dm.make_sampler("ddim", num_inference_steps=6)).eval()
    graph = ptq4dm.capture_step(step, batch=batch, dynamic_batch=batch > 1)
    res = ptq4dm.quantize(step, pipeline=ptq4dm.DEFAULT_PIPELINE + ",bias_correct{groups=3}",
                          calibration=NDTC(n=24, batch_size=24), progress=False, graph=graph)
    assert res.graph.meta.get("bias_correct_tables")
    fq, unfolded = copy.deepcopy(res.graph), copy.deepcopy(res.graph)
    info = ptq4dm.lower(res.graph, backend="x86", mixed_bf16=False)
    assert info["folded_tables"] >= 1, info
    assert ptq4dm.lower(unfolded, backend="x86", fold_tables=False, weight_bits=8).get("folded_tables") is None
    tables = set(res.graph.meta["bias_correct_tables"].values())


    def row(a):   # a table row: view(index(table, [group]))
        return (isinstance(a, torch.fx.Node) and a.op == "call_function" and a.args
                and getattr(a.args[0], "target", None) is torch.ops.aten.index.Tensor
                and getattr(a.args[0].args[0], "target", None) in tables)
    for n in res.graph.graph.nodes:   # a table row is added to a bias, no longer to a layer's output
        if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor and any(row(a) for a in n.args):
            assert all(a.op == "get_attr" for a in n.args if not row(a)), n.format_node()
    steps = _out_steps(res)
    compiled = ptq4dm.compile_step(res.graph)
    x, _, noise = _inputs(step, batch, 3)
    ts = [torch.full((batch,), int(step.sampler.timesteps[i])) for i in (0, 5)]
    if batch > 1:   # first half in the first group of steps, the rest in the last
        ts.append(torch.cat([ts[0][: batch // 2], ts[1][batch // 2:]]))
    for t in ts:
        with torch.no_grad():
            want, got, ref = fq(x, t, noise), compiled(x, t, noise), unfolded(x, t, noise)
        for i, name in enumerate(("prev_sample", "mean")):
            assert torch.allclose(ref[i], want[i], atol=1e-5), name
            if has_vnni():
                assert float((got[i] - want[i]).abs().max()) <= steps[name] * 1.01 + 1e-5, (name, t)
    if batch > 1:
        with pytest.raises(RuntimeError, match="fold_tables"):
            res.graph(x, ts[-1], noise)


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_mixed_bf16_keeps_int8_kernels_and_stays_near_the_fake_quant_graph(batch):
    """lower{mixed_bf16=true}: the graph runs under bf16 autocast, the int8 conv still runs in
    oneDNN (now writing bf16), the step's outputs come back in fp32, and they differ from the
    fake-quant graph (on a CPU without VNNI: the 7-bit-weight graph in fp32) only by bf16 rounding: a
    few units of bf16's precision (2^-8) of the output's scale, far less than one 8-bit activation step."""
    layer = OneLayer(32, 24, 8, "conv")
    step, res = _quantized(layer, batch)
    fq = copy.deepcopy(res.graph)
    info = ptq4dm.lower(res.graph, backend="x86", mixed_bf16=True)
    assert info["mixed_bf16"] is True and info["counts"]["qconv2d"] == 1, info
    assert not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in res.graph.graph.nodes)
    x, t, noise = _inputs(step, batch, 2)
    with torch.no_grad():   # without VNNI the lowering requantizes the weights to 7 bits: the oracle is then the
        # lowered graph run eagerly in fp32 (those 7-bit codes), with VNNI the fake-quant graph itself
        want = fq(x, t, noise) if has_vnni() else res.graph(x, t, noise)
    compiled = ptq4dm.compile_step(res.graph)
    with torch.no_grad():
        got = compiled(x, t, noise)
    for i, name in enumerate(("prev_sample", "mean")):
        assert got[i].dtype == torch.float32, name
        err = (got[i] - want[i]).abs()
        scale = want[i].abs().max()
        assert float(err.max()) <= 4 * 2**-8 * float(scale), (name, float(err.max()), float(scale))
        assert float(err.pow(2).mean().sqrt()) <= 2**-8 * float(scale), name
    code = compiled_code(compiled, x, t, noise)
    assert int8_kernel_calls(code)["qconv"] >= 1 and "bfloat16" in code
    bad = copy.deepcopy(fq)
    with pytest.raises(ValueError, match="mixed_bf16 must be auto, true or false"):
        ptq4dm.lower(bad, backend="x86", mixed_bf16="maybe")
    assert "lowered_backend" not in bad.meta   # refused before the graph was touched
    assert not any(n.op == "get_attr" and str(n.target).startswith("ptq4dm_x86w") for n in bad.graph.nodes)


def test_mixed_bf16_auto_enters_autocast_only_for_calls_with_the_work_to_repay_it(monkeypatch):
    """lower{mixed_bf16=auto} counts the step's multiply-accumulates per sample (the conv's
    9 * 32 * 24 and the 1x1's 24 * 32 per pixel of the 8x8 sample: 491,520) and sets the smallest
    batch that reaches MIXED_BF16_MIN_MACS; CompiledStep runs smaller batches without autocast,
    within one output step of the fake-quant graph, and larger ones in bf16."""
    import ptq4dm.backends.x86 as x86

    if not has_bf16():
        pytest.skip("needs AVX-512 BF16 or AMX (mixed_bf16=auto is off without them)")
    macs = 8 * 8 * (9 * 32 * 24 + 24 * 32)
    monkeypatch.setattr(x86, "MIXED_BF16_MIN_MACS", 2 * macs)   # batch 2 and up run mixed
    layer = OneLayer(32, 24, 8, "conv")
    step, res = _quantized(layer, 3)
    fq = copy.deepcopy(res.graph)
    info = ptq4dm.lower(res.graph, backend="x86", weight_bits=8)
    assert info["macs_per_sample"] == macs and info["mixed_bf16"] is True and info["mixed_bf16_min_batch"] == 2, info
    compiled = ptq4dm.compile_step(res.graph)
    steps = _out_steps(res)
    x, t, noise = _inputs(step, 3, 4)
    t = torch.full_like(t, int(t[0]))
    with torch.no_grad():
        want, one = fq(x[:1], t[:1], noise[:1]), compiled(x[:1], t[:1], noise[:1])
    for i, name in enumerate(("prev_sample", "mean")):
        if has_vnni():
            assert float((one[i] - want[i]).abs().max()) <= steps[name] * 1.01 + 1e-5, name
    assert "bfloat16" not in compiled_code(compiled, x[:1], t[:1], noise[:1])
    assert "bfloat16" in compiled_code(compiled, x, t, noise)


def test_lower_rejects_an_unknown_backend(tiny_unet):
    step = ptq4dm.DiffusionStep(tiny_unet, ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=4, batch_size=4), progress=False)
    with pytest.raises(ValueError, match="unknown backend 'npu'.*x86"):
        ptq4dm.lower(res.graph, backend="npu")


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_fuse_sum_puts_the_residual_add_inside_the_int8_conv(tiny_unet):
    """lower{fuse_sum=true}: a ResNet block's ``input + conv2(h)`` runs as oneDNN's int8 conv with a
    sum post-op (``qconv2d_pointwise.binary``) instead of an add after it; with fp32 outputs the
    values are bit-equal to the unfused compiled graph, and a residual still read later (a skip
    connection) is never overwritten (equality covers it: the UNet's up path reads its skips)."""
    step = ptq4dm.DiffusionStep(tiny_unet, ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8, batch_size=8), progress=False)
    plain, fused = copy.deepcopy(res.graph), copy.deepcopy(res.graph)
    ptq4dm.lower(plain, mixed_bf16=False, min_k=1, min_n=1)
    ptq4dm.lower(fused, mixed_bf16=False, min_k=1, min_n=1, fuse_sum=True)
    args = _inputs(step, 2, 0)
    # two compiles with the default C++ wrapper (its source names the binary conv too); each step runs right
    # after its own compile, since compiled_code resets dynamo (a third compile cost ~45 s on a 2-core AVX2 CPU)
    a, b = ptq4dm.compile_step(plain), ptq4dm.compile_step(fused)
    code_a = compiled_code(a, *args)
    with torch.no_grad():
        out_a = a(*args)
    code = compiled_code(b, *args)
    with torch.no_grad():
        out_b = b(*args)
    binary = re.compile(r"qconv2d_pointwise[._]binary")   # Python wrapper: onednn.qconv2d_pointwise.binary
    assert binary.search(code) and not binary.search(code_a)
    assert int8_kernel_calls(code)["qconv"] == int8_kernel_calls(code_a)["qconv"]
    for u, v in zip(out_a, out_b):
        assert torch.equal(u, v)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lo=st.floats(-8.0, -0.5), hi=st.floats(0.5, 8.0))
def test_a_16_bit_grid_is_finer_than_bf16_so_fake_quant_fp32_only_passes_bf16_through(seed, lo, hi):
    """The claim behind lower{drop_wide=bf16}: for a bf16 input inside the calibrated range and more
    than 256 steps from zero, the 16-bit fake-quant rounded back to bf16 is the input itself (bf16
    carries 8 significant bits, the grid's step is finer); fake_quant_fp32_only returns a bf16 input
    as it is and computes the 16-bit fake-quant for fp32 inputs (the simulated values)."""
    from ptq4dm.ir.quant import fake_quant

    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([(hi - lo) / 65535])
    zp = torch.tensor([round(-32768 - lo / float(scale))], dtype=torch.int64)
    x = (torch.rand(4096, generator=g) * (hi - lo) + lo)
    xb = x.to(torch.bfloat16)
    inside = (xb.float().abs() > 256 * scale) & (xb.float() > lo) & (xb.float() < hi)
    fq = fake_quant(xb, scale, zp, -32768, 32767)
    assert torch.equal(fq[inside], xb[inside])
    assert torch.equal(torch.ops.ptq4dm.fake_quant_fp32_only(xb, scale, zp, -32768, 32767), xb)
    assert torch.equal(torch.ops.ptq4dm.fake_quant_fp32_only(x, scale, zp, -32768, 32767),
                       fake_quant(x, scale, zp, -32768, 32767))
    x8 = torch.ops.ptq4dm.fake_quant_fp32_only(xb, scale, torch.zeros(1, dtype=torch.int64), -128, 127)
    assert torch.equal(x8, fake_quant(xb, scale, torch.zeros(1, dtype=torch.int64), -128, 127))   # 8 bits: always quantized


def test_drop_wide_bf16_keeps_the_simulated_values_in_fp32_calls_and_skips_the_pass_in_bf16_ones():
    """split16=false keeps a conv with a 16-bit input in float; with drop_wide=bf16 (the default)
    its fp32 calls read the 16-bit fake-quantized input (exactly the simulated values) and its
    int8-mixed-bf16 calls read the bf16 input itself (no pass writing a clamped copy), within the
    bf16 tolerance of the fake-quant graph; a wrong value is refused with the choices."""
    layer = OneLayer(32, 24, 8, "conv")
    torch.manual_seed(0)
    step = ptq4dm.DiffusionStep(layer.eval(), ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    graph = ptq4dm.capture_step(step, batch=3, dynamic_batch=True)
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16, batch_size=16),
                          policy=QuantPolicy(act_bits=16), progress=False, graph=graph)
    fq = copy.deepcopy(res.graph)
    with pytest.raises(ValueError, match="drop_wide must be bf16, true or false"):
        ptq4dm.lower(copy.deepcopy(fq), backend="x86", split16=False, drop_wide="sometimes")
    fp32, bf16 = copy.deepcopy(fq), copy.deepcopy(fq)
    info = ptq4dm.lower(fp32, backend="x86", split16=False, mixed_bf16=False)
    dropped = sum("drop_wide=bf16" in why for _, why in info["kept"])
    assert dropped >= 1, info["kept"]
    assert sum(n.target is torch.ops.ptq4dm.fake_quant_fp32_only.default for n in fp32.graph.nodes) == dropped
    x, t, noise = _inputs(step, 3, 4)
    with torch.no_grad():
        want = fq(x, t, noise)
        got = ptq4dm.compile_step(fp32)(x, t, noise)
    steps = _out_steps(res)
    for i, name in enumerate(("prev_sample", "mean")):
        assert float((got[i] - want[i]).abs().max()) <= steps[name] * 1.01 + 1e-5, name
    ptq4dm.lower(bf16, backend="x86", split16=False, mixed_bf16=True)
    compiled = ptq4dm.compile_step(bf16)
    # inputs like the calibration's (x_T ~ N(0, I)): inside the calibrated 16-bit ranges. _inputs'
    # doubled x leaves them, and there the bf16 call differs by the clipping it no longer does
    x = x / 2
    with torch.no_grad():
        want, got = fq(x, t, noise), compiled(x, t, noise)
    for i, name in enumerate(("prev_sample", "mean")):
        err, scale = (got[i] - want[i]).abs(), want[i].abs().max()
        assert float(err.max()) <= 4 * 2**-8 * float(scale), (name, float(err.max()), float(scale))
    # the 16-bit input's clamp (to the codes' 32767) is gone from the bf16 call's kernels only
    clamps_bf16 = compiled_code(compiled, x, t, noise).count("32767")
    clamps_fp32 = compiled_code(ptq4dm.compile_step(fp32), x, t, noise).count("32767")
    assert clamps_bf16 < clamps_fp32, (clamps_bf16, clamps_fp32)


@pytest.mark.parametrize("sampler_kind", ["ddpm", "ddim"])
def test_time_path_folds_into_per_timestep_tables_with_the_same_values(tiny_unet, sampler_kind):
    """lower's fold_time (the default): the values the step computes from t alone (the time MLP and
    every block's time_emb_proj) become table[t] lookups. The folded graph gives the unfolded
    graph's values exactly (fp32, eager) for a batch of distinct timesteps; no linear on the time
    path is left; fold_time=false leaves the graph as it was."""
    from ptq4dm.backends.x86 import fold_time_path

    sampler = ptq4dm.make_sampler(sampler_kind, num_inference_steps=5)
    step = ptq4dm.DiffusionStep(tiny_unet, sampler).eval()
    graph = ptq4dm.capture_step(copy.deepcopy(step), batch=3, dynamic_batch=True)
    x, _, noise = _inputs(step, 3, 0)
    t = torch.tensor([int(v) for v in sampler.timesteps[:3]])
    with torch.no_grad():
        before = graph.gm(x, t, noise)
    linears = sum(n.target is torch.ops.aten.linear.default for n in graph.graph.nodes)
    info = fold_time_path(graph)
    assert info["values"] >= 2 and info["timesteps"] == 1000, info
    assert sum(n.target is torch.ops.aten.linear.default for n in graph.graph.nodes) < linears
    x_node, t_node = [n for n in graph.graph.nodes if n.op == "placeholder"][:2]
    assert not any(n.target is torch.ops.aten.linear.default and t_node in _ancestors(n) and x_node not in _ancestors(n)
                   for n in graph.graph.nodes)   # no linear computes from t alone
    with torch.no_grad():
        after = graph.gm(x, t, noise)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # through lower: reported, and off with fold_time=false
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8, batch_size=8), progress=False)
    kept = copy.deepcopy(res.graph)
    assert ptq4dm.lower(res.graph, mixed_bf16=False)["time_path"]["values"] == info["values"]
    assert "time_path" not in ptq4dm.lower(kept, mixed_bf16=False, fold_time=False)
    assert not any(str(n.target).startswith("ptq4dm_tpath") for n in kept.graph.nodes if n.op == "get_attr")


def _ancestors(node):
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), groups=st.sampled_from([1, 2, 4, 8]), per_group=st.integers(2, 12),
       spatial=st.sampled_from([(), (5,), (3, 4), (7, 7)]), affine=st.booleans(), bf16=st.booleans(),
       channels_last=st.booleans(), shift=st.floats(-50.0, 50.0), seed=st.integers(0, 2**31 - 1))
def test_group_norm_cl_equals_group_norm(n, groups, per_group, spatial, affine, bf16, channels_last, shift, seed):
    """lower{gn_channels_last}'s GroupNorm gives aten's values (fp32 rounding; bf16 inputs: within
    one bf16 step of the output) whatever the shape, the layout, the mean (two-pass variance: a
    large shift loses nothing) and the dtype, and returns the input's dtype."""
    from ptq4dm.backends.x86 import GN_CL

    g = torch.Generator().manual_seed(seed)
    c = groups * per_group
    x = torch.randn(n, c, *spatial, generator=g) * 3 + shift
    if channels_last and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else (None, None)
    if bf16:
        x = x.to(torch.bfloat16)
    got = GN_CL(x, groups, w, b, 1e-6)
    ref = torch.nn.functional.group_norm(x.float(), groups, w, b, 1e-6)
    assert got.dtype == x.dtype and got.shape == x.shape
    tol = (2 ** -7) * (ref.abs() + 1) if bf16 else 1e-4 * (ref.abs() + 1)
    assert ((got.float() - ref).abs() <= tol).all(), float((got.float() - ref).abs().max())


def test_lower_rewrites_group_norms_and_keeps_the_values(tiny_unet):
    """lower (x86) replaces every aten.group_norm by ptq4dm.group_norm_cl (gn_channels_last, the
    default; reported in ctx.results['lower']['group_norms']) and the lowered graph, eager, gives
    the values of the graph lowered without it within float rounding; gn_channels_last=false
    keeps aten's."""
    step = ptq4dm.DiffusionStep(tiny_unet, ptq4dm.make_sampler("ddim", num_inference_steps=5)).eval()
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8, batch_size=8), progress=False)
    plain = copy.deepcopy(res.graph)
    n_gn = sum(n.target is torch.ops.aten.group_norm.default for n in res.graph.graph.nodes)
    info = ptq4dm.lower(res.graph, mixed_bf16=False)
    assert info["group_norms"] == n_gn > 0
    assert not any(n.target is torch.ops.aten.group_norm.default for n in res.graph.graph.nodes)
    assert "group_norms" not in ptq4dm.lower(plain, mixed_bf16=False, gn_channels_last=False)
    assert sum(n.target is torch.ops.aten.group_norm.default for n in plain.graph.nodes) == n_gn
    args = _inputs(step, 2, 0)
    with torch.no_grad():
        for a, b in zip(res.graph.gm(*args), plain.gm(*args)):
            assert torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())
