#!/usr/bin/env python
"""The Triton int8 kernels alone, at the DDPM CIFAR-10 UNet's shapes, beside what a float model
runs there (cuDNN bf16 channels-last conv, cuBLAS bf16 matmul) and cuBLAS int8 (torch._int_mm):

    python tools/kernel_bench.py --batches 64,256 --out-json runs/kernels.json     # on a GPU

For every shape: the fixed 16x16x16-block launch (the interpreter tests' default), the autotuned
launch (``triton.autotune`` over ``TUNE_CONFIGS``; the winning config is recorded), and the
float / int8 library calls on the same sizes; milliseconds are medians of
``triton.testing.do_bench``; TOPS count 2*M*N*K. Each row is written as soon as it is measured
(JSON list + Markdown table beside it). Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_json, atomic_write_text  # noqa: E402

# (kind, C_in / K, C_out / N, H (conv) or tokens per sample (linear / bmm), kernel size)
CIFAR_SHAPES = [
    ("conv", 128, 128, 32, 3),   # level 0 resnet conv
    ("conv", 256, 256, 16, 3),   # level 1 resnet conv (attention level)
    ("conv", 256, 256, 8, 3),    # level 2
    ("conv", 512, 256, 16, 3),   # up path: skip concatenated
    ("conv", 384, 128, 32, 1),   # up path 1x1 skip conv
    ("linear", 256, 768, 256, 0),  # attention q / k / v (fused width), 16x16 tokens
    ("bmm", 256, 256, 256, 0),   # attention scores q @ k^T: (tokens x C) @ (C x tokens)
]


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure(kind: str, cin: int, cout: int, h: int, ks: int, batch: int, dev) -> dict:
    from ptq4dm.backends import triton_kernels as TK

    g = torch.Generator(device=dev).manual_seed(0)

    def codes(*shape):
        return torch.randint(-127, 128, shape, generator=g, device=dev, dtype=torch.int8)

    row = {"kind": kind, "batch": batch, "c_in": cin, "c_out": cout, "h": h, "ks": ks}
    if kind == "conv":
        x = codes(batch, cin, h, h).contiguous(memory_format=torch.channels_last)
        wq = codes(cout, cin, ks, ks)
        wp = wq.permute(0, 2, 3, 1).reshape(cout, -1).T.contiguous()
        zp, sx = torch.tensor(3, dtype=torch.int32, device=dev), torch.tensor(0.02, device=dev)
        wsum, sw, bias = wp.int().sum(0), torch.rand(cout, device=dev) * 0.01, torch.randn(cout, device=dev)
        M, N, K = batch * h * h, cout, cin * ks * ks
        pad = ks // 2
        int8 = {"blocks16": lambda: TK.int8_conv2d(x, zp, sx, wp, wsum, sw, bias, ks, ks, 1, pad, block_m=16, block_n=16, block_k=16),
                "autotuned": lambda: TK.int8_conv2d(x, zp, sx, wp, wsum, sw, bias, ks, ks, 1, pad)}
        xf = torch.randn(batch, cin, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        wf = torch.randn(cout, cin, ks, ks, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        bf = torch.randn(cout, device=dev, dtype=torch.bfloat16)
        lib = {"bf16 cuDNN conv": lambda: torch.nn.functional.conv2d(xf, wf, bf, padding=pad)}
        tuned = TK.int8_conv_tuned
    elif kind == "linear":
        M, N, K = batch * h, cout, cin
        xq, wp = codes(M, K), codes(K, N)
        zp, sx = torch.tensor(3, dtype=torch.int32, device=dev), torch.tensor(0.02, device=dev)
        wsum, sw, bias = wp.int().sum(0), torch.rand(N, device=dev) * 0.01, torch.randn(N, device=dev)
        int8 = {"blocks16": lambda: TK.int8_gemm(xq, zp, sx, wp, wsum, sw, bias, block_m=16, block_n=16, block_k=16),
                "autotuned": lambda: TK.int8_gemm(xq, zp, sx, wp, wsum, sw, bias)}
        xf, wf = torch.randn(M, K, device=dev, dtype=torch.bfloat16), torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        wt = wp.T.contiguous().T   # (K, N) column-major: what _int_mm wants for its second operand
        lib = {"bf16 cuBLAS linear": lambda: torch.nn.functional.linear(xf, wf),
               "int8 cuBLAS _int_mm": lambda: torch._int_mm(xq, wt)}
        tuned = TK.int8_gemm_tuned
    else:   # bmm: batch x (tokens, C) @ (C, tokens)
        M, N, K = h, h, cin
        a, b = codes(batch, 1, M, K), codes(batch, 1, K, N)
        za = torch.full((batch,), 2, dtype=torch.int32, device=dev)
        sa = torch.full((batch,), 0.01, device=dev)
        int8 = {"blocks16": lambda: TK.int8_bmm(a, za, sa, b, za, sa, block_m=16, block_n=16, block_k=16),
                "autotuned": lambda: TK.int8_bmm(a, za, sa, b, za, sa)}
        af = torch.randn(batch, M, K, device=dev, dtype=torch.bfloat16)
        bf = torch.randn(batch, K, N, device=dev, dtype=torch.bfloat16)
        lib = {"bf16 cuBLAS bmm": lambda: torch.bmm(af, bf)}
        tuned = TK.int8_bmm_tuned
        M = batch * M   # for the op count
    row.update(M=M, N=N, K=K)
    ops = 2 * M * N * K
    for name, fn in {**int8, **lib}.items():
        try:
            ms = _bench(fn)
            row[name] = {"ms": ms, "tops": ops / ms / 1e9}
        except Exception as e:   # recorded, not hidden
            row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    best = getattr(tuned, "best_config", None)
    row["autotuned_config"] = str(best) if best is not None else None
    return row


def _md(rows: list[dict], header: str) -> str:
    cols = ["blocks16", "autotuned", "bf16 cuDNN conv", "bf16 cuBLAS linear", "bf16 cuBLAS bmm", "int8 cuBLAS _int_mm"]
    lines = [header, "", "| shape | batch | M x N x K | " + " | ".join(cols) + " | autotuned config |",
             "|---|---|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        shape = (f"conv {r['c_in']}->{r['c_out']} {r['ks']}x{r['ks']} @ {r['h']}x{r['h']}" if r["kind"] == "conv"
                 else f"{r['kind']} {r['c_in']}->{r['c_out']} ({r['h']} tokens)")
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"failed: {v['error'][:40]}" if "error" in v else
                                               f"{v['ms']:.3f} ms ({v['tops']:.0f} TOPS)"))
        lines.append(f"| {shape} | {r['batch']} | {r['M']} x {r['N']} x {r['K']} | " + " | ".join(cells)
                     + f" | {r['autotuned_config'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--out-json", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs CUDA: the kernels are timed on a GPU (their CPU correctness is tests/test_lowering.py)")
    import triton

    dev = torch.device("cuda")
    out = Path(args.out_json)
    header = (f"Device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{datetime.date.today().isoformat()}. Command: `python tools/kernel_bench.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for shape in CIFAR_SHAPES:
            rows.append(measure(*shape, batch, dev))
            atomic_write_json(out, rows)
            atomic_write_text(out.with_suffix(".md"), _md(rows, header))
            print(_md(rows[-1:], "").splitlines()[-1], flush=True)
    print(_md(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
