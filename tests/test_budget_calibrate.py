"""`kdfast bench budget` (kdfast/apps/calibrate.py): a tiny --quick run, the report, bad input."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("kdfast.strategies", reason="the calibration builds kdfast.strategies arms")

from kdfast.apps import calibrate  # noqa: E402
from kdfast.budget import memory  # noqa: E402
from kdfast.budget.units import Budget, Calibration, charge_fraction, parse_budget  # noqa: E402
from kdfast.cli import main  # noqa: E402
from kdfast.train.step import PHASES  # noqa: E402

STRATEGIES = "no-kd,vanilla,tinybert,minilm_v2"
PER_STRATEGY_KEYS = {"ms_per_step", "tokens_per_step", "budget_steps", "budget_tokens", "tokens_vs_nokd",
                     "breakdown_ms", "flops_per_step_analytic", "flops_per_step_measured"}
TINY = ["--quick", "--device", "cpu", "--batch", "4", "--seq", "32", "--warmup", "1", "--rounds", "2",
        "--steps-per-round", "2"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    rc = main(["bench", "budget", *TINY, "--strategies", STRATEGIES, "--budget", "24h", "--out", str(out),
               "--json", str(out / "report.json")])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_quick_run_writes_json_markdown_and_chart(quick_report):
    out, report = quick_report
    assert (out / "budget.png").stat().st_size > 1000
    text = (out / "budget.md").read_text()
    assert "No-KD2 processes" in text and "TinyBERT2 processes" in text
    for key in ("device", "driver", "torch", "triton", "git_commit"):
        assert key in report["environment"]
    assert report["shapes"]["batch"] == 4 and report["shapes"]["seq"] == 32 and report["seed"] == 0
    assert report["dtype"] == "fp32"
    assert [a["strategy"] for a in report["strategies"]] == STRATEGIES.split(",")
    for arm in report["strategies"]:
        assert PER_STRATEGY_KEYS <= set(arm)
        assert set(arm["breakdown_ms"]) == set(PHASES)
        assert arm["tokens_per_step"] == 4 * 32
        assert arm["budget_tokens"] == arm["budget_steps"] * 4 * 32
        assert arm["flops_per_step_measured"] > 0 and arm["flops_per_step_analytic"] > 0
    nokd, *kd_arms = report["strategies"]
    assert nokd["tokens_vs_nokd"] == 1.0 and nokd["breakdown_ms"]["teacher_forward"] < 1.0
    for arm in kd_arms:
        assert arm["breakdown_ms"]["teacher_forward"] > 0 and arm["breakdown_ms"]["kd_loss"] > 0
        assert 0 < arm["tokens_vs_nokd_flops"] < 1


def test_each_strategy_round_trips_time_tokens_time(quick_report):
    _, report = quick_report
    budget = parse_budget(report["budget"]["text"])
    for arm in report["strategies"]:
        calibration = Calibration(arm["ms_per_step"], arm["tokens_per_step"], arm["flops_per_step_analytic"])
        tokens = calibration.convert(budget, "tok")
        assert tokens.amount == pytest.approx(arm["budget_tokens_exact"])
        assert calibration.convert(tokens, "s").amount == pytest.approx(budget.amount)
        assert calibration.whole_steps(budget) == arm["budget_steps"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--strategies", "no-kd,bogus"], "strategies: expected distinct comma-separated names among no-kd, vanilla"),
    (["--student", "huge"], "student: expected a preset among 6L-768, 12L-1024, small, tiny, got 'huge'"),
    (["--budget", "3 days"], r"budget: expected 24h, 90m, 86400s, 1\.5d, 3e18flop or 4\.6e9tok"),
    (["--charge-teacher", "half"], "charge_teacher: expected none, full or amortized:N"),
    (["--charge-teacher", "amortized:0"], "charge_teacher: expected none, full or amortized:N"),
    (["--batch", "0"], "batch: expected an int >= 1, got 0"),
    (["--device", "tpu"], "device: expected 'cuda', 'cuda:N' or 'cpu', got 'tpu'"),
])
def test_bad_options(argv, message):
    with pytest.raises(ValueError, match=message):
        calibrate.options_from(parse("--quick", "--device", "cpu", *argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    assert main(["bench", "budget", "--quick", "--device", "cuda"]) == 2
    assert "device: expected a CUDA device for --device cuda, got none" in capsys.readouterr().err


def test_teacher_the_device_cannot_hold(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 ** 30)
    assert main(["bench", "budget", "--device", "cpu", "--teacher", "bert-large-config", "--student", "6L-768",
                 "--batch", "64"]) == 2
    err = capsys.readouterr().err
    assert "teacher: expected a teacher and training step that fit on cpu (1.00 GiB free)" in err
    assert "GiB needed: teacher 335M params" in err


def test_budget_smaller_than_one_step(tmp_path):
    options = calibrate.options_from(parse(*TINY, "--strategies", "no-kd", "--budget", "100tok"))
    with pytest.raises(ValueError, match=r"budget: expected at least one step \(128 tokens per step.* got 100 "
                                         r"tokens = 0\.781 steps \(strategy 'no-kd'\)"):
        calibrate.calibrate(options)


def test_teacher_charge_reduces_or_exhausts_the_budget():
    calibration = Calibration(ms_per_step=100.0, tokens_per_step=1000, flops_per_step=1e12)
    budget = Budget(1000.0, "s")  # 10,000 steps
    assert calibrate.budget_for(calibration, budget, 0.0, "vanilla")[0] == 10_000
    steps, _, notes = calibrate.budget_for(calibration, budget, 2.5e15, "vanilla")  # 2,500 steps' FLOPs
    assert steps == 7_500 and "teacher charge 2.5e+15 FLOPs" in notes[0]
    steps, exact, notes = calibrate.budget_for(calibration, budget, 1e17, "vanilla")
    assert steps == 0 and exact == 0 and "exceeds the budget" in notes[0]
    assert charge_fraction("amortized:4") == 0.25 and charge_fraction("full") == 1.0


def test_a_failing_selftest_stops_the_calibration(monkeypatch):
    from kdfast import selftest
    bad = selftest.Result(op="kd_kl", backend="cpu", dtype="float32", status="FAIL", detail="grad err 3e-1")
    monkeypatch.setattr(selftest, "check", lambda device: [bad])
    with pytest.raises(ValueError, match="selftest: expected every kdfast backend to match the reference on cpu, "
                                         "got 1 failure"):
        calibrate.selftest(torch.device("cpu"))
