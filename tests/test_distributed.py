"""torch.distributed (gloo, 2 ranks on the CPU): the artifact and the FID of a multi-process run are
the single-process ones; a failing rank stops every rank with an error naming it, within a timeout."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import load_tool
from ptq4dm import distributed
from ptq4dm.ir.serialize import load_artifact

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
ENV = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, timeout=600):
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("tool", ["quantize", "evaluate"])
def test_torchrun_parses_every_option_of_the_tools(tool):
    """torchrun's parser must leave every option of the tools to the script (it rejected --n as
    ambiguous with --nnodes / --nproc-per-node); --n stays an alias for single-process use."""
    from torch.distributed.run import get_args_parser

    tp = get_args_parser()
    opts = [o for a in load_tool(tool).build_parser()._actions for o in a.option_strings
            if o.startswith("--") and o != "--n"]
    assert "--calib-n" in opts or "--samples" in opts
    for o in opts:
        ns = tp.parse_args(["--nproc-per-node", "2", f"tools/{tool}.py", o, "1"])
        assert ns.training_script_args == [o, "1"], o


def _artifact_diff(a: Path, b: Path) -> tuple[list, dict]:
    ta, ha = load_artifact(a)
    tb, hb = load_artifact(b)
    assert set(ta) == set(tb)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    head = {k for k in set(ha) | set(hb) if ha.get(k) != hb.get(k)} - {"content_sha256"}
    return differ, {k: (ha.get(k), hb.get(k)) for k in head}


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_two_ranks_write_the_single_process_artifact(tmp_path):
    """quantize on 2 gloo ranks (chains, observers and bias_correct split by batch) == 1 process,
    tensor for tensor; the header differs only in calibration.world_size and the cache path."""
    common = ["--model", "tiny", "--steps", "4", "--calib-n", "24", "--calib-batch", "8", "--sample", "0",
              "--no-progress", "--bias-correct", "--bias-groups", "2", "--threads", "1"]
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    r = run(TORCHRUN + [str(free_port()), "tools/quantize.py", *common, "--out", str(two), "--cache-dir", str(tmp_path / "c2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "c2").glob("calib-*.safetensors")), "rank 0 caches the gathered calibration set"
    r = run([sys.executable, "tools/quantize.py", *common, "--out", str(one), "--cache-dir", str(tmp_path / "c1")])
    assert r.returncode == 0, r.stderr[-3000:]
    differ, head = _artifact_diff(one, two)
    assert differ == [], f"tensors that differ between 1 and 2 ranks: {differ[:5]}"
    assert set(head) == {"calibration"}, head
    c1, c2 = head["calibration"]
    assert (c1["world_size"], c2["world_size"]) == (1, 2)
    assert {k: v for k, v in c1.items() if k not in ("world_size", "cache")} == \
           {k: v for k, v in c2.items() if k not in ("world_size", "cache")}
    assert not list(tmp_path.glob("**/*.tmp*")), "nothing half-written"


@pytest.mark.slow   # > ~20 s on a 2-core CPU: `make test-fast` leaves it out
def test_two_rank_evaluation_gives_the_single_process_fid(tmp_path):
    common = ["tools/evaluate.py", "--samples", "8", "--batch", "4", "--steps", "3", "--calib-n", "8",
              "--configs", "fp,ptq4dm-w8a8", "--threads", "1"]
    outs = {}
    for name, prefix in (("two", TORCHRUN + [str(free_port())]), ("one", [sys.executable])):
        r = run(prefix + common + ["--out-json", str(tmp_path / f"{name}.json"), "--out-md", str(tmp_path / f"{name}.md"),
                                   "--grid", str(tmp_path / f"{name}.png")])
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert outs["two"]["meta"]["world_size"] == 2 and outs["one"]["meta"]["world_size"] == 1
    for a, b in zip(outs["one"]["rows"], outs["two"]["rows"]):
        assert a["config"] == b["config"]
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-6, abs=1e-9)
        assert (a["psnr_vs_fp"] is None) == (b["psnr_vs_fp"] is None)


def _rank_main(rank, world, init_file, how, q):
    """One rank of a 2-process group that quantizes a tiny step; rank 1 fails as ``how`` says."""
    os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"
    torch.set_num_threads(1)
    import datetime

    import ptq4dm
    from ptq4dm.models.unets import build_unet

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    step = ptq4dm.DiffusionStep(build_unet("tiny"), ptq4dm.make_sampler("ddim", num_inference_steps=4)).eval()
    calls = {"n": 0}
    fwd = step.forward

    def flaky(x, t, noise):   # rank 1's FP step: fine at capture, then fails inside its calibration chains
        calls["n"] += 1
        if rank == 1 and calls["n"] > 2:
            if how == "dies":
                os._exit(3)
            raise FloatingPointError("injected failure")
        return fwd(x, t, noise)

    step.forward = flaky
    t0 = time.monotonic()
    try:
        ptq4dm.quantize(step, pipeline="ptq4dm-paper", calibration=ptq4dm.NDTC(n=16, batch_size=4), progress=False)
        q.put((rank, "finished", "", time.monotonic() - t0))
    except Exception as e:   # noqa: BLE001
        q.put((rank, type(e).__name__, str(e), time.monotonic() - t0))


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_failing_rank_stops_every_rank_with_its_name(tmp_path, how):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, tmp_path / "pg", how, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank was still running after the timeout"
    got = {}
    while not q.empty():
        r, kind, msg, secs = q.get()
        got[r] = (kind, msg, secs)
    assert got[0][0] == "RankFailed", got
    if how == "raises":
        assert "rank 1 of 2" in got[0][1] and "injected failure" in got[0][1], got
        assert got[1][0] == "RankFailed" and "rank 1" in got[1][1]
    else:
        assert procs[1].exitcode == 3 and "lost contact" in got[0][1], got
    assert got[0][2] < 60, f"rank 0 took {got[0][2]:.0f}s to stop"


def test_single_process_helpers_do_not_need_a_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.my_batches("abc") == [(0, "a"), (1, "b"), (2, "c")]
    assert distributed.agree("x", lambda: 5) == [5]
    assert distributed.batch_seed(0, 1) != distributed.batch_seed(1, 0)
    with pytest.raises(ValueError):
        distributed.agree("x", lambda: int("no"))
