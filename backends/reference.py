"""Integer-exact CPU reference of every lowered op: the oracle the Triton kernels are tested
against, and the CPU implementation of the lowered graph.

Conventions (shared with backends/triton_kernels.py):

* activations: int8 codes ``xq`` with zero point ``x_zp`` and scale ``x_scale``; either one
  value for the whole tensor or one per sample (per-timestep ranges): shape () or (B,)
* weights: int8 codes ``wq`` (N, K) for linear, (OC, C, KH, KW) for conv, symmetric per output
  channel (zero point 0), scales ``w_scale`` (N,)
* accumulation in int32 (done here in int64, then checked to fit):
      acc[m, n] = sum_k xq[m, k] * wq[n, k] - x_zp[m] * sum_k wq[n, k]
* epilogue: ``out = acc * (x_scale[m] * w_scale[n]) + bias[n]`` in float32
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


def _check_int32(acc: torch.Tensor) -> torch.Tensor:
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
    """Quantize x (.., K), int8 GEMM with int32 accumulation, dequant + bias epilogue. float32 out."""
    lead = x.shape[:-1]
    xq = quantize_act(x, x_scale, x_zp, qmin, qmax).reshape(-1, x.shape[-1])
    rps = xq.shape[0] // x_scale.numel() if x_scale.dim() else xq.shape[0]  # rows per sample
    acc = int8_linear_acc(xq, x_zp, wq, rps)
    return epilogue(acc, x_scale, w_scale, bias, rps).reshape(*lead, wq.shape[0])


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
    """NCHW float in -> quantize -> int8 implicit-GEMM conv (NHWC) -> dequant + bias -> NCHW float32 out."""
    B = x.shape[0]
    xq = quantize_act(x, x_scale, x_zp, qmin, qmax).permute(0, 2, 3, 1).contiguous()
    acc, OH, OW = int8_conv2d_acc(xq, x_zp, wq, stride, padding)
    out = epilogue(acc, x_scale, w_scale, bias, OH * OW)
    return out.reshape(B, OH, OW, -1).permute(0, 3, 1, 2)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A () or (B,) value shaped to broadcast against a (B, ..) tensor of ``ndim`` dims."""
    return v.reshape([-1] + [1] * (ndim - 1)) if v.dim() else v


def int8_matmul_acc(aq: torch.Tensor, a_zp: torch.Tensor, bq: torch.Tensor, b_zp: torch.Tensor) -> torch.Tensor:
    """int32 accumulator of an activation x activation int8 matmul: sum_k (a - za)(b - zb)."""
    za, zb = _per_sample(a_zp.long(), aq.dim()), _per_sample(b_zp.long(), bq.dim())
    return _check_int32((aq.long() - za) @ (bq.long() - zb))


def int8_matmul(a: torch.Tensor, a_scale, a_zp, b: torch.Tensor, b_scale, b_zp, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """Both operands activations (attention): (.., M, K) @ (.., K, N), per-tensor or per-sample ranges."""
    acc = int8_matmul_acc(quantize_act(a, a_scale, a_zp, qmin, qmax), a_zp, quantize_act(b, b_scale, b_zp, qmin, qmax), b_zp)
    return acc.float() * (_per_sample(a_scale.float(), a.dim()) * _per_sample(b_scale.float(), b.dim()))
