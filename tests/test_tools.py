"""tools/quantize.py, the artifact and tools/sample.py: round trip and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ptq4dm
from conftest import load_tool
from ptq4dm import artifact
from ptq4dm.ir.serialize import ArtifactError, load_artifact
from ptq4dm.models.samplers import make_sampler
from ptq4dm.models.step import DiffusionStep
from ptq4dm.passes import NDTC, QuantPolicy

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}


def run_tool(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_unet):
    step = DiffusionStep(tiny_unet, make_sampler("ddim", num_inference_steps=8)).eval()
    res = ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=NDTC(n=16), policy=QuantPolicy(timestep_groups=4), progress=False)
    path = tmp_path_factory.mktemp("art") / "tiny.ptq4dm.safetensors"
    artifact.save(res, step, path)
    return step, res, path


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([875, 500, 0]), torch.randn(3, 1, 8, 8, generator=g)


def test_reload_in_a_new_process_equals_in_memory_graph(saved, tmp_path):
    step, res, path = saved
    x, t, n = _inputs()
    with torch.no_grad():
        want = res.graph(x, t, n)
    torch.save({"x": x, "t": t, "n": n}, tmp_path / "in.pt")
    code = (
        "import torch; from ptq4dm.artifact import load\n"
        f"g, step, h = load({str(path)!r})\n"
        f"d = torch.load({str(tmp_path / 'in.pt')!r})\n"
        "with torch.no_grad(): out = g(d['x'], d['t'], d['n'])\n"
        f"torch.save([o for o in out], {str(tmp_path / 'out.pt')!r})\n")
    r = run_tool("-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    tensors, header = load_artifact(path)
    assert any(v.dtype == torch.int8 for k, v in tensors.items() if k.startswith("w/"))
    assert header["fp_weights_sha256"] == ptq4dm.weights_hash(step.unet)
    assert header["torch_version"] == torch.__version__ and header["ptq4dm_version"] == ptq4dm.__version__


def test_hash_mismatch_is_refused(saved):
    _, _, path = saved
    other = ptq4dm.build_unet("tiny")
    with pytest.raises(ArtifactError, match="other FP weights"):
        artifact.load(path, expect_fp_weights=other)


@given(data=st.data())
def test_corrupted_artifacts_fail_clearly_or_load_identically(saved, tmp_path_factory, data):
    _, _, path = saved
    raw = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw = bytearray(data.draw(st.binary(min_size=0, max_size=300)))
    bad = tmp_path_factory.mktemp("fuzz") / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        tensors, header = load_artifact(bad)
    except ArtifactError as e:
        assert str(bad) in str(e)
        return
    ref_t, ref_h = load_artifact(path)  # it loaded: then it must be the same content
    assert header == ref_h and tensors.keys() == ref_t.keys()
    assert all(torch.equal(tensors[k], ref_t[k]) for k in tensors)


def test_interrupted_save_leaves_no_partial_file(saved, tmp_path, monkeypatch):
    step, res, _ = saved
    import safetensors.torch as st_torch

    def dies(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st_torch, "save_file", dies)
    target = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        artifact.save(res, step, target)
    assert list(tmp_path.iterdir()) == []


def run_main(tool, *args) -> tuple[int, str]:
    """A tool's main() in this process (no interpreter start-up per case): its exit status and stderr."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = load_tool(tool).main(list(args))
        except SystemExit as e:   # argparse errors (2) and SystemExit("error: ...") messages (1)
            rc = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return rc, err.getvalue()


def test_cli_bad_input(tmp_path):
    a = str(tmp_path / "a.safetensors")
    rc, err = run_main("quantize", "--model", "/no/such/unet.safetensors", "--out", a)
    assert rc == 2 and "does not exist" in err
    rc, err = run_main("quantize", "--steps", "0")
    assert rc == 2 and "--steps" in err
    rc, err = run_main("quantize", "--weight-bits", "1")
    assert rc == 2 and "--weight-bits" in err
    rc, err = run_main("quantize", "--model", "tiny", "--mu", "1.5", "--out", a)
    assert rc == 2 and "mu" in err
    rc, err = run_main("quantize", "--model", "tiny", "--passes", "mark,obsrve", "--out", a)
    assert rc == 2 and "unknown pass 'obsrve'" in err
    rc, err = run_main("quantize", "--model", "tiny", "--pipeline", "ptq4dm-paper", "--bias-groups", "4", "--out", a)
    assert rc == 2 and "add --bias-correct" in err and not (tmp_path / "a.safetensors").exists()
    rc, err = run_main("quantize", "--model", "tiny", "--weight-budget", "3", "--out", a)
    assert rc == 2 and "--weight-budget" in err and not (tmp_path / "a.safetensors").exists()
    rc, err = run_main("quantize", "--model", "tiny", "--weight-widths", "all", "--out", a)
    assert rc == 2 and "give --weight-budget BITS too" in err and not (tmp_path / "a.safetensors").exists()
    rc, err = run_main("quantize", "--model", "tiny", "--reconstruct", "--no-reconstruct", "--out", a)
    assert rc == 2 and "contradict" in err and not (tmp_path / "a.safetensors").exists()
    rc, err = run_main("quantize", "--model", "tiny", "--error-feedback", "--out", a)   # x_{t-1} is 16-bit here
    assert rc == 2 and "--output-bits 8" in err and not (tmp_path / "a.safetensors").exists()
    rc, err = run_main("quantize", "--out", "/proc/ptq4dm/a.safetensors")
    assert rc != 0 and "cannot write" in err
    torch.manual_seed(0)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ptq4dm.build_unet("tiny").state_dict().items()}, str(wrong))
    rc, err = run_main("quantize", "--model", str(wrong), "--arch", "mnist-small", "--out", a)
    assert rc == 2 and ("missing keys" in err or "shape mismatches" in err)
    r = run_tool("tools/sample.py", str(tmp_path / "nothing.safetensors"))   # and once as a user runs it
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_cli_quantize_then_sample(tmp_path):
    out = tmp_path / "t.ptq4dm.safetensors"
    r = run_tool("tools/quantize.py", "--model", "tiny", "--steps", "4", "--n", "8", "--sample", "4", "--no-progress",
                 "--out", str(out), "--dump-ir-after", "mark")
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.exists() and out.with_suffix(".png").exists()
    assert "q{" in (tmp_path / "ir" / "after-mark.txt").read_text()
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["total_error"] <= report["total_error_minmax"]
    assert "summary" in r.stdout and "time per stage" in r.stdout
    assert "reconstruct" in r.stdout and report["reconstruct"]["layers"], "the default pipeline learns the rounding"
    r = run_tool("tools/sample.py", str(out), "--n", "4", "--no-lower", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "s.png").stat().st_size > 100
    r = run_tool("tools/sample.py", str(out), "--n", "2", "--lower", "--out", str(tmp_path / "s8.png"))
    assert r.returncode == 0 and "lowered (x86)" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("widths", ["ends", "all", None])
def test_cli_weight_budget_with_reconstruct(tmp_path, capsys, widths):
    """--weight-budget 6 --reconstruct: the summary names the mixed widths (average within the budget)
    and the learned rounding, and the artifact's header has 4- and 8-bit weights (--weight-widths all, and the
    default without the flag: widths from 4 to 8)."""
    out = tmp_path / "m.ptq4dm.safetensors"
    rc, err = run_main("quantize", "--model", "tiny", "--steps", "4", "--n", "16", "--sample", "0", "--no-progress",
                       "--weight-budget", "6", *(["--weight-widths", widths] if widths else []),
                       "--reconstruct", "reconstruct{iters=5,n=16,batch_size=8}", "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 0, err[-3000:]
    assert "mixed precision" in text and "reconstruct" in text, text
    avg = float(text.split(" bits per weight (budget")[0].rsplit(" ", 1)[-1])
    assert avg <= 6.0
    from ptq4dm import artifact

    _, _, header = artifact.load(out)
    bits = {s_["bits"] for s_ in header["specs"] if s_["role"] == "weight"}
    assert bits == {4, 8} if widths == "ends" else (bits <= set(range(4, 9)) and len(bits) > 1), bits
    # without the flag the budget runs over every width (the default since 2026-12-07), and says so
    assert ("every width from 4 up" in text) == (widths != "ends") and ("4 or 8 bits" in text) == (widths == "ends")


def test_cli_error_feedback_keeps_8_bit_outputs_and_says_why_it_is_not_timed(tmp_path, capsys):
    out = tmp_path / "ef.ptq4dm.safetensors"
    rc, err = run_main("quantize", "--model", "tiny", "--steps", "4", "--n", "8", "--sample", "2", "--no-progress",
                       "--pipeline", "recommended-fast", "--output-bits", "8", "--speed",
                       "--error-feedback", "error_feedback{residual_bits=2}", "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 0, err[-3000:]
    assert "not measured: error_feedback" in text, text
    from ptq4dm import artifact

    _, _, header = artifact.load(out)
    assert header["error_feedback"]["residual_bits"] == 2
    assert {s_["bits"] for s_ in header["specs"] if s_["role"] == "prev_sample"} == {8}   # widen left it at 8
    rc, err = run_main("sample", str(out), "--n", "2", "--lower", "--out", str(tmp_path / "s.png"))
    assert rc == 2 and "--no-lower" in err and not (tmp_path / "s.png").exists()


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_cli_samples_with_the_schedule_the_weights_were_trained_on(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "cos.safetensors"
    save_file({k: v.contiguous() for k, v in ptq4dm.build_unet("tiny").state_dict().items()}, str(weights))
    weights.with_suffix(".json").write_text(json.dumps({"unet_config": "tiny", "schedule": "cosine"}))
    out = tmp_path / "cos.ptq4dm.safetensors"
    r = run_tool("tools/quantize.py", "--model", str(weights), "--steps", "4", "--n", "8", "--no-progress",
                 "--out", str(out), "--bias-correct", "--bias-groups", "2", "--no-reconstruct")
    assert r.returncode == 0, r.stderr[-3000:]
    tensors, header = load_artifact(out)
    assert header["sampler"]["schedule"] == "cosine"
    # --bias-correct --bias-groups 2: the artifact holds the corrected biases and a (2, C) table per
    # layer, and the summary says how many
    assert len(header["bias_corrected"]) > 0 and "bias correction" in r.stdout and "per 1/2" in r.stdout
    assert header["bias_correct_groups"] == 2
    assert {k.removeprefix("bc_table/") for k in tensors if k.startswith("bc_table/")} == set(header["bias_corrected"])
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["bias_correction"]["layers"] == len(header["bias_corrected"])
    assert not report.get("reconstruct"), "--no-reconstruct drops the pass"
    r = run_tool("tools/sample.py", str(out), "--n", "2", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_cli_chain_gains_fits_the_4_bit_scales_and_says_so(tmp_path, capsys):
    """--chain-gains appends the pass: the summary says how many gains it fitted and whether it kept them, the
    artifact's report records it; a value that is not the pass is refused with the form it takes."""
    out = tmp_path / "cg.ptq4dm.safetensors"
    rc, err = run_main("quantize", "--model", "tiny", "--steps", "4", "--n", "8", "--sample", "0", "--no-progress",
                       "--pipeline", "recommended-fast", "--weight-bits", "4",
                       "--chain-gains", "chain_gains{iters=5,chains=8,batch_size=4,steps=0.5,unroll=2}",
                       "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 0, err[-3000:]
    assert "chain gains" in text and "held-out chains' loss" in text, text
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["chain_gains"]["gains"] > 0 and report["chain_gains"]["unroll"] == 2
    rc, err = run_main("quantize", "--model", "tiny", "--steps", "4", "--n", "8", "--sample", "0", "--no-progress",
                       "--weight-bits", "4", "--chain-gains", "iters=5", "--out", str(tmp_path / "x.ptq4dm.safetensors"))
    assert rc == 2 and "chain_gains{iters=300}" in err
