"""tools/evaluate.py end to end on a few samples: the table, the JSON, the grid; and the metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ptq4dm.models.metrics import frechet_distance, inception_score, psnr

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


def test_evaluate_small_run(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# R\n\n<!-- quality-table:begin -->\nold\n<!-- quality-table:end -->\n\nkept text\n")
    r = subprocess.run([sys.executable, "tools/evaluate.py", "--n", "6", "--batch", "3", "--steps", "3", "--calib-n", "4",
                        "--configs", "fp,ptq4dm-w8a8", "--out-json", str(tmp_path / "q.json"), "--out-md", str(md),
                        "--grid", str(tmp_path / "g.png")], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "q.json").read_text())
    assert [row["config"] for row in data["rows"]] == ["fp", "ptq4dm-w8a8"] and data["meta"]["complete"]
    assert data["rows"][1]["psnr_vs_fp"] > 10  # same seeds: the W8A8 samples resemble the FP ones
    text = md.read_text()
    assert "W8A8 PTQ4DM (NDTC + MSE)" in text and "kept text" in text and "old" not in text
    assert "Command: `python tools/evaluate.py --n 6" in text
    assert (tmp_path / "g.png").stat().st_size > 100
