"""The lowered graph's ops, registered with torch.library (``triton_op``: torch.compile traces
into them and sees the Triton launches; torch.export keeps them as single ops) and dispatching
by device:

    ptq4dm::quantize(x, scale, zp, qmin, qmax, axis)            float -> int8 codes (ir/quant.py)
    ptq4dm::qlinear(xq, x_scale, x_zp, wp, w_sum, w_scale, bias, residual, out_dtype,
                    out_scale=None, out_zp=None, out_qmin=-128, out_qmax=127)
    ptq4dm::qconv2d(xq, x_scale, x_zp, wp, w_sum, w_scale, bias, residual, kh, kw, stride, padding, out_dtype,
                    out_scale=None, out_zp=None, out_qmin=-128, out_qmax=127)
    ptq4dm::qmatmul(aq, a_scale, a_zp, bq, b_scale, b_zp, out_dtype)

The int8 ops take int8 activation codes with their solved range (x_scale / x_zp: () or
per-sample (B,)). The quantization itself is a separate, composite graph op, so Inductor fuses
it into whatever produced the activation (GroupNorm + SiLU + quantize in one kernel) and the
int8 op reads int8. Weights are packed once by the lower pass: ``wp`` (K, N) int8 with
``w_sum`` (N,) int32 for the zero-point correction and per-output-channel ``w_scale``. A
``residual`` is the graph's following add, fused into the epilogue. With ``out_scale`` /
``out_zp`` (() or (B,)) the epilogue requantizes: the op returns the int8 codes its consumer's
``ptq4dm.quantize`` would have produced (same formula, on the float32 epilogue value), and
``out_dtype`` is unused. qconv2d returns its NHWC
result as an NCHW tensor in channels-last memory (no transpose copy).

CPU: the integer-exact reference (backends/reference.py). CUDA: the Triton kernels
(backends/triton_kernels.py).
"""

from __future__ import annotations

import os

import torch

from ptq4dm.ir import quant as _quant  # noqa: F401  (defines ptq4dm::quantize and ptq4dm::fake_quant)

from . import reference as ref
from .triton_kernels import HAVE_TRITON


def _use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors go to the Triton kernels. ``PTQ4DM_TRITON_ON_CPU=1`` (with
    ``TRITON_INTERPRET=1``) sends CPU tensors there too: how the tests run the kernels through
    the registered ops on a machine without a GPU."""
    if not HAVE_TRITON:
        return False
    return x.is_cuda or (os.environ.get("PTQ4DM_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1")


def _op(name: str):
    """Register ``fn`` as ``ptq4dm::<name>``: a ``triton_op`` when triton is installed, so
    torch.compile traces into the body and sees the Triton launches (and the reference's ATen ops
    on the CPU); otherwise an opaque ``custom_op`` whose fake kernel is the body itself (both
    branches are shape-traceable)."""
    def register(fn):
        if HAVE_TRITON:
            return torch.library.triton_op(f"ptq4dm::{name}", mutates_args=())(fn)
        op = torch.library.custom_op(f"ptq4dm::{name}", mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return register


@_op("qlinear")
def qlinear(xq: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, wp: torch.Tensor, w_sum: torch.Tensor,
            w_scale: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
            out_dtype: torch.dtype, out_scale: torch.Tensor | None = None, out_zp: torch.Tensor | None = None,
            out_qmin: int = -128, out_qmax: int = 127) -> torch.Tensor:
    lead, K, N = xq.shape[:-1], xq.shape[-1], wp.shape[1]
    if _use_triton(xq):
        from .triton_kernels import int8_gemm

        x2 = xq.reshape(-1, K)
        rps = x2.shape[0] // x_scale.numel() if x_scale.dim() else x2.shape[0]
        res = residual.reshape(-1, N) if residual is not None else None
        return int8_gemm(x2, x_zp, x_scale, wp, w_sum, w_scale, bias, rows_per_sample=rps, residual=res,
                         out_dtype=out_dtype, out_scale=out_scale, out_zp=out_zp, out_qmin=out_qmin,
                         out_qmax=out_qmax).reshape(*lead, N)
    y = ref.linear_q(xq, x_scale, x_zp, wp, w_sum, w_scale, bias, residual)
    return ref.requantize(y, out_scale, out_zp, out_qmin, out_qmax) if out_scale is not None else y.to(out_dtype)


@_op("qconv2d")
def qconv2d(xq: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, wp: torch.Tensor, w_sum: torch.Tensor,
            w_scale: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, kh: int, kw: int,
            stride: int, padding: int, out_dtype: torch.dtype, out_scale: torch.Tensor | None = None,
            out_zp: torch.Tensor | None = None, out_qmin: int = -128, out_qmax: int = 127) -> torch.Tensor:
    if _use_triton(xq):
        from .triton_kernels import int8_conv2d

        return int8_conv2d(xq, x_zp, x_scale, wp, w_sum, w_scale, bias, kh, kw, stride, padding,
                           residual=residual, out_dtype=out_dtype, out_scale=out_scale, out_zp=out_zp,
                           out_qmin=out_qmin, out_qmax=out_qmax)
    y = ref.conv2d_q(xq, x_scale, x_zp, wp, w_sum, w_scale, bias, residual, kh, kw, stride, padding)
    if out_scale is not None:   # channels-last memory is kept by the elementwise requantize
        return ref.requantize(y, out_scale, out_zp, out_qmin, out_qmax).contiguous(memory_format=torch.channels_last)
    return y.to(out_dtype)


@_op("qmatmul")
def qmatmul(aq: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
            b_zp: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if _use_triton(aq):
        from .triton_kernels import int8_bmm

        return int8_bmm(aq, a_zp, a_scale, bq, b_zp, b_scale, out_dtype=out_dtype)
    return ref.matmul_q(aq, a_scale, a_zp, bq, b_scale, b_zp).to(out_dtype)

