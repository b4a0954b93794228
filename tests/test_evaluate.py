"""tools/evaluate.py end to end on a few samples: the table, the JSON, the grid; and the metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptq4dm.models.metrics import InceptionNet, frechet_distance, inception_score, psnr

REPO = Path(__file__).resolve().parent.parent


def test_metrics_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 1.0) > 7.5  # mean shift of 1 in 8 dims: ~8
    uniform_confident = torch.eye(10).repeat(10, 1) * 50
    assert abs(inception_score(uniform_confident) - 10) < 1e-3
    assert abs(inception_score(torch.zeros(20, 10)) - 1) < 1e-6
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    assert psnr(x, x) == float("inf") and psnr(x, -x) < 20


class _InceptionLike(torch.nn.Module):
    """The calling convention of inception-2015-12-05.pt (StyleGAN3 / clean-fid), tiny weights:
    uint8 images in, pool features with return_features=True, class probabilities otherwise."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 12)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)
        if return_features:
            return f
        return torch.softmax(self.proj(f), dim=1)


@pytest.fixture
def inception_file(tmp_path):
    path = tmp_path / "inception-like.pt"
    torch.jit.save(torch.jit.script(_InceptionLike().eval()), str(path))
    return path


def test_inception_net_from_a_local_torchscript_file(inception_file, tmp_path):
    net = InceptionNet(inception_file)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 28, 28, generator=g) * 2 - 1
    a, b = net.stats(x), net.stats((x + 0.5).clamp(-1, 1))
    assert a["feat"].shape == (40, 48) and a["probs"].shape == (40, 12)
    assert abs(frechet_distance(a["feat"], a["feat"])) < 1e-6 < frechet_distance(a["feat"], b["feat"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        InceptionNet(tmp_path / "missing.pt")
    bad = tmp_path / "not-torchscript.pt"
    bad.write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        InceptionNet(bad)


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_evaluate_small_run(tmp_path, inception_file):
    md = tmp_path / "results.md"
    md.write_text("# R\n\n<!-- quality-table:begin -->\nold\n<!-- quality-table:end -->\n\nkept text\n")
    r = subprocess.run([sys.executable, "tools/evaluate.py", "--n", "6", "--batch", "3", "--steps", "3", "--calib-n", "4", "--calib-seed", "7",
                        "--configs", "fp,ptq4dm-w8a8", "--out-json", str(tmp_path / "q.json"), "--out-md", str(md),
                        "--grid", str(tmp_path / "g.png"), "--inception", str(inception_file), "--doubt-grid", str(tmp_path / "d.png"), "--int8", "--rounding-null"], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "q.json").read_text())
    assert [row["config"] for row in data["rows"]] == ["fp", "ptq4dm-w8a8", "ptq4dm-w8a8-compiled", "ptq4dm-w8a8-int8"] \
        and data["meta"]["complete"]
    int8 = data["rows"][3]   # the same graph, lowered and compiled: oneDNN int8 convs and linears on the CPU
    null = data["rows"][2]   # the same graph compiled as it is: float rounding alone
    assert null["psnr_vs_fakequant"] > data["rows"][1]["psnr_vs_fp"] and len(null["fid_vs_fakequant_interval"]) == 2
    assert "compiled (Inductor, fp32): float rounding only" in md.read_text() and "vs its fake-quant row" in md.read_text()
    lo, hi = int8["fid_vs_rounding_null_interval"]   # the int8 row judged against the null, paired
    assert lo <= int8["fid_vs_rounding_null"] / null["fid"] <= hi and "vs the rounding null" in md.read_text()
    assert int8["fid"] - int8["fid_vs_rounding_null"] == pytest.approx(null["fid"])
    assert int8["lower"]["backend"] == "x86" and int8["lower"]["counts"]["qconv2d"] > 0
    assert int8["psnr_vs_fp"] > 10 and "int8 execution (x86" in md.read_text()
    # the int8 execution is its simulation's samples, closer to them than the simulation is to FP
    assert int8["psnr_vs_fakequant"] > data["rows"][1]["psnr_vs_fp"], int8
    import ptq4dm
    from ptq4dm.models.loading import default_model_card
    assert (data["meta"]["seed"], data["meta"]["calib_seed"]) == (0, 7)  # calibration drawn apart from the samples
    assert data["meta"]["model"]["weights"] == "models/weights/mnist-small-ddpm-cosine.safetensors"
    assert data["meta"]["model"]["train_steps"] == default_model_card()["steps"]  # the table names its checkpoint
    assert data["meta"]["model"]["weights_sha256"] == ptq4dm.weights_hash(ptq4dm.load_default_unet())[:16]
    assert data["rows"][1]["psnr_vs_fp"] > 10  # same seeds: the W8A8 samples resemble the FP ones
    lo, hi = data["rows"][1]["fid_vs_fp_interval"]   # the change vs FP with its sampling noise
    assert lo <= (data["rows"][1]["fid"] / data["rows"][0]["fid"] - 1) <= hi and data["rows"][0]["fid_vs_fp_interval"] is None
    assert len(int8["fid_vs_fakequant_interval"]) == 2 and "vs FP [sampling noise" in md.read_text()
    assert data["rows"][0]["label_changed_vs_fp"] is None and 0 <= data["rows"][1]["label_changed_vs_fp"] <= 1
    assert all(row["inception_fid"] >= 0 and row["inception_is"] >= 1 for row in data["rows"])
    text = md.read_text()
    assert "W8A8 PTQ4DM (NDTC + MSE)" in text and "kept text" in text and "old" not in text
    assert "Command: `python tools/evaluate.py --n 6" in text and "Inception FID" in text and "digit differs from FP" in text
    assert f"Model `models/weights/mnist-small-ddpm-cosine.safetensors` ({default_model_card()['steps']:,} training steps" in text
    assert "Sampler ddim 3 steps (eta 0.0)" in text and data["meta"]["sampler"]["eta"] == 0.0
    assert (tmp_path / "g.png").stat().st_size > 100
    fp = data["rows"][0]
    assert sum(fp["unconfident_by_predicted_digit"]) == round((1 - fp["confident_frac"]) * 6)
    assert 0.9 < data["meta"]["real_confident_frac"] <= 1  # the classifier is sure of most real digits
    assert "Real digits (all 5,000) classified with confidence >= 0.9" in text
    from PIL import Image
    with Image.open(tmp_path / "d.png") as im:  # three rows: confident FP, least sure FP, least sure real
        assert im.size[1] == 3 * (28 * 3 + 12) and im.getextrema()[1] > 0


def test_doubt_rows_orders_by_confidence():
    sys.path.insert(0, str(REPO / "tools"))
    from evaluate import doubt_rows

    probs = torch.full((5, 10), 0.01)
    for i, c in enumerate([0.95, 0.3, 0.99, 0.5, 0.2]):
        probs[i, i] = c
    real_probs = torch.eye(10)[:3] * 0.5 + 0.05
    x, real = torch.arange(5.).view(5, 1, 1, 1).expand(5, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    sure, least, real_least = doubt_rows(x, probs, real, real_probs, k=3)
    assert sure[1][:, 0, 0, 0].tolist() == [0, 2] and sure[2] == ["0 0.95", "2 0.99"]
    assert least[1][:, 0, 0, 0].tolist() == [4, 1, 3] and least[2] == ["4 0.20", "1 0.30", "3 0.50"]
    assert "40.0%" in sure[0] and len(real_least[2]) == 3


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta is a DDIM option"),
    (["--sampler", "ddim", "--variance", "fixed_large"], "--variance is a DDPM option"),
    (["--int8", "--lower-opts", "drop_wide"], "'drop_wide' is not key=value"),
    (["--int8", "--lower-opts", "drop_wide=false,fast=true"], "unknown option 'fast'"),
    (["--lower-opts", "drop_wide=false"], "add --int8"),
])
def test_evaluate_refuses_sampler_options_of_the_other_sampler(tmp_path, args, message):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "tools/evaluate.py", *args, "--out-json", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and not out.exists()


def test_every_evaluate_config_builds_the_policy_its_label_names():
    sys.path.insert(0, str(REPO / "tools"))
    from dataclasses import replace as dc_replace

    from evaluate import CONFIGS, policy_for

    assert len({c.name for c in CONFIGS}) == len(CONFIGS)
    pols = {c.name: policy_for(c, steps=20) for c in CONFIGS}
    assert pols["ptq4dm-w8a8"].describe() == "W8A8" and pols["ptq4dm-w8a8"].quantize_attention
    assert pols["paper"] == pols["ptq4dm-w8a8"]   # the paper's preset is the plain policy
    assert pols["recommended"].keep_first_last_fp and pols["recommended"].output_bits == 16
    # the rows measured as w8a8-reconstruct before reconstruct joined the preset are the preset's rows;
    # the nearest-rounding rows (w4a8, recommended-fast) run no reconstruct
    from ptq4dm.passes import PRESETS

    by = {c.name: c for c in CONFIGS}
    assert by["w8a8-reconstruct"].passes == PRESETS["recommended"][0] and pols["w8a8-reconstruct"] == pols["recommended"]
    assert all("reconstruct" not in PRESETS[by[n].preset][0] for n in ("w4a8", "recommended-fast"))
    assert "reconstruct" in PRESETS["recommended"][0] and "reconstruct" not in PRESETS["ptq4dm-paper"][0]
    # the paper's full setting on the recommended passes: the preset's policy with 8-bit outputs, nothing else
    for n in ("recommended-out8", "recommended-out8-ef", "recommended-out8-ef2"):
        assert pols[n] == dc_replace(pols["recommended"], output_bits=8) and pols[n].quantize_outputs
        assert "outputs=false" in by[n].passes and ("error_feedback" in by[n].passes) == (n != "recommended-out8")
    assert pols["ptq4dm-w8a16"].describe().startswith("W8A16") and pols["ptq4dm-w8a16"].output_bits == 16
    assert pols["ptq4dm-w16a8"].describe().startswith("W16A8")
    assert pols["w5a8"].weight_bits == pols["w5a8-reconstruct-refit"].weight_bits == 5
    assert "widths=all" in by["mixed5all-reconstruct-refit"].passes and pols["mixed5all-reconstruct-refit"].weight_bits == 8
    # the 4-or-8 rows keep measuring 4 or 8 now that the pass's default is every width
    assert all("budget=5,widths=ends" in c.passes for c in CONFIGS if c.name.startswith("mixed5-"))
    assert not pols["ptq4dm-w8a8-attn-fp"].quantize_attention
    assert "mean" not in pols["ptq4dm-w8a8-mean-fp"].output_roles
    assert "variance" not in pols["ptq4dm-w8a8-variance-fp"].output_roles
    assert pols["ptq4dm-w8a8-per-step"].timestep_groups == 20 and pols["ptq4dm-w8a8"].timestep_groups == 1
    assert pols["ptq4dm-w8a8-out-g10"].roles_grouped() == ("mean", "variance", "prev_sample")
    assert pols["ptq4dm-w8a8-out-g10"].timestep_groups == 10
    # every pass list names registered passes with options they have (a typo fails here, not an hour into a run)
    import dataclasses as dc

    from ptq4dm.passes.base import PASS_REGISTRY, parse_pipeline
    for c in CONFIGS:
        for name, opts in parse_pipeline(c.passes) if c.passes else ():
            fields = {f.name for f in dc.fields(PASS_REGISTRY[name])} if dc.is_dataclass(PASS_REGISTRY[name]) else set(opts)
            assert set(opts) <= fields, (c.name, name, set(opts) - fields)


def test_configs_run_in_the_order_named_with_fp_first():
    """--configs is run as written (a long run's first rows are the ones its author wanted first), FP first
    whatever its place, each config once; an unknown name is refused with the known ones listed."""
    sys.path.insert(0, str(REPO / "tools"))
    from evaluate import CONFIGS, resolve_configs

    names = lambda spec: [c.name for c in resolve_configs(spec)]
    assert names("w8a8-reconstruct,w4a8") == ["fp", "w8a8-reconstruct", "w4a8"]
    assert names("w4a8,fp,w8a8-reconstruct,w4a8") == ["fp", "w4a8", "w8a8-reconstruct"]
    assert names("all") == [c.name for c in CONFIGS] and names("all")[0] == "fp"
    with pytest.raises(ValueError, match=r"unknown configs \['w3a8'\]; known: \['fp'"):
        resolve_configs("w4a8,w3a8")


def test_fid_change_interval_measures_the_sampling_noise_of_the_change():
    """The interval around FID(q) / FID(fp) - 1: zero width for the same samples, around the
    measured change, and as wide as the change actually moves over independent sample sets (a
    simulated pair of models, paired sample by sample, at a change of about +20%)."""
    from ptq4dm.models.metrics import fid_change_interval

    g = torch.Generator().manual_seed(1)
    d = 32
    real = torch.randn(5000, d, generator=g).relu()
    mix = torch.eye(d) + 0.03 * torch.randn(d, d, generator=g)

    def draw(n):
        fp = (torch.randn(n, d, generator=g) * 1.2 + 0.3).relu()
        return fp @ mix + 0.05 * torch.randn(n, d, generator=g), fp

    q, fp = draw(1000)
    assert fid_change_interval(fp, fp, real, n_sub=10) == (0.0, 0.0)
    change = frechet_distance(q, real) / frechet_distance(fp, real) - 1
    lo, hi = fid_change_interval(q, fp, real, n_sub=60)
    assert lo < change < hi and lo > 0   # a real change, resolved at N = 1,000
    spread = torch.tensor([frechet_distance(a, real) / frechet_distance(b, real) - 1
                           for a, b in (draw(1000) for _ in range(40))]).std()
    est = (hi - lo) / (2 * 1.645)
    assert 0.6 < est / float(spread) < 1.6, (est, float(spread))
    with pytest.raises(ValueError, match="pair sample by sample"):
        fid_change_interval(q[:10], fp[:11], real)
