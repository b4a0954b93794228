"""The lowered graph's ops, registered with torch.library so torch.export / torch.compile see
them with shapes (fake kernels) and dispatch by device:

    ptq4dm::qlinear(x, x_scale, x_zp, wq, w_scale, bias, qmin, qmax)
    ptq4dm::qconv2d(x, x_scale, x_zp, wq, w_scale, bias, stride, padding, qmin, qmax)
    ptq4dm::qmatmul(a, a_scale, a_zp, b, b_scale, b_zp, qmin, qmax)

Each takes *float* activations with their solved range (x_scale / x_zp: () or per-sample (B,)),
quantizes them, runs an int8 x int8 -> int32 product and dequantizes in the epilogue; weights
are pre-packed int8 with per-output-channel scales. CPU: the integer-exact reference
(backends/reference.py). CUDA: the Triton kernels (backends/triton_kernels.py); the conv goes
through NHWC, the attention matmul through a batched int8 kernel.
"""

from __future__ import annotations

import torch

from . import reference as ref


def _use_triton(x: torch.Tensor) -> bool:
    from .triton_kernels import HAVE_TRITON

    return x.is_cuda and HAVE_TRITON


@torch.library.custom_op("ptq4dm::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    if _use_triton(x):
        from .triton_kernels import int8_gemm

        lead, K = x.shape[:-1], x.shape[-1]
        xq = ref.quantize_act(x, x_scale, x_zp, qmin, qmax).reshape(-1, K)
        rps = xq.shape[0] // x_scale.numel() if x_scale.dim() else xq.shape[0]
        out = int8_gemm(xq, x_zp, x_scale, wq.T, wq.int().sum(1), w_scale, bias, rows_per_sample=rps)
        return out.reshape(*lead, wq.shape[0]).to(x.dtype)
    return ref.int8_linear(x, x_scale, x_zp, wq, w_scale, bias, qmin, qmax).to(x.dtype)


@qlinear.register_fake
def _(x, x_scale, x_zp, wq, w_scale, bias, qmin, qmax):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@torch.library.custom_op("ptq4dm::qconv2d", mutates_args=())
def qconv2d(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, stride: int, padding: int, qmin: int, qmax: int) -> torch.Tensor:
    if _use_triton(x):
        from .triton_kernels import int8_conv2d_nhwc

        xq = ref.quantize_act(x, x_scale, x_zp, qmin, qmax).permute(0, 2, 3, 1).contiguous()
        wp = ref.pack_conv_weight(wq)
        out = int8_conv2d_nhwc(xq, x_zp, x_scale, wp.T.contiguous(), wp.int().sum(1), w_scale, bias,
                               wq.shape[2], wq.shape[3], stride, padding)
        return out.permute(0, 3, 1, 2).contiguous().to(x.dtype)
    return ref.int8_conv2d(x, x_scale, x_zp, wq, w_scale, bias, stride, padding, qmin, qmax).contiguous().to(x.dtype)


@qconv2d.register_fake
def _(x, x_scale, x_zp, wq, w_scale, bias, stride, padding, qmin, qmax):
    B, _, H, W = x.shape
    OH = (H + 2 * padding - wq.shape[2]) // stride + 1
    OW = (W + 2 * padding - wq.shape[3]) // stride + 1
    return x.new_empty((B, wq.shape[0], OH, OW))


@torch.library.custom_op("ptq4dm::qmatmul", mutates_args=())
def qmatmul(a: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
            b_zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    if _use_triton(a):
        from .triton_kernels import int8_bmm

        aq, bq = ref.quantize_act(a, a_scale, a_zp, qmin, qmax), ref.quantize_act(b, b_scale, b_zp, qmin, qmax)
        return int8_bmm(aq, a_zp, a_scale, bq, b_zp, b_scale).to(a.dtype)
    return ref.int8_matmul(a, a_scale, a_zp, b, b_scale, b_zp, qmin, qmax).to(a.dtype)


@qmatmul.register_fake
def _(a, a_scale, a_zp, b, b_scale, b_zp, qmin, qmax):
    return a.new_empty((*a.shape[:-1], b.shape[-1]))
