"""oneDNN int8 conv on a CPU without VNNI: u8 x s8 pairs summed in int16 saturate. One 3x3 conv,
full-range codes, compiled (Inductor, freezing) vs the same q/dq graph run eagerly in float;
prints C_in, max |difference|, max |output|, their ratio. (docs/results/details.md, "Lowering")

    python docs/results/x86/saturation.py
"""
import torch, sys
torch.set_num_threads(1)
import torch._inductor.config as ic; ic.freezing = True
import torch.ao.quantization.fx._decomposed
qd = torch.ops.quantized_decomposed
g = torch.Generator().manual_seed(0)
class M(torch.nn.Module):
    def __init__(s, cin, cout):
        super().__init__()
        s.register_buffer("wq", torch.randint(-127, 128, (cout, cin, 3, 3), generator=g, dtype=torch.int8))
        s.register_buffer("ws", torch.rand(cout, generator=g) * 0.01 + 1e-3); s.register_buffer("wz", torch.zeros(cout, dtype=torch.int64))
    def forward(s, x):
        xq = qd.quantize_per_tensor.default(x, 0.05, 128, 0, 255, torch.uint8)
        xd = qd.dequantize_per_tensor.default(xq, 0.05, 128, 0, 255, torch.uint8)
        wd = qd.dequantize_per_channel.default(s.wq, s.ws, s.wz, 0, -128, 127, torch.int8)
        return torch.nn.functional.conv2d(xd, wd, None, 1, 1)
for cin in (8, 64):
    m = M(cin, 32).eval(); x = torch.randn(2, cin, 8, 8) * 4
    with torch.no_grad():
        ref = m(x); out = torch.compile(m)(x)
    rel = (out - ref).abs().max() / ref.abs().max()
    print(cin, float((out-ref).abs().max()), float(ref.abs().max()), float(rel))
