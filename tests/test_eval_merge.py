"""`kdfast report`: compare/sweep folders merge into one report across budgets, or are refused with the reason."""
import json
import math

import pytest

from kdfast.cli import main, run_command

FINGERPRINT = {"corpus": {"sha256": "c0", "describe": "wiki"}, "tokenizer": {"sha256": "t0", "describe": "4096"},
               "teacher": {"sha256": "a0", "describe": "4L/256 pretrained here"}}


def _metrics(mean):
    return {"probe/bshift": {"mean": mean, "low": mean - 0.01, "high": mean + 0.01, "se": 0.005, "level": 0.95,
                             "higher_is_better": True, "method": "test", "seeds": [0], "n": 500}}


def _arm(strategy, budget):
    slope = {"no-kd": 0.10, "vanilla": 0.04}[strategy]          # planted crossing at 400 s
    return {"strategy": strategy, "shape": "2L/96", "budget_amount": budget, "budget_unit": "s",
            "budget_used": budget, "steps": int(budget), "tokens": int(budget) * 4096, "epochs": 0.1,
            "metrics": _metrics(0.6 + slope * math.log(budget / 400))}


def _compare_folder(path, budget, fingerprint=FINGERPRINT):
    path.mkdir()
    teacher = {"arm": "teacher", "strategy": "teacher", "shape": "4L/256", "budget_used": 330.0, "budget_unit": "s",
               "description": "4L/256", "metrics": _metrics(0.9)}
    rows = [_arm(s, budget) for s in ("no-kd", "vanilla")] + [teacher]
    (path / "results.json").write_text(json.dumps({
        "name": "tiny", "budget": f"{budget:g}s", "corpus": "wiki", "unique_tokens": 10**6, "rows": rows,
        "teacher": teacher, "analysis": {"metrics": ["probe/bshift"], "verdicts": []},
        "fingerprint": fingerprint, "config": {"data": {"unique_tokens": None}}}))
    return str(path)


def test_compare_folders_at_several_budgets_merge_into_a_sweep_report(tmp_path):
    folders = [_compare_folder(tmp_path / f"b{b}", b) for b in (50, 150, 450, 1350, 4050)]
    assert main(["report", *folders, "--out", str(tmp_path / "report"), "--draws", "200",
                 "--charge-teacher", "amortized:10"]) == 0
    report = json.loads((tmp_path / "report" / "sweep.json").read_text())
    assert report["budgets"] == ["50s", "150s", "450s", "1350s", "4050s"] and len(report["cells"]) == 10
    plain, charged = report["crossovers"]
    assert plain["verdict"] == "crossover" and plain["low"] < 400 < plain["high"]
    assert charged["teacher_charge"] == 33.0 and charged["estimate"] < plain["estimate"]
    text = (tmp_path / "report" / "sweep.md").read_text()
    assert "vanilla ahead below ≈" in text and "amortized:10 (+33s)" in text
    assert (tmp_path / "report" / "sweep_probe_bshift.png").stat().st_size > 1000


@pytest.mark.parametrize("field", ["corpus", "tokenizer", "teacher"])
def test_folders_with_another_corpus_tokenizer_or_teacher_are_refused(tmp_path, field):
    other = {**FINGERPRINT, field: {"sha256": "ff", "describe": "something else"}}
    first, second = _compare_folder(tmp_path / "a", 50), _compare_folder(tmp_path / "b", 150, other)
    with pytest.raises(ValueError, match=f"b/results.json: expected the {field} of .*a/results.json, .* "
                                         f"\\(sha256 {FINGERPRINT[field]['sha256']}"
                                         f"\\), got something else \\(sha256 ff\\)"):
        run_command(["report", first, second, "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()


def test_the_same_cell_twice_or_a_folder_without_results_is_refused(tmp_path):
    first, second = _compare_folder(tmp_path / "a", 50), _compare_folder(tmp_path / "b", 50)
    with pytest.raises(ValueError, match="b/results.json: expected cells not already in .*a/results.json, got "
                                         "50s/no-kd in both"):
        run_command(["report", first, second])
    with pytest.raises(ValueError, match="report: expected sweep.json or results.json in"):
        run_command(["report", first, str(tmp_path)])
