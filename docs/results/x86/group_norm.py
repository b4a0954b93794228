"""(docs/results/x86/group_norm.py) GroupNorm + SiLU of a bf16 channels-last activation under CPU autocast (as in the
int8-mixed-bf16 step), compiled by Inductor: aten's group_norm against ``ptq4dm.group_norm_cl`` (lower{gn_channels_last},
backends/x86.py). Interleaved, two rounds of 50 calls each, the second printed; the max abs difference to fp32 eager.

    python docs/results/x86/group_norm.py
"""
import sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from ptq4dm.backends.x86 import GN_CL  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
fs = {"aten": lambda x, w, b, G: F.silu(F.group_norm(x, G, w, b, 1e-6)),
      "group_norm_cl": lambda x, w, b, G: F.silu(GN_CL(x, G, w, b, 1e-6))}
# ddpm-cifar10 at batch 8 (4 / 8 / 12 channels per group), the default model at batch 64 (12), batch 1
for (N, C, H, W, G) in [(8, 128, 32, 32, 32), (8, 256, 32, 32, 32), (8, 256, 16, 16, 32), (8, 384, 32, 32, 32),
                        (64, 96, 14, 14, 8), (64, 192, 7, 7, 8), (1, 128, 32, 32, 32)]:
    torch._dynamo.reset()
    x = (torch.randn(N, C, H, W) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C), torch.randn(C)
    cf = {k: torch.compile(f) for k, f in fs.items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = fs["aten"](x.float(), w, b, G)
        errs = {k: round((f(x, w, b, G).float() - ref).abs().max().item(), 4) for k, f in cf.items()}
        res = {}
        for _ in range(2):
            for name, f in cf.items():
                for _ in range(3):
                    f(x, w, b, G)
                t0 = time.perf_counter()
                for _ in range(50):
                    f(x, w, b, G)
                res[name] = (time.perf_counter() - t0) / 50 * 1e3
    print(f"{(N, C, H, W)} groups {G}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()),
          f"({res['aten'] / res['group_norm_cl']:.2f}x); max |diff| to fp32 {errs}", flush=True)
