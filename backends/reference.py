"""Integer-exact CPU reference of every lowered op: the oracle the Triton kernels are tested
against, and the CPU implementation of the lowered graph.

Conventions (shared with backends/triton_kernels.py):

* activations: int8 codes ``xq`` with zero point ``x_zp`` and scale ``x_scale``; either one
  value for the whole tensor or one per sample (per-timestep ranges): shape () or (B,)
* weights: int8 codes ``wq`` (N, K) for linear, (OC, C, KH, KW) for conv, symmetric per output
  channel (zero point 0), scales ``w_scale`` (N,)
* accumulation in int32 (done here in int64, then checked to fit):
      acc[m, n] = sum_k xq[m, k] * wq[n, k] - x_zp[m] * sum_k wq[n, k]
* epilogue: ``out = acc * (x_scale[m] * w_scale[n]) + bias[n] (+ residual[m, n])`` in float32
* requantizing epilogue (when the op's consumer wants int8, e.g. the q / k / v linears feeding
  the attention matmuls): ``q = clamp(round(out * (1 / out_scale)) + out_zp, qmin, qmax)`` on the
  float32 ``out`` above, the formula of ``ptq4dm.quantize``; out_scale / out_zp () or (B,)
* packed weights (what the lower pass stores once): ``wp`` (K, N) int8 with
  ``w_sum[n] = sum_k wp[k, n]`` (int32); for a conv k = (i*KW + j)*C + c (``pack_conv_weight``)

The ``*_q`` functions are the lowered ops' CPU kernels: int8 activation codes in (the graph
quantizes them with ``ptq4dm.quantize``), packed weights, optional fused residual add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT32_MAX = 2**31 - 1


def quantize_act(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """Float activations -> int8 codes; scale / zp are () or (B,) (per sample along dim 0)."""
    shape = [-1] + [1] * (x.dim() - 1)
    s = scale.reshape(shape) if scale.dim() else scale
    z = zp.reshape(shape) if zp.dim() else zp
    return torch.clamp(torch.round(x.float() * (1.0 / s.float())) + z.float(), qmin, qmax).to(torch.int8)


def requantize(y: torch.Tensor, out_scale: torch.Tensor | None, out_zp: torch.Tensor | None, qmin: int = -128,
               qmax: int = 127) -> torch.Tensor:
    """The requantizing epilogue: float32 ``y`` -> int8 codes of the consumer's range (per tensor
    or per sample along dim 0); ``y`` unchanged when ``out_scale`` is None."""
    if out_scale is None:
        return y
    return quantize_act(y, out_scale, out_zp, qmin, qmax)


def _check_int32(acc: torch.Tensor) -> torch.Tensor:
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(acc) or torch.compiler.is_compiling():
        return acc.to(torch.int32)  # traced (shapes only): the overflow check is data-dependent
    if acc.numel() and acc.abs().max() > INT32_MAX:
        raise OverflowError("int8 accumulation overflows int32: K is too large for exact int32 accumulation")
    return acc.to(torch.int32)


def _rows(v: torch.Tensor, batch: int, rows_per_sample: int) -> torch.Tensor:
    """A () or (B,) per-sample value as a (M, 1) per-row column."""
    if v.dim() == 0:
        return v.reshape(1, 1).expand(batch * rows_per_sample, 1)
    return v.reshape(-1, 1).repeat_interleave(rows_per_sample, dim=0)


def int8_linear_acc(xq: torch.Tensor, x_zp: torch.Tensor, wq: torch.Tensor, rows_per_sample: int | None = None) -> torch.Tensor:
    """int32 accumulator of an int8 linear. xq (M, K) int8, wq (N, K) int8 -> (M, N) int32."""
    M = xq.shape[0]
    rps = rows_per_sample or (M if x_zp.dim() == 0 else M // x_zp.numel())
    acc = xq.long() @ wq.long().T - _rows(x_zp.long(), M // rps if rps else 0, rps) * wq.long().sum(1)[None]
    return _check_int32(acc)


def epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             rows_per_sample: int) -> torch.Tensor:
    M = acc.shape[0]
    out = acc.float() * (_rows(x_scale.float(), M // rows_per_sample, rows_per_sample) * w_scale.float()[None])
    return out + bias.float()[None] if bias is not None else out


def int8_linear(x: torch.Tensor, x_scale, x_zp, wq, w_scale, bias=None, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """Float in: quantize x (.., K), int8 GEMM with int32 accumulation, dequant + bias. float32 out."""
    return linear_q(quantize_act(x, x_scale, x_zp, qmin, qmax), x_scale, x_zp, wq.T, wq.int().sum(1), w_scale, bias)


def linear_q(xq: torch.Tensor, x_scale, x_zp, wp: torch.Tensor, w_sum: torch.Tensor, w_scale, bias=None,
             residual=None) -> torch.Tensor:
    """The lowered linear: xq (.., K) int8 codes, packed wp (K, N) -> float32 (.., N)."""
    lead, K = xq.shape[:-1], xq.shape[-1]
    x2 = xq.reshape(-1, K)
    rps = x2.shape[0] // x_scale.numel() if x_scale.dim() else x2.shape[0]
    acc = x2.long() @ wp.long() - _rows(x_zp.long(), x2.shape[0] // rps if rps else 0, rps) * w_sum.long()[None]
    out = epilogue(_check_int32(acc), x_scale, w_scale, bias, rps).reshape(*lead, wp.shape[1])
    return out + residual.float() if residual is not None else out


def conv2d_q(xq: torch.Tensor, x_scale, x_zp, wp: torch.Tensor, w_sum: torch.Tensor, w_scale, bias, residual,
             kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """The lowered conv: xq (B, C, H, W) int8 codes (any strides), packed wp (KH*KW*C, N) ->
    float32 (B, N, OH, OW) in channels-last memory (the Triton kernel's NHWC output, viewed NCHW)."""
    B = xq.shape[0]
    cols, OH, OW = im2col_nhwc(xq.permute(0, 2, 3, 1), kh, kw, stride, padding, x_zp)
    acc = cols @ wp.long() - _rows(x_zp.long(), B, OH * OW) * w_sum.long()[None]
    out = epilogue(_check_int32(acc), x_scale, w_scale, bias, OH * OW).reshape(B, OH, OW, -1).permute(0, 3, 1, 2)
    if residual is not None:
        out = out + residual.float()
    return out.contiguous(memory_format=torch.channels_last)


def im2col_nhwc(xq: torch.Tensor, kh: int, kw: int, stride: int, padding: int, pad_value: torch.Tensor) -> torch.Tensor:
    """int8 NHWC (B, H, W, C) -> (B*OH*OW, KH*KW*C) columns (k index = (i*KW + j)*C + c); padded
    positions hold the sample's zero point (the integer code of 0.0)."""
    B, H, W, C = xq.shape
    xp = torch.empty((B, H + 2 * padding, W + 2 * padding, C), dtype=torch.int64)
    xp[:] = (pad_value.reshape(-1, 1, 1, 1) if pad_value.dim() else pad_value).long()
    xp[:, padding:padding + H, padding:padding + W] = xq.long()
    OH, OW = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    cols = []
    for i in range(kh):
        for j in range(kw):
            cols.append(xp[:, i:i + stride * (OH - 1) + 1:stride, j:j + stride * (OW - 1) + 1:stride, :])
    return torch.cat(cols, dim=-1).reshape(B * OH * OW, kh * kw * C), OH, OW


def pack_conv_weight(wq: torch.Tensor) -> torch.Tensor:
    """(OC, C, KH, KW) -> (OC, KH*KW*C), the k order of ``im2col_nhwc``."""
    return wq.permute(0, 2, 3, 1).reshape(wq.shape[0], -1).contiguous()


def int8_conv2d_acc(xq_nhwc: torch.Tensor, x_zp: torch.Tensor, wq: torch.Tensor, stride: int, padding: int) -> tuple[torch.Tensor, int, int]:
    OC, C, KH, KW = wq.shape
    cols, OH, OW = im2col_nhwc(xq_nhwc, KH, KW, stride, padding, x_zp)
    return int8_linear_acc(cols.to(torch.int8), x_zp, pack_conv_weight(wq), OH * OW), OH, OW


def int8_conv2d(x: torch.Tensor, x_scale, x_zp, wq, w_scale, bias=None, stride: int = 1, padding: int = 0,
                qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """Float NCHW in: quantize -> int8 implicit-GEMM conv -> dequant + bias -> float32 (channels-last memory)."""
    wp = pack_conv_weight(wq)
    return conv2d_q(quantize_act(x, x_scale, x_zp, qmin, qmax), x_scale, x_zp, wp.T, wp.int().sum(1), w_scale, bias,
                    None, wq.shape[2], wq.shape[3], stride, padding)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A () or (B,) value shaped to broadcast against a (B, ..) tensor of ``ndim`` dims."""
    return v.reshape([-1] + [1] * (ndim - 1)) if v.dim() else v


def int8_matmul_acc(aq: torch.Tensor, a_zp: torch.Tensor, bq: torch.Tensor, b_zp: torch.Tensor) -> torch.Tensor:
    """int32 accumulator of an activation x activation int8 matmul: sum_k (a - za)(b - zb)."""
    za, zb = _per_sample(a_zp.long(), aq.dim()), _per_sample(b_zp.long(), bq.dim())
    return _check_int32((aq.long() - za) @ (bq.long() - zb))


def matmul_q(aq: torch.Tensor, a_scale, a_zp, bq: torch.Tensor, b_scale, b_zp) -> torch.Tensor:
    """The lowered attention matmul: int8 codes of both operands -> float32."""
    acc = int8_matmul_acc(aq, a_zp, bq, b_zp)
    return acc.float() * (_per_sample(a_scale.float(), aq.dim()) * _per_sample(b_scale.float(), bq.dim()))


def int8_matmul(a: torch.Tensor, a_scale, a_zp, b: torch.Tensor, b_scale, b_zp, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """Both operands activations (attention): (.., M, K) @ (.., K, N), per-tensor or per-sample ranges."""
    return matmul_q(quantize_act(a, a_scale, a_zp, qmin, qmax), a_scale, a_zp, quantize_act(b, b_scale, b_zp, qmin, qmax),
                    b_scale, b_zp)
