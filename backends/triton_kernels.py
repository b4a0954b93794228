"""Triton int8 kernels: an int8 GEMM, an implicit-GEMM convolution (channels-last) and a batched
activation x activation matmul (attention), all accumulating in int32 with a fused epilogue
(zero-point correction, per-channel weight scale x per-row activation scale, bias, and the
graph's residual add when the lower pass fused one, and a requantization to the consumer's
int8 range when the consumer wants int8). Tested on the CPU under ``TRITON_INTERPRET=1`` against
backends/reference.py (same conventions, documented there).

Kernel, launcher and reference side by side, as in Triton's tutorials. On CUDA the launchers use
the same kernels wrapped in ``triton.autotune`` over ``TUNE_CONFIGS`` (block shapes, warps,
pipeline stages), keyed by the problem size, unless a block size is passed or
``PTQ4DM_TRITON_AUTOTUNE=0``; the interpreter (the CPU tests) launches the plain kernels with the
launchers' block sizes (16 by default).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # triton is an optional (test / GPU) dependency
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _row_qparams(scale_ptr, zp_ptr, offs_m, mask_m, rows_per_sample, PER_SAMPLE: tl.constexpr):
        """(scale, zero point) of every row: one per sample (row // rows_per_sample) or one for all."""
        idx = offs_m // rows_per_sample if PER_SAMPLE else offs_m * 0
        return (tl.load(scale_ptr + idx, mask=mask_m, other=1.0), tl.load(zp_ptr + idx, mask=mask_m, other=0))

    @triton.jit
    def _epilogue(acc, offs_m, offs_n, M, N, rows_per_sample, x_zp_ptr, x_scale_ptr, w_sum_ptr, w_scale_ptr,
                  bias_ptr, res_ptrs, PER_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
        mask_m, mask_n = offs_m < M, offs_n < N
        sx, zp = _row_qparams(x_scale_ptr, x_zp_ptr, offs_m, mask_m, rows_per_sample, PER_SAMPLE)
        wsum = tl.load(w_sum_ptr + offs_n, mask=mask_n, other=0)
        acc = acc - zp[:, None] * wsum[None, :]
        sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * (sx[:, None] * sw[None, :])
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_RES:  # the graph's residual add, fused: one read instead of a write + read + write
            out += tl.load(res_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        return acc, out

    @triton.jit
    def _requant(out, offs_m, mask_m, rows_per_sample, o_scale_ptr, o_zp_ptr, qmin, qmax, OUT_PER_SAMPLE: tl.constexpr):
        """float32 -> int8 codes of the consumer's range: clamp(round(out * (1/s)) + z, qmin, qmax),
        round half to even like torch.round. The rounding adds and subtracts 1.5 * 2**23 (exact
        for |v| < 2**22; the clamp before it keeps v there and keeps the compiler from fusing the
        multiply into the add, which would round differently from the reference)."""
        s, z = _row_qparams(o_scale_ptr, o_zp_ptr, offs_m, mask_m, rows_per_sample, OUT_PER_SAMPLE)
        v = out * (1.0 / s)[:, None]
        v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
        v = (v + 12582912.0) - 12582912.0
        v = v + z[:, None].to(tl.float32)
        return tl.minimum(tl.maximum(v, qmin), qmax).to(tl.int8)

    @triton.jit
    def int8_gemm_kernel(a_ptr, b_ptr, out_ptr, acc_ptr, M, N, K, rows_per_sample,
                         x_zp_ptr, x_scale_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, res_ptr,
                         o_scale_ptr, o_zp_ptr, out_qmin, out_qmax,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rn,
                         PER_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, WRITE_ACC: tl.constexpr,
                         QUANT_OUT: tl.constexpr, OUT_PER_SAMPLE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[M, N] = dequant(A[M, K] int8 @ B[K, N] int8) with the epilogue above."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0)
            b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
        res_ptrs = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc, out = _epilogue(acc, offs_m, offs_n, M, N, rows_per_sample, x_zp_ptr, x_scale_ptr, w_sum_ptr,
                             w_scale_ptr, bias_ptr, res_ptrs, PER_SAMPLE, HAS_BIAS, HAS_RES)
        if QUANT_OUT:
            out = _requant(out, offs_m, offs_m < M, rows_per_sample, o_scale_ptr, o_zp_ptr, out_qmin, out_qmax,
                           OUT_PER_SAMPLE)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)
        if WRITE_ACC:
            tl.store(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)

    @triton.jit
    def int8_conv_kernel(x_ptr, w_ptr, out_ptr, acc_ptr, B, H, W, C, OH, OW, N, K,
                         x_zp_ptr, x_scale_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, res_ptr,
                         o_scale_ptr, o_zp_ptr, out_qmin, out_qmax,
                         sxb, sxc, sxh, sxw, srb, src, srh, srw,
                         STRIDE: tl.constexpr, PAD: tl.constexpr, KW: tl.constexpr,
                         PER_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, WRITE_ACC: tl.constexpr,
                         QUANT_OUT: tl.constexpr, OUT_PER_SAMPLE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Implicit-GEMM conv: rows m = (b, oh, ow), columns n = output channel, reduction
        k = (i*KW + j)*C + c over the packed weight (K, N). Input int8 (B, C, H, W) addressed by
        its strides (channels-last memory makes the k loads contiguous); padded taps load the
        sample's zero point, so they contribute exactly 0 after the correction. Output (M, N),
        i.e. NHWC = channels-last NCHW; the optional residual is read by its own strides."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        M = B * OH * OW
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        b_idx = offs_m // (OH * OW)
        rem = offs_m % (OH * OW)
        oh, ow = rem // OW, rem % OW
        if PER_SAMPLE:
            zp_row = tl.load(x_zp_ptr + b_idx, mask=offs_m < M, other=0)
        else:
            zp_row = tl.load(x_zp_ptr + b_idx * 0, mask=offs_m < M, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            tap = kk // C
            c = kk % C
            i, j = tap // KW, tap % KW
            ih = oh[:, None] * STRIDE - PAD + i[None, :]
            iw = ow[:, None] * STRIDE - PAD + j[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            valid = (offs_m[:, None] < M) & (kk[None, :] < K)
            ptrs = x_ptr + b_idx[:, None] * sxb + ih * sxh + iw * sxw + c[None, :] * sxc
            a = tl.load(ptrs, mask=valid & inside, other=0)
            a = tl.where(valid & ~inside, zp_row[:, None].to(tl.int8), a)
            w = tl.load(w_ptr + kk[:, None] * N + offs_n[None, :], mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0)
            acc += tl.dot(a, w, out_dtype=tl.int32)
        res_ptrs = res_ptr + (b_idx * srb + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
        acc, out = _epilogue(acc, offs_m, offs_n, M, N, OH * OW, x_zp_ptr, x_scale_ptr, w_sum_ptr,
                             w_scale_ptr, bias_ptr, res_ptrs, PER_SAMPLE, HAS_BIAS, HAS_RES)
        if QUANT_OUT:
            out = _requant(out, offs_m, offs_m < M, OH * OW, o_scale_ptr, o_zp_ptr, out_qmin, out_qmax, OUT_PER_SAMPLE)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)
        if WRITE_ACC:
            tl.store(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


    @triton.jit
    def int8_bmm_kernel(a_ptr, b_ptr, out_ptr, acc_ptr, M, N, K, groups_per_sample,
                        a_zp_ptr, a_scale_ptr, b_zp_ptr, b_scale_ptr,
                        stride_ag, stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
                        WRITE_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[g] = dequant(A[g] (M, K) int8 @ B[g] (K, N) int8), both operands activations with
        one zero point / scale per sample (g // groups_per_sample). The zero points are corrected
        after the int8 dot from row sums of A and column sums of B accumulated in the same loop:
            sum_k (a - za)(b - zb) = sum_k ab - zb * sum_k a - za * sum_k b + K za zb."""
        pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        sample = g // groups_per_sample
        za = tl.load(a_zp_ptr + sample)
        zb = tl.load(b_zp_ptr + sample)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        col_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
        a_base = a_ptr + g.to(tl.int64) * stride_ag
        b_base = b_ptr + g.to(tl.int64) * stride_bg
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_base + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0)
            b = tl.load(b_base + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
            row_sum += tl.sum(a.to(tl.int32), axis=1)
            col_sum += tl.sum(b.to(tl.int32), axis=0)
        acc = acc - zb * row_sum[:, None] - za * col_sum[None, :] + K * za * zb
        out = acc.to(tl.float32) * (tl.load(a_scale_ptr + sample) * tl.load(b_scale_ptr + sample))
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + g.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)
        if WRITE_ACC:
            tl.store(acc_ptr + g.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)

    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small-M shapes (batch 1, time embedding)
    # to large implicit-GEMM convs; int8 tl.dot needs every block dimension >= 16
    TUNE_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                    for bm, bn, bk, w, s in [(16, 64, 128, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                                             (64, 128, 64, 4, 4), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
                                             (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]]
    int8_gemm_tuned = triton.autotune(TUNE_CONFIGS, key=["M", "N", "K"])(int8_gemm_kernel)
    int8_conv_tuned = triton.autotune(TUNE_CONFIGS, key=["B", "H", "W", "C", "N", "K"])(int8_conv_kernel)
    int8_bmm_tuned = triton.autotune(TUNE_CONFIGS, key=["M", "N", "K"])(int8_bmm_kernel)


def _launch(kernel):
    """``wrap_triton(kernel)``: a plain launch in eager mode; under torch.compile / make_fx (the
    ops are ``torch.library.triton_op``s) the launch is traced as a functional kernel call that
    Inductor schedules and fuses around."""
    return torch.library.wrap_triton(kernel)


def _need_triton():
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed: pip install triton (or ptq4dm[test])")


def _autotuned(x: torch.Tensor, block_m: int | None) -> bool:
    """Autotuned launch: on CUDA, unless block sizes were passed or PTQ4DM_TRITON_AUTOTUNE=0."""
    return x.is_cuda and block_m is None and os.environ.get("PTQ4DM_TRITON_AUTOTUNE", "1") != "0"


def _kernel_and_grid(x, block_m, block_n, block_k, plain, tuned, rows, cols, *extra):
    """(kernel, grid, block kwargs): the autotuned kernel with a grid read from the chosen config,
    or the plain kernel with the given (default 16) block sizes."""
    if _autotuned(x, block_m):
        return tuned, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), *extra), {}
    bm, bn, bk = block_m or 16, block_n or 16, block_k or 16
    return plain, (triton.cdiv(rows, bm), triton.cdiv(cols, bn), *extra), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def _vec(v: torch.Tensor, dtype, device) -> torch.Tensor:
    return v.reshape(-1).to(device=device, dtype=dtype).contiguous()


def _out_q(out_scale: torch.Tensor | None, out_zp: torch.Tensor | None, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """The requantizing epilogue's (scale, zero point) vectors; placeholders when there is none."""
    if out_scale is None:
        return torch.ones(1, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
    if out_zp is None:
        raise ValueError("out_scale given without out_zp: the requantizing epilogue needs both")
    return _vec(out_scale, torch.float32, dev), _vec(out_zp, torch.int32, dev)


def int8_gemm(xq: torch.Tensor, x_zp: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor,
              w_sum: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
              rows_per_sample: int | None = None, residual: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32, return_acc: bool = False,
              out_scale: torch.Tensor | None = None, out_zp: torch.Tensor | None = None, out_qmin: int = -128,
              out_qmax: int = 127, block_m: int | None = None, block_n: int | None = None,
              block_k: int | None = None):
    """xq (M, K) int8, w_packed (K, N) int8 -> (M, N) in out_dtype [, int32 acc]; residual (M, N).
    With out_scale / out_zp (() or (B,)): int8 codes of that range instead (requantizing epilogue)."""
    _need_triton()
    M, K = xq.shape
    N = w_packed.shape[1]
    dev = xq.device
    per_sample = x_zp.dim() > 0
    quant_out = out_scale is not None
    out = torch.empty((M, N), dtype=torch.int8 if quant_out else out_dtype, device=dev)
    acc = torch.empty((M, N), dtype=torch.int32, device=dev) if return_acc else out
    res = residual if residual is not None else out
    kernel, grid, blocks = _kernel_and_grid(xq, block_m, block_n, block_k, int8_gemm_kernel, int8_gemm_tuned, M, N)
    _launch(kernel)[grid](xq, w_packed, out, acc, M, N, K, rows_per_sample or M,
                           _vec(x_zp, torch.int32, dev), _vec(x_scale, torch.float32, dev), _vec(w_sum, torch.int32, dev),
                           _vec(w_scale, torch.float32, dev), bias if bias is not None else out, res,
                           *_out_q(out_scale, out_zp, dev), out_qmin, out_qmax,
                           xq.stride(0), xq.stride(1), w_packed.stride(0), w_packed.stride(1), res.stride(0), res.stride(1),
                           PER_SAMPLE=per_sample, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                           WRITE_ACC=return_acc, QUANT_OUT=quant_out, OUT_PER_SAMPLE=quant_out and out_scale.dim() > 0,
                           **blocks)
    return (out, acc) if return_acc else out


def int8_conv2d(xq: torch.Tensor, x_zp: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor,
                w_sum: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, kh: int, kw: int,
                stride: int = 1, padding: int = 0, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32, return_acc: bool = False,
                out_scale: torch.Tensor | None = None, out_zp: torch.Tensor | None = None, out_qmin: int = -128,
                out_qmax: int = 127, block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None):
    """xq (B, C, H, W) int8 (any strides; channels-last is the fast layout), w_packed (KH*KW*C, N)
    -> (B, N, OH, OW) in channels-last memory [, int32 acc (M, N)]; residual (B, N, OH, OW).
    With out_scale / out_zp (() or (B,)): int8 codes of that range instead (requantizing epilogue)."""
    _need_triton()
    B, C, H, W = xq.shape
    N, K = w_packed.shape[1], w_packed.shape[0]
    OH, OW = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    M = B * OH * OW
    dev = xq.device
    quant_out = out_scale is not None
    out = torch.empty((M, N), dtype=torch.int8 if quant_out else out_dtype, device=dev)
    acc = torch.empty((M, N), dtype=torch.int32, device=dev) if return_acc else out
    res = residual if residual is not None else out.view(B, OH, OW, N).permute(0, 3, 1, 2)
    kernel, grid, blocks = _kernel_and_grid(xq, block_m, block_n, block_k, int8_conv_kernel, int8_conv_tuned, M, N)
    _launch(kernel)[grid](xq, w_packed, out, acc, B, H, W, C, OH, OW, N, K,
                           _vec(x_zp, torch.int32, dev), _vec(x_scale, torch.float32, dev), _vec(w_sum, torch.int32, dev),
                           _vec(w_scale, torch.float32, dev), bias if bias is not None else out, res,
                           *_out_q(out_scale, out_zp, dev), out_qmin, out_qmax,
                           *xq.stride(), *res.stride(),
                           STRIDE=stride, PAD=padding, KW=kw, PER_SAMPLE=x_zp.dim() > 0, HAS_BIAS=bias is not None,
                           HAS_RES=residual is not None, WRITE_ACC=return_acc,
                           QUANT_OUT=quant_out, OUT_PER_SAMPLE=quant_out and out_scale.dim() > 0,
                           **blocks)
    out = out.view(B, OH, OW, N).permute(0, 3, 1, 2)
    return (out, acc) if return_acc else out


def int8_bmm(aq: torch.Tensor, a_zp: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_zp: torch.Tensor,
             b_scale: torch.Tensor, out_dtype: torch.dtype = torch.float32, return_acc: bool = False,
             block_m: int | None = None, block_n: int | None = None, block_k: int | None = None):
    """aq (.., M, K) int8 @ bq (.., K, N) int8 -> float32 (.., M, N) [, int32 acc]; the leading dims
    start with the batch; a_zp / a_scale / b_zp / b_scale are () or (B,) (one per sample)."""
    _need_triton()
    lead, (M, K), N = aq.shape[:-2], aq.shape[-2:], bq.shape[-1]
    if bq.shape[:-2] != lead or bq.shape[-2] != K:
        raise ValueError(f"int8_bmm: shapes {tuple(aq.shape)} @ {tuple(bq.shape)} do not match")
    G = 1
    for d in lead:
        G *= d
    B = lead[0] if lead else 1
    dev = aq.device
    a3, b3 = aq.reshape(G, M, K), bq.reshape(G, K, N)

    def per_sample(v, dtype):
        return _vec(v, dtype, dev).expand(B).contiguous() if v.dim() == 0 else _vec(v, dtype, dev)

    out = torch.empty((G, M, N), dtype=out_dtype, device=dev)
    acc = torch.empty((G, M, N), dtype=torch.int32, device=dev) if return_acc else out
    kernel, grid, blocks = _kernel_and_grid(aq, block_m, block_n, block_k, int8_bmm_kernel, int8_bmm_tuned, M, N, G)
    _launch(kernel)[grid](a3, b3, out, acc, M, N, K, max(1, G // B),
                          per_sample(a_zp, torch.int32), per_sample(a_scale, torch.float32),
                          per_sample(b_zp, torch.int32), per_sample(b_scale, torch.float32),
                          a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
                          WRITE_ACC=return_acc, **blocks)
    out = out.reshape(*lead, M, N)
    return (out, acc.reshape(*lead, M, N)) if return_acc else out
