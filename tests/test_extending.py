"""The worked example in docs/extending.md runs as written."""

import re
from pathlib import Path

import torch

import ptq4dm
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import NDTC, PASS_REGISTRY

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def test_worked_example_from_the_docs(tiny_unet):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    PASS_REGISTRY.pop("keep_tiny_gemms_float", None)
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_extending"})
    assert "keep_tiny_gemms_float" in PASS_REGISTRY
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=5)).eval()
    base = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=8), progress=False)
    res = ptq4dm.quantize(step, calibration=NDTC(n=8), progress=False,
                          pipeline="decompose_attention,mark,keep_tiny_gemms_float{min_out_channels=8},"
                                   "observe,calibrate,solve,fakequant")
    # e.g. the tiny UNet's conv_out (N = 1) and conv_in (K = 9) stay float: 2 tensors each fewer
    tiny = [n for n in base.fp_graph.graph.nodes
            if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
            and (n.args[1].meta["val"].shape[0] < 8 or n.args[1].meta["val"][0].numel() < 16)]
    assert len(tiny) >= 2
    assert len(res.report.tensors) == len(base.report.tensors) - 2 * len(tiny)
    x, t, n = torch.randn(2, 1, 8, 8), torch.tensor([800, 0]), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = res.graph(x, t, n)
    assert torch.isfinite(out.prev_sample).all()
