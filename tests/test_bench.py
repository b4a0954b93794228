"""tools/bench.py runs on the CPU (small) and writes the record format the results use.
It asserts the format and that every config ran; it asserts no speed (speed is measured, not tested)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    configs = ("fp32-eager", "pt2e-x86-int8", "ptq4dm-w8a8")
    r = subprocess.run([sys.executable, "tools/bench.py", "--models", "tiny", "--batches", "2", "--configs",
                        ",".join(configs), "--iters", "1", "--warmup", "0", "--chain", "2", "--device", "cpu",
                        "--out-json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert {(x["batch"], x["config"]) for x in recs} == {(b, c) for b in (2,) for c in configs}
    for x in recs:
        assert "error" not in x, x
        assert {"device", "threads", "isa_flags", "torch", "torchao", "model", "batch", "config", "ms_per_step"} <= set(x)
        assert x["ms_per_step"] > 0 and x["model"] == "tiny"
        # ours calibrated on the shipped sampler (100 steps), the chain its first --chain steps
        assert x["sampler_steps"] == 100 and x["chain_steps"] == 2 and x["ms_sample"] > 0
        if x["config"] == "ptq4dm-w8a8":   # ours ran the x86 int8 lowering, not the float graph
            assert x["lower"]["backend"] == "x86" and x["lower"]["counts"]["qconv2d"] > 0
        if x["config"] != "fp32-eager":
            assert x["speedup_vs_fp32_eager"] > 0
    extras = json.loads(out.with_suffix(".extras.json").read_text())
    w = extras["weights"]["tiny"]
    assert w["fp32_bytes"] == 2 * w["bf16_bytes"] and w["int8_artifact_bytes"] > 0
    assert "| tiny | 2 | ptq4dm-w8a8 |" in out.with_suffix(".md").read_text()
    r = subprocess.run([sys.executable, "tools/bench.py", "--configs", "fp64-magic"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown configs" in r.stderr
