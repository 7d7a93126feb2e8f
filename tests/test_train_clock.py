"""The budget clock, the LR schedule, atomic checkpoints and the config loader."""
import json
import time

import pytest
import torch

from kdfast.budget.units import Budget, parse_budget
from kdfast.train import checkpoint, config
from kdfast.train.clock import BudgetClock, lr_factor


def test_lr_warms_up_then_decays_linearly_on_budget_fraction():
    assert lr_factor(0.0, 0.1) == 0.0
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == 0.0 and lr_factor(1.5, 0.1) == 0.0


def test_token_budget_stops_at_the_budget_and_round_trips():
    clock = BudgetClock(parse_budget("1000tok"))
    clock.start()
    while not clock.done():
        clock.record_step(256)
    assert clock.steps == 4 and clock.spent == 1024          # 4 steps end closer to 1000 than 3
    restored = BudgetClock(parse_budget("1000tok"))
    restored.load_state_dict(clock.state_dict())
    assert restored.spent == 1024 and restored.steps == 4 and restored.done()
    with pytest.raises(ValueError, match="resume: expected a checkpoint with budget 2000.0 tok"):
        BudgetClock(parse_budget("2000tok")).load_state_dict(clock.state_dict())


def test_time_budget_excludes_paused_work_and_keeps_the_offset():
    clock = BudgetClock(Budget(10.0, "s"), offset=2.0)
    clock.start()
    with clock.paused():
        time.sleep(0.3)                                       # evaluation / checkpoint: not charged
    time.sleep(0.05)
    clock.record_step(8)
    assert 2.04 < clock.spent < 2.25
    assert clock.state_dict()["seconds"] < 0.25


def test_flop_budget_needs_the_cost_per_token():
    with pytest.raises(ValueError, match="flop_per_token"):
        BudgetClock(parse_budget("1e12flop"))
    clock = BudgetClock(parse_budget("1e6flop"), flop_per_token=1000.0)
    clock.record_step(500)
    assert clock.spent == 5e5 and clock.fraction == 0.5


def test_checkpoints_are_atomic_pruned_and_skip_damaged_files(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, {"step": step, "w": torch.ones(2) * step}, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000002.pt", "step-000000003.pt"]
    (tmp_path / "checkpoints" / ".step-000000004.pt.tmp-1").write_bytes(b"half written")
    assert checkpoint.load_latest(tmp_path)["step"] == 3      # a temp file is never loaded
    (tmp_path / "checkpoints" / "step-000000003.pt").write_bytes(b"damaged")
    assert checkpoint.load_latest(tmp_path)["step"] == 2      # falls back to the previous one
    assert checkpoint.load_latest(tmp_path / "nothing") is None


def test_crash_report_leaves_checkpoints_alone(tmp_path):
    checkpoint.save(tmp_path, {"step": 1}, 1)
    try:
        raise RuntimeError("out of memory at step 7")
    except RuntimeError as error:
        path = checkpoint.write_crash(tmp_path, error)
    report = json.loads(path.read_text())
    assert report["error"] == "RuntimeError" and "step 7" in report["message"] and "Traceback" in report["traceback"]
    assert checkpoint.load_latest(tmp_path)["step"] == 1


def test_unknown_config_key_lists_near_matches():
    with pytest.raises(ValueError, match=r"config: unknown key 'train.budjet'; did you mean train.budget"):
        config.load(overrides=["train.budjet=4h"])
    with pytest.raises(ValueError, match="did you mean student"):
        config.load(overrides=["stuent.layers=3"])
    with pytest.raises(ValueError, match="override: expected KEY=VALUE"):
        config.load(overrides=["train.budget"])
    with pytest.raises(ValueError, match="preset: expected one of .*tiny"):
        config.load(preset="huge")


def test_overrides_coerce_numbers_and_every_preset_loads():
    loaded = config.load(overrides=["train.lr=1e-4", "train.batch_size=64", "strategies=[no-kd]"])
    assert loaded["train"]["lr"] == 1e-4 and loaded["train"]["batch_size"] == 64 and loaded["strategies"] == ["no-kd"]
    presets = sorted(p.stem for p in config.CONFIG_DIR.glob("*.yaml"))
    assert "tiny" in presets
    for name in presets:
        parse_budget(str(config.load(preset=name)["train"]["budget"]))


def test_flop_cost_per_token_grows_with_the_teacher_and_tiny_budgets_are_refused():
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.train.pretrain import check_affordable, flop_per_token

    def bert(hidden, layers):
        return BertForMaskedLM(BertConfig(vocab_size=500, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=2, intermediate_size=2 * hidden))

    teacher, student = bert(64, 2), bert(32, 1)
    scratch, vanilla = (flop_per_token(s, teacher, student, 8, 32) for s in ("no-kd", "vanilla"))
    assert vanilla > 2 * scratch > 0                             # the KD step also runs the teacher
    with pytest.raises(ValueError, match=r"budget: expected at least one step's cost, .* FLOPs \(256 tokens"):
        check_affordable(parse_budget("1e3flop"), 256, vanilla, None)
    with pytest.raises(ValueError, match="already charged to the teacher"):
        check_affordable(parse_budget("10s"), 256, None, 1.0, offset=9.5)
    check_affordable(parse_budget("10s"), 256, None, None)        # time without calibration: checked by the clock
