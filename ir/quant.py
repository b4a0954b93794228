"""The quantization formula and the range solvers: pure functions, explicit ranges and dtypes.

Formula (torchao's affine primitives, used here so there is one definition):

    q     = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Per-tensor: ``scale`` and ``zero_point`` are 0-d; per-channel along ``axis``: 1-d of length
``x.shape[axis]``.

Solvers return ``QParams``. ``solve_mse`` minimises ``mean |Q(x) - x|^p`` over the clipping
range: a grid of ``grid`` candidate ranges (fractions of the observed max, as the reference
code does with 100 candidates) followed by a finer grid around the best one (refinement).
Affine ranges are refined by coordinate descent on the lower and upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine


class QuantizationError(ValueError):
    """Data that cannot be quantized (NaN / Inf), named."""


@dataclass
class QParams:
    """Solved quantization parameters of one tensor."""

    scale: torch.Tensor          # float32, 0-d or (C,)
    zero_point: torch.Tensor     # int32, same shape as scale
    qmin: int
    qmax: int
    axis: int | None = None      # per-channel axis, None for per-tensor
    groups: int = 0              # >0: scale / zero_point are tables over timestep groups (G,)

    def to(self, device) -> "QParams":
        return QParams(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax, self.axis, self.groups)


def _block_size(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(x.shape)
    return tuple(1 if d == axis else s for d, s in enumerate(x.shape))


def _expand(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or v.dim() == 0:
        return v.reshape([1] * x.dim()) if v.dim() == 0 else v
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def quantize(x: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Float -> integer codes (int8 by default; int16 for wider specs)."""
    scale = qp.scale.reshape(-1) if qp.axis is not None else qp.scale.reshape(1)
    zp = qp.zero_point.reshape(-1) if qp.axis is not None else qp.zero_point.reshape(1)
    if x.dim() == 0:
        x = x.reshape(1)
    return quantize_affine(x, _block_size(x, qp.axis), scale, zp, dtype, qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams, output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    scale = qp.scale.reshape(-1) if qp.axis is not None else qp.scale.reshape(1)
    zp = qp.zero_point.reshape(-1) if qp.axis is not None else qp.zero_point.reshape(1)
    return dequantize_affine(q, _block_size(q, qp.axis), scale, zp, q.dtype, qp.qmin, qp.qmax,
                             output_dtype=output_dtype)


def _grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None):
    """x, scale and zero point in the dtype the rounding runs in: at least fp32. A bf16 / fp16 x
    (int8-mixed-bf16 runs the graph under autocast) is widened rather than the scale narrowed:
    a bf16 1/scale carries 8 significant bits and would move the grid by up to 0.4%, so that the
    codes would differ from the fp32 graph's on the same values. Inductor fuses the casts into the
    kernel: no extra memory traffic."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return x.to(dt), _expand(scale, x, axis).to(dt), _expand(zero_point, x, axis).to(dt)


def _fake_quant_impl(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                     axis: int | None = None) -> torch.Tensor:
    xf, s, z = _grid(x, scale, zero_point, axis)
    q = torch.clamp(torch.round(xf * (1.0 / s)) + z, qmin, qmax)
    return ((q - z) * s).to(x.dtype)


# ``torch.ops.ptq4dm.fake_quant``: an op of its own so graph dumps name it, with a
# CompositeImplicitAutograd kernel so torch.compile / export decompose it into fusible ATen ops.
_LIB = torch.library.Library("ptq4dm", "DEF")
_LIB.define("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int? axis=None) -> Tensor")
_LIB.impl("fake_quant", _fake_quant_impl, "CompositeImplicitAutograd")


def _fake_quant_fp32_only_impl(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                               axis: int | None = None) -> torch.Tensor:
    if x.dtype == torch.bfloat16 and qmax - qmin >= 65535:
        # a bf16 value carries 8 significant bits, so a 16-bit grid is finer than bf16 itself for
        # every |x| above 256 steps (there the fake-quant rounds back to x); what is left is the
        # clamp at the calibrated range, and that alone would still cost a pass that writes a copy
        return x.view(x.shape)
    return _fake_quant_impl(x, scale, zero_point, qmin, qmax, axis)


# ``torch.ops.ptq4dm.fake_quant_fp32_only``: the x86 lowering's input of a float layer that reads a
# 16-bit activation (``lower{drop_wide=bf16}``): the 16-bit fake-quant in fp32 calls (exact, as
# simulated) and the input itself in int8-mixed-bf16 calls, where the graph runs in bf16 (see above).
_LIB.define("fake_quant_fp32_only(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int? axis=None) -> Tensor")
_LIB.impl("fake_quant_fp32_only", _fake_quant_fp32_only_impl, "CompositeImplicitAutograd")


def _quantize_codes_impl(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                         axis: int | None = None) -> torch.Tensor:
    xf, s, z = _grid(x, scale, zero_point, axis)
    return torch.clamp(torch.round(xf * (1.0 / s)) + z, qmin, qmax).to(torch.int8)


# ``torch.ops.ptq4dm.quantize``: float -> int8 codes, the first half of ``fake_quant`` (same
# arithmetic, so the lowered graph sees the very codes the simulated one rounds to). Composite
# too: under torch.compile it decomposes into pointwise ATen ops that Inductor fuses into the
# producer (GroupNorm + SiLU + quantize in one kernel), writing int8 instead of float.
_LIB.define("quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int? axis=None) -> Tensor")
_LIB.impl("quantize", _quantize_codes_impl, "CompositeImplicitAutograd")


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize in float arithmetic (the simulated W8A8 graph's op).

    Same rounding as ``quantize``: round-half-to-even of ``x * (1/scale)``.
    """
    return torch.ops.ptq4dm.fake_quant(x, scale, zero_point, qmin, qmax, axis)


def check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "Inf"
        raise QuantizationError(f"tensor {name!r} contains {bad}; cannot choose quantization parameters "
                                f"(check the model / calibration inputs that produce it)")


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                       axis: int | None = None) -> QParams:
    """Scale and zero point mapping [lo, hi] (elementwise for per-channel) onto [qmin, qmax]."""
    eps = torch.finfo(torch.float32).eps
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / ((qmax - qmin) / 2), min=eps)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return QParams(scale, zp, qmin, qmax, axis)


def lp_error(x: torch.Tensor, qp: QParams, p: float) -> torch.Tensor:
    """mean |Q(x) - x|^p over all elements (per-tensor) or per channel along qp.axis."""
    err = (fake_quant(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis) - x).abs().pow(p)
    if qp.axis is None:
        return err.mean()
    return err.transpose(0, qp.axis).reshape(x.shape[qp.axis], -1).mean(dim=1)


def solve_minmax(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
                 name: str = "tensor") -> QParams:
    """The baseline: the observed [min, max] range, no clipping."""
    check_finite(x, name)
    if axis is None:
        return qparams_from_range(x.min(), x.max(), qmin, qmax, symmetric)
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return qparams_from_range(flat.min(dim=1).values, flat.max(dim=1).values, qmin, qmax, symmetric, axis)


def _minmax_of(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _candidate_errors(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, a_lo: torch.Tensor,
                      a_hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool, p: float) -> torch.Tensor:
    """Errors of G candidate ranges at once. x: (C, K); lo, hi: (C,); a_lo, a_hi: (G, C) -> (G, C)."""
    C, K = x.shape
    out = []
    chunk = max(1, (1 << 23) // max(1, C * K))
    for g0 in range(0, a_lo.shape[0], chunk):
        qp = qparams_from_range(lo[None] * a_lo[g0:g0 + chunk], hi[None] * a_hi[g0:g0 + chunk], qmin, qmax, symmetric)
        s, z = qp.scale[..., None], qp.zero_point[..., None].float()
        xq = (torch.clamp(torch.round(x[None] * (1.0 / s)) + z, qmin, qmax) - z) * s
        out.append((xq - x[None]).abs().pow(p).mean(dim=-1))
    return torch.cat(out)


def solve_mse(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
              p: float = 2.0, grid: int = 100, refine: int = 10, name: str = "tensor",
              lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> QParams:
    """Minimise mean |Q(x) - x|^p over clipping ranges (per channel along ``axis`` if given).

    ``lo`` / ``hi`` override the observed extremes (an observer's exact min / max when ``x`` is
    a sample of the tensor). The min-max range (fraction 1.0) is always among the candidates, so
    the result's error on ``x`` is never above min-max's. All candidates of a round are
    evaluated in one batched computation.
    """
    check_finite(x, name)
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    x = x.float()
    mn, mx = _minmax_of(x, axis)
    lo = mn if lo is None else torch.minimum(lo.float().to(mn.device), mn)
    hi = mx if hi is None else torch.maximum(hi.float().to(mx.device), mx)
    x2 = x.reshape(1, -1) if axis is None else x.transpose(0, axis).reshape(x.shape[axis], -1)
    lo2, hi2 = lo.reshape(-1), hi.reshape(-1)
    C = x2.shape[0]
    cols = torch.arange(C)

    def pick(a_lo: torch.Tensor, a_hi: torch.Tensor):
        err = _candidate_errors(x2, lo2, hi2, a_lo, a_hi, qmin, qmax, symmetric, p)
        best = err.argmin(dim=0)
        return a_lo[best, cols], a_hi[best, cols], err[best, cols]

    # 1) coarse grid, both ends shrunk together (the reference code's 100 candidates)
    fr = (torch.arange(1, grid + 1, dtype=torch.float32) / grid)[:, None].expand(grid, C)
    b_lo, b_hi, b_err = pick(fr, fr)
    # 2) refinement around the best fraction; for affine, coordinate descent on each end
    step = 1.0 / grid
    for _ in range(2):
        d = torch.linspace(-step, step, 2 * refine + 1)[:, None]
        keep = torch.ones(1, C)
        if symmetric:
            a = torch.cat([(b_hi[None] + d).clamp(1e-3, 1.0), b_hi[None] * keep])
            b_lo, b_hi, b_err = pick(a, a)
        else:
            a = torch.cat([(b_hi[None] + d).clamp(1e-3, 1.0), b_hi[None] * keep])
            b_lo, b_hi, b_err = pick(b_lo[None].expand_as(a), a)
            a = torch.cat([(b_lo[None] + d).clamp(1e-3, 1.0), b_lo[None] * keep])
            b_lo, b_hi, b_err = pick(a, b_hi[None].expand_as(a))
        step /= refine
    qp = qparams_from_range(lo2 * b_lo, hi2 * b_hi, qmin, qmax, symmetric)
    if axis is None:
        return QParams(qp.scale.reshape(()), qp.zero_point.reshape(()), qmin, qmax, None)
    return QParams(qp.scale, qp.zero_point, qmin, qmax, axis)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte: ``codes`` (any shape, values in [-8, 7]) flattened, offset
    by 8 to [0, 15]; element 2i in the low nibble of byte i, 2i + 1 in the high one (a zero nibble
    pads an odd count). ``unpack_int4(pack_int4(c), c.numel()).reshape(c.shape) == c``."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError(f"pack_int4: codes must lie in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]")
    u = (flat + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit codes (2 <= bits <= 8; values in [-2^(bits-1), 2^(bits-1) - 1]) as a bit stream: flattened,
    offset by 2^(bits-1) to unsigned, each code's bits least significant first, code i at bit i * bits of the stream,
    eight stream bits per byte (bit j of the stream in bit j % 8 of byte j // 8; zero bits pad the last byte).
    ``ceil(numel * bits / 8)`` bytes: 5 / 8 of int8 storage at 5 bits. ``unpack_bits(pack_bits(c, b), b, c.numel())``
    gives ``c`` back (flat, int8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in [2, 8], got {bits}")
    half = 1 << (bits - 1)
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -half or int(flat.max()) > half - 1):
        raise ValueError(f"pack_bits: {bits}-bit codes must lie in [{-half}, {half - 1}], "
                         f"got [{int(flat.min())}, {int(flat.max())}]")
    u = (flat + half).to(torch.int32)
    stream = ((u[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The int8 codes ``pack_bits(codes, bits)`` stored (flat, ``numel`` of them)."""
    size = (numel * bits + 7) // 8
    if not 2 <= bits <= 8 or packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != size:
        raise ValueError(f"unpack_bits: expected a 1-D uint8 tensor of {size} bytes for {numel} codes of {bits} bits "
                         f"(2 <= bits <= 8), got {packed.dtype} {tuple(packed.shape)}")
    stream = ((packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    u = (stream << torch.arange(bits, dtype=torch.int32)).sum(1)
    return (u - (1 << (bits - 1))).to(torch.int8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The int8 codes ``pack_int4`` stored (flat, ``numel`` of them)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"unpack_int4: expected a 1-D uint8 tensor of {(numel + 1) // 2} bytes for {numel} codes, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], 1).reshape(-1)[:numel]
