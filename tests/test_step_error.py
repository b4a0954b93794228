"""tools/step_error.py: teacher-forced per-step error of quantized steps against the FP step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptq4dm
from conftest import load_tool

REPO = Path(__file__).resolve().parent.parent
se = load_tool("step_error")


def _step(tiny_unet, steps=5):
    return ptq4dm.DiffusionStep(tiny_unet, ptq4dm.make_sampler("ddpm", num_inference_steps=steps)).eval()


def test_step_errors_measure_what_a_known_perturbation_adds(tiny_unet):
    """A step that adds delta to every pixel of x_{t-1} scores D delta^2 / (2 sigma_t^2) at each
    step with sigma_t > 0 (D pixels) and |delta| at the last, where sigma = 0; the FP step
    itself scores 0 everywhere. The chain follows the FP step, so errors do not compound."""
    step = _step(tiny_unet)
    delta = 0.01

    def shifted(x, t, noise):
        out = step(x, t, noise)
        return (out[0] + delta, out[1], out[2])

    x_T = torch.randn(step.sample_shape(3), generator=torch.Generator().manual_seed(0))
    var = {}
    errs = se.step_errors(step, {"same": step, "shifted": shifted}, step.sampler, x_T,
                          torch.Generator().manual_seed(1), variances=var)
    D = x_T[0].numel()
    sigma2 = step.sampler.var_small[step.sampler.timesteps]
    assert errs["same"] == [0.0] * 5
    assert var["reference"] == var["same"] == var["shifted"] == [float(v) for v in sigma2]
    for i in range(4):
        want = D * delta ** 2 / (2 * float(sigma2[i]))
        assert abs(errs["shifted"][i] - want) < 1e-3 * want, (i, errs["shifted"][i], want)
    assert abs(errs["shifted"][4] - delta) < 1e-6
    s = se.summarize(errs["shifted"], parts=2)
    assert abs(s["path_kl"] - sum(errs["shifted"][:4])) < 1e-9 and len(s["by_slice"]) == 2
    assert abs(sum(s["by_slice"]) - s["path_kl"]) < 1e-9


def test_step_errors_rank_w4_above_w8(tiny_unet):
    """Fewer weight bits, more error at every step of the chain (same calibration, same noise)."""
    step = _step(tiny_unet)
    cal = ptq4dm.NDTC(n=8)
    w8 = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=cal, progress=False).graph
    w4 = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=cal, progress=False, policy=ptq4dm.QuantPolicy(weight_bits=4)).graph
    x_T = torch.randn(step.sample_shape(2), generator=torch.Generator().manual_seed(0))
    errs = se.step_errors(step, {"w8": w8, "w4": w4}, step.sampler, x_T, torch.Generator().manual_seed(1))
    assert se.summarize(errs["w4"])["path_kl"] > 2 * se.summarize(errs["w8"])["path_kl"] > 0


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_cli_writes_json_and_png_and_refuses_fp(tmp_path):
    out, png = tmp_path / "se.json", tmp_path / "se.png"
    r = subprocess.run([sys.executable, "tools/step_error.py", "--n", "1", "--steps", "4", "--calib-n", "8",
                        "--configs", "ptq4dm-w8a8", "--out-json", str(out), "--png", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert len(d["per_step"]["ptq4dm-w8a8"]) == 4 == len(d["timesteps"])
    assert d["summary"]["ptq4dm-w8a8"]["path_kl"] > 0 and "tools/step_error.py" in d["meta"]["command"]
    assert len(d["variance"]["reference"]) == 4 and "variance_rounded_to_zero_at_t" in d["summary"]["ptq4dm-w8a8"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "tools/step_error.py", "--configs", "fp"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown or FP configurations ['fp']" in bad.stderr


def test_ddim_steps_report_the_rms_of_what_each_step_adds(tiny_unet):
    """DDIM with eta 0 has no noise at any step: a step adding delta to every pixel scores delta
    (the per-pixel RMS) at every step, and the path is S * delta^2; the ablation list keeps one
    part of a configuration in float at a time."""
    step = ptq4dm.DiffusionStep(tiny_unet, ptq4dm.make_sampler("ddim", num_inference_steps=4)).eval()
    delta = 0.02

    def shifted(x, t, noise):
        out = step(x, t, noise)
        return (out[0] + delta, out[1], out[2])

    x_T = torch.randn(step.sample_shape(2), generator=torch.Generator().manual_seed(0))
    errs = se.step_errors(step, {"shifted": shifted}, step.sampler, x_T, torch.Generator().manual_seed(1))
    assert all(abs(e - delta) < 1e-5 * delta for e in errs["shifted"]), errs
    s = se.summarize(errs["shifted"], parts=2, deterministic=True)
    assert abs(s["path_mse"] - 4 * delta ** 2) < 1e-5 * delta ** 2 and abs(sum(s["by_slice"]) - s["path_mse"]) < 1e-12
    assert {"outputs-fp", "first-last-fp", "weights-fp", "activations-fp"} <= set(se.ABLATIONS)
