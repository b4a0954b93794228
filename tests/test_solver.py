"""The range solvers: properties a user relies on, over hypothesis-drawn tensors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ptq4dm.ir.quant import (QParams, QuantizationError, dequantize, fake_quant, lp_error, quantize,
                             solve_minmax, solve_mse)

RANGES = {True: (-127, 127), False: (-128, 127)}


@st.composite
def tensors(draw):
    n = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**31 - 1))
    dist = draw(st.sampled_from(["normal", "silu", "heavy", "uniform", "positive"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if dist == "silu":
        x = torch.nn.functional.silu(x * 3)
    elif dist == "heavy":
        x = x ** 3
    elif dist == "uniform":
        x = torch.rand(n, generator=g) * 10 - 3
    elif dist == "positive":
        x = x.abs() + 0.5
    return x * draw(st.sampled_from([1e-3, 1.0, 50.0]))


@given(x=tensors(), symmetric=st.booleans(), p=st.sampled_from([2.0, 2.4]))
def test_mse_never_worse_than_minmax_and_valid(x, symmetric, p):
    qmin, qmax = RANGES[symmetric]
    mm = solve_minmax(x, qmin, qmax, symmetric)
    qp = solve_mse(x, qmin, qmax, symmetric, p=p, grid=50, refine=5)
    assert lp_error(x, qp, p) <= lp_error(x, mm, p) * (1 + 1e-6) + 1e-30
    assert qp.scale > 0 and torch.isfinite(qp.scale)
    assert qmin <= int(qp.zero_point) <= qmax
    if symmetric:
        assert int(qp.zero_point) == 0


@given(c=st.integers(1, 8), k=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_per_channel_weights(c, k, seed):
    w = torch.randn(c, k, 3, generator=torch.Generator().manual_seed(seed)) * torch.rand(c, 1, 1) * 3
    mm = solve_minmax(w, -127, 127, True, axis=0)
    qp = solve_mse(w, -127, 127, True, axis=0, grid=40, refine=5)
    assert qp.scale.shape == (c,) and (qp.scale > 0).all()
    assert (lp_error(w, qp, 2) <= lp_error(w, mm, 2) * (1 + 1e-6) + 1e-30).all()


@given(scale=st.floats(1e-3, 10.0), zp=st.integers(-100, 100), seed=st.integers(0, 2**31 - 1), n=st.integers(2, 300))
def test_values_on_the_grid_round_trip_exactly(scale, zp, seed, n):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n,), generator=g)
    codes[0], codes[1] = -128, 127  # span the full integer range
    scale_t = torch.tensor(scale, dtype=torch.float32)
    x = (codes - zp).float() * scale_t
    qp = QParams(scale_t, torch.tensor(zp, dtype=torch.int32), -128, 127)
    assert torch.equal(fake_quant(x, qp.scale, qp.zero_point, -128, 127), x)
    assert torch.equal(dequantize(quantize(x, qp), qp), x)


@given(scale=st.floats(1e-3, 10.0), zp=st.integers(-100, 100), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_inputs_round_on_the_fp32_grid(scale, zp, seed, dtype):
    """Under int8-mixed-bf16 the fake-quant and quantize ops see bf16 activations: the codes must be
    the ones the fp32 graph gives the same values (the scale is not rounded to 16 bits), and the
    fake-quant output is that value in the input's dtype."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(512, generator=g) * 60 * scale).to(dtype)
    s, z = torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32)
    codes = torch.ops.ptq4dm.quantize(x, s, z, -128, 127)
    assert torch.equal(codes, torch.ops.ptq4dm.quantize(x.float(), s, z, -128, 127))
    out = fake_quant(x, s, z, -128, 127)
    assert out.dtype == dtype
    assert torch.equal(out, fake_quant(x.float(), s, z, -128, 127).to(dtype))


def test_constant_and_zero_tensors_give_valid_qparams():
    for x in (torch.zeros(100), torch.full((100,), 3.5), torch.full((100,), -2.0)):
        for symmetric in (True, False):
            qmin, qmax = RANGES[symmetric]
            for qp in (solve_minmax(x, qmin, qmax, symmetric), solve_mse(x, qmin, qmax, symmetric)):
                assert qp.scale > 0 and qmin <= int(qp.zero_point) <= qmax
                assert torch.allclose(fake_quant(x, qp.scale, qp.zero_point, qmin, qmax), x, atol=float(qp.scale))


def test_nan_and_inf_are_named():
    x = torch.randn(10)
    x[3] = float("nan")
    with pytest.raises(QuantizationError, match="'conv2d_7:silu_3' contains NaN"):
        solve_mse(x, -128, 127, False, name="conv2d_7:silu_3")
    x[3] = float("inf")
    with pytest.raises(QuantizationError, match="Inf"):
        solve_minmax(x, -128, 127, False, name="t")
