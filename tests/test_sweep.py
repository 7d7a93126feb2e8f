"""`kdfast sweep`: budgets checked before training, one LR schedule per cell, finished cells reused."""
import json
import time

import pytest
from trainer_fixtures import TINY_MODEL, write_corpus

from kdfast.apps import compare, sweep
from kdfast.budget.units import Budget
from kdfast.cli import main, run_command
from kdfast.train.clock import lr_factor

STEP_TOKENS = 8 * 32                                           # TINY_MODEL: batch 8 x seq 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))        # seconds: written once for these tests


def _sweep(tmp_path, corpus, budgets, *extra):
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    options = [e for e in extra if e not in overrides]
    return run_command(["sweep", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "out"),
                        "--budgets", budgets, *options, *TINY_MODEL, "teacher.budget=2048tok", "glue.tasks=[]",
                        "strategies=[no-kd, vanilla]", "sweep.draws=50", "train.checkpoint_steps=4", *overrides])


@pytest.mark.parametrize("spec, expected", [
    ("15s,45s,135s", [15.0, 45.0, 135.0]),
    ({"start": "15s", "factor": 3, "count": 3}, [15.0, 45.0, 135.0]),
    (["1e6tok", "4e6tok"], [1e6, 4e6]),
])
def test_budgets_from_a_list_or_a_geometric_series(spec, expected):
    budgets = sweep.parse_budgets(spec)
    assert [b.amount for b in budgets] == pytest.approx(expected) and len({b.unit for b in budgets}) == 1


@pytest.mark.parametrize("spec, message", [
    ("15s,1e6tok", "sweep.budgets: expected one unit for every budget, got 15s, 1e\\+06tok"),
    ("45s,15s", "sweep.budgets: expected strictly increasing budgets, got 15s after 45s"),
    ("15s,15s", "strictly increasing budgets, got 15s after 15s"),
    ("15s", "sweep.budgets: expected at least 2 budgets, got 1"),
    ({"start": "15s", "factor": 1, "count": 3}, "expected factor > 1"),
])
def test_bad_budgets_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_budgets(spec)


@pytest.mark.parametrize("budgets, message", [
    ("100tok,1024tok", r"budget of cell 100tok/no-kd: expected at least one step's cost, 256 tokens .* got 100 "
                       r"tokens, which buys 0.391 steps"),
    ("1e6flop,1e12flop", r"budget of cell 1e\+06flop/no-kd: expected at least one step's cost, .* FLOPs .* got "
                         r"1e\+06 FLOPs, which buys 0.0\d+ steps"),
])
def test_budget_that_cannot_buy_a_step_is_refused_before_any_training(tmp_path, corpus, budgets, message):
    with pytest.raises(ValueError, match=message):
        _sweep(tmp_path, corpus, budgets)
    out = tmp_path / "out"
    assert not (out / "teacher").exists() and not (out / "cells").exists()
    assert "/no-kd: expected at least one step" in json.loads((out / "crash.json").read_text())["message"]


def _lrs(cell_dir):
    rows = [json.loads(line) for line in (cell_dir / "log.jsonl").read_text().splitlines()]
    return [r["lr"] for r in rows if r["event"] == "train"]


@pytest.mark.slow
def test_each_cell_has_its_own_schedule_and_a_rerun_reuses_finished_cells(tmp_path, corpus, monkeypatch):
    assert _sweep(tmp_path, corpus, "1024tok,2048tok") == 0
    out = tmp_path / "out"
    report = json.loads((out / "sweep.json").read_text())
    assert [(c["cell"], c["strategy"], c["steps"]) for c in report["cells"]] == [
        ("1024tok", "no-kd", 4), ("1024tok", "vanilla", 4), ("2048tok", "no-kd", 8), ("2048tok", "vanilla", 8)]
    assert all(c["metrics"] for c in report["cells"]) and report["fingerprint"]["teacher"]["sha256"]
    for budget in (1024, 2048):                                 # the LR decays to zero at the cell's own budget
        lrs = _lrs(out / "cells" / f"{budget}tok" / "no-kd")
        steps = budget // STEP_TOKENS
        assert lrs == pytest.approx([1e-3 * lr_factor(k * STEP_TOKENS / budget, 0.06) for k in range(steps)])
    assert _lrs(out / "cells" / "1024tok" / "no-kd")[2] < _lrs(out / "cells" / "2048tok" / "no-kd")[2]
    assert "| 2048tok | vanilla |" in (out / "sweep.md").read_text()
    assert all((out / p).stat().st_size > 1000 for p in report["plots"])

    trained = []
    real = compare.train_arms
    monkeypatch.setattr(compare, "train_arms",
                        lambda config, *a, **k: trained.append(a[2].name) or real(config, *a, **k))
    start = time.perf_counter()
    assert _sweep(tmp_path, corpus, "1024tok,2048tok") == 0             # every cell finished: nothing is trained
    assert trained == [] and time.perf_counter() - start < 60
    assert _sweep(tmp_path, corpus, "1024tok,2048tok,4096tok") == 0     # one more budget: only its cells are trained
    assert trained == ["4096tok"]
    with pytest.raises(ValueError, match="out: expected the recipe of the cells already in .* got train.lr = 0.002 "
                                         "where they have 0.001"):
        _sweep(tmp_path, corpus, "1024tok,2048tok", "train.lr=2e-3")

    cell = out / "cells" / "2048tok" / "vanilla"                # as if killed after its step-4 checkpoint
    (cell / "summary.json").unlink()
    for late in sorted((cell / "checkpoints").iterdir())[1:]:
        late.unlink()
    assert sorted(p.name for p in (cell / "checkpoints").iterdir()) == ["step-000000004.pt"]
    with pytest.raises(ValueError, match="expected a fresh run folder or --resume"):
        _sweep(tmp_path, corpus, "1024tok,2048tok")
    trained.clear()
    assert _sweep(tmp_path, corpus, "1024tok,2048tok", "--resume") == 0
    steps = [json.loads(line)["step"] for line in (cell / "log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert trained == ["2048tok"] and steps == list(range(1, 9))   # continued from step 4, every step once


def test_snapshots_are_labelled_as_an_approximation(tmp_path, corpus):
    assert _sweep(tmp_path, corpus, "1024tok,2048tok", "--snapshots", "strategies=[no-kd]") == 0
    out = tmp_path / "out"
    report = json.loads((out / "sweep.json").read_text())
    assert "approximation" in report["approximation"] and all(c["approximation"] == "snapshot" for c in report["cells"])
    small = report["cells"][0]
    assert small["cell"] == "1024tok" and small["steps"] == 4 and "snapshots" in small["model"]
    assert not (out / "cells").exists() and "**Approximation.**" in (out / "sweep.md").read_text()
    assert Budget(1024, "tok").tag == "1024tok"


def test_tiny_sweep_preset_extends_tiny():
    from kdfast.train import config as config_lib

    tiny, preset = config_lib.load(preset="tiny"), config_lib.load(preset="tiny-sweep")
    assert preset["student"] == tiny["student"] and preset["teacher"] == tiny["teacher"]
    assert [b.tag for b in sweep.parse_budgets(preset["sweep"]["budgets"])] == ["10s", "30s", "90s"]


@pytest.mark.slow
def test_a_sweep_in_a_compare_folder_reuses_its_teacher_and_reports_with_it(tmp_path, corpus):
    assert main(["compare", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "out"), "--budget",
                 "4096tok", *TINY_MODEL, "teacher.budget=2048tok", "glue.tasks=[]", "strategies=[no-kd, vanilla]"]) == 0
    teacher = (tmp_path / "out" / "teacher" / "summary.json").stat().st_mtime
    assert _sweep(tmp_path, corpus, "1024tok,2048tok") == 0
    assert (tmp_path / "out" / "teacher" / "summary.json").stat().st_mtime == teacher      # not retrained
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "merged"), "--draws", "50"]) == 0
    merged = json.loads((tmp_path / "merged" / "sweep.json").read_text())    # fingerprints of both files agree
    assert merged["budgets"] == ["1024tok", "2048tok", "4096tok"] and len(merged["cells"]) == 6
    assert len(merged["crossovers"]) == len(merged["metrics"]) > 0
