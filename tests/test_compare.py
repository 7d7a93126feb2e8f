"""`kdfast compare`: bad input is refused before any training, and a miniature run writes the report."""
import json
import os

import pytest
from trainer_fixtures import TINY_MODEL, write_corpus

from kdfast.cli import run_command


def _compare(tmp_path, *extra):
    """The tiny preset on a miniature model; KEY=VALUE overrides go together after the options."""
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    options = [e for e in extra if e not in overrides]
    return run_command(["compare", "--preset", "tiny", "--data", str(write_corpus(tmp_path)), "--out",
                        str(tmp_path / "out"), "--budget", "1024tok", *options, *TINY_MODEL, "teacher.budget=2048tok",
                        "glue.tasks=[]", *overrides])


def _no_training_happened(tmp_path):
    out = tmp_path / "out"
    assert not (out / "teacher" / "checkpoints").exists() and not (out / "arms").exists()
    return json.loads((out / "crash.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["train.budjet=4h"], "config: unknown key 'train.budjet'; did you mean train.budget"),
    (["--budget", "100tok"], "budget: expected at least one step's cost"),
    (["--budget", "4 parsecs"], "budget: expected 24h"),
    (["strategies=[no-kd, tinybret]"], "strategy: expected one of"),
    (["--charge-teacher", "half"], "charge_teacher: expected none, full or amortized:N"),
    (["--level", "1.5"], r"level: expected an interval level in \(0, 1\)"),
    (["eval.probe_test=5000", "eval.probe_pool=5000"], "probes: expected .* to give the 'bshift' task at least 200"),
    (["glue.tasks=[sst2]", "glue.lr_reference_width=-96"], "lr_reference_width: expected a positive hidden size"),
    (["--replicates", "0"], "train.replicates: expected an integer >= 1"),
    (["train.replicates=9"], r"train.replicates: expected at most 8 \(train.max_replicates"),
])
def test_bad_input_fails_before_training(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _compare(tmp_path, *extra)
    if extra[0] != "train.budjet=4h":                         # config errors come before the run folder exists
        assert message.split(":")[0].split(" ")[0] in _no_training_happened(tmp_path)["message"]


def test_empty_corpus_and_glue_dir_without_split_fail_before_training(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="data: expected a non-empty text corpus"):
        run_command(["compare", "--preset", "tiny", "--data", str(empty), "--out", str(tmp_path / "out"),
                     *TINY_MODEL])
    _no_training_happened(tmp_path)
    (tmp_path / "glue" / "sst2").mkdir(parents=True)
    (tmp_path / "glue" / "sst2" / "train.jsonl").write_text('{"sentence": "good", "label": 1}\n')
    with pytest.raises(ValueError, match="glue_dir: expected sst2/validation.jsonl"):
        _compare(tmp_path, "--glue-dir", str(tmp_path / "glue"), "glue.tasks=[sst2]")
    _no_training_happened(tmp_path)


def test_tokenizer_that_does_not_match_the_teacher_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.data.tokenizer import build_wordpiece

    teacher_dir, other_dir = tmp_path / "teacher", tmp_path / "other"
    tok = build_wordpiece(["the cat sat on the mat again and again"] * 40, 300, teacher_dir)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(str(teacher_dir))
    build_wordpiece(["a completely different vocabulary of words here"] * 40, 300, other_dir)
    with pytest.raises(ValueError, match="tokenizer: expected"):
        _compare(tmp_path, "--teacher", str(teacher_dir), f"teacher.tokenizer={other_dir}")
    _no_training_happened(tmp_path)


@pytest.mark.slow
def test_miniature_comparison_writes_the_report_with_equal_budgets(tmp_path, shared_data):
    os.chdir(tmp_path)
    glue = ("--glue-dir", str(shared_data / "glue"), "glue.tasks=[sst2]", "glue.max_train_examples=64",
            "glue.max_eval_examples=64", "glue.epochs=1", "glue.evaluate_teacher=false")
    assert _compare(tmp_path, *glue) == 0
    out = tmp_path / "out"
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert [a["strategy"] for a in rows] == ["no-kd", "vanilla", "tinybert", "minilm", "teacher", "random-init"]
    arms = rows[:4]
    assert {a["budget_used"] for a in arms} == {1024.0}
    assert all(a["steps"] == 4 and a["tokens"] == 1024 for a in arms)
    # the tiny preset's 3 pretraining replicates: own seeds, shared by the arms (paired), own folders
    assert all([r["replicate"] for r in a["replicates"]] == [0, 1, 2] for a in rows[:4] + rows[5:])
    assert len({tuple(r["seed"] for r in a["replicates"]) for a in rows[:4] + rows[5:]}) == 1
    assert (out / "arms" / "minilm" / "rep2" / "model").is_dir() and (out / "random-init" / "rep2" / "model").is_dir()
    assert report["teacher"]["tokens"] == 2048 and report["teacher"]["final_mlm_loss"] > 0
    assert [a["trains_mlm_head"] for a in arms] == [True, True, False, False]
    expected = {"probe/bshift", "probe/sentlen", "probe/adjacent", "mlm_probe", "glue/sst2"}
    for row in rows:  # every row, the teacher and random-init included, has every metric with an interval
        assert set(row["metrics"]) == expected
        assert all(m["low"] <= m["mean"] <= m["high"] and m["seeds"] >= 2 or name == "mlm_probe"
                   for name, m in row["metrics"].items())
        assert all(m["replicates"] == (1 if row["strategy"] == "teacher" else 3) for m in row["metrics"].values())
    verdicts = report["analysis"]["verdicts"]
    assert {(v["arm"].split()[0], v["metric"]) for v in verdicts} == {(s, m) for s in ("vanilla", "tinybert", "minilm")
                                                                       for m in expected}
    assert all(v["verdict"] in ("better", "worse", "no detectable difference") and "ttest_rel" in v["test"]
               for v in verdicts)
    assert {c["arm"] for c in report["analysis"]["checks"]} == {r["arm"] for r in rows[:5]}
    table = (out / "results.md").read_text()
    assert "| no-kd 1L/32 | no-kd | 1L/32 |" in table and "held-out MLM loss" in table and "## Verdicts" in table
    assert "## Known effects" in table and "## Method" in table and "## Time per phase" in table
    assert "## Where the variance comes from" in table and "No better/worse calls" not in table
    assert (out / "mlm_loss.png").stat().st_size > 1000 and (out / "metrics.png").stat().st_size > 1000
    # a second run resumes from the finished arms and the cached teacher without retraining, and reuses every
    # stored evaluation; with R = 1 (the replicate-0 folders, the single-run layout) it reports differences and
    # intervals but makes no call
    evaluations = sorted((out / "eval").rglob("*"))
    assert _compare(tmp_path, "--resume", *glue, "--replicates", "1") == 0
    assert sorted((out / "eval").rglob("*")) == evaluations
    report = json.loads((out / "results.json").read_text())
    assert {v["verdict"] for v in report["analysis"]["verdicts"]} == {"no call (R = 1)"}
    table = (out / "results.md").read_text()
    assert "**No better/worse calls with R = 1.** A call needs at least 3 pretraining replicates" in table


@pytest.mark.slow
def test_cached_arms_beside_live_arms_in_limited_data_mode(tmp_path):
    """Cached arms train from OUT/teacher-cache/<kind>-<K> (built once, reused over epochs); their
    charge adds the cache's cost (tokens run through the teacher) to the teacher's, and the report
    notes each cache."""
    os.chdir(tmp_path)
    assert _compare(tmp_path, "--strategies", "no-kd,vanilla,vanilla-cached-topk,vanilla-cached-sample",
                    "--masking", "static", "--unique-tokens", "512", "--charge-teacher", "amortized:8",
                    "eval.probe_tasks=[]", "eval.mlm_probe_steps=0", "eval.random_init=false",
                    "glue.evaluate_teacher=false") == 0
    out = tmp_path / "out"
    report = json.loads((out / "results.json").read_text())
    arms = {row["strategy"]: row for row in report["rows"] if row["strategy"] != "teacher"}
    assert arms["no-kd"]["teacher_charge"] == 0 and arms["vanilla"]["teacher_charge"] == 2048 / 8
    for kind in ("topk", "sample"):
        row = arms[f"vanilla-cached-{kind}"]
        assert row["teacher_cache"]["sparse"] == f"{kind}:32" and row["teacher_cache"]["tokens"] == 512
        assert row["teacher_charge"] == (2048 + 512) / 8 and row["epochs"] >= 1 and row["steps"] >= 1
        assert (out / "teacher-cache" / f"{kind}-32" / "cache.json").is_file()
    table = (out / "results.md").read_text()
    assert "Teacher cache of vanilla-cached-sample 1L/32: sample:32, proposal softmax(t/1)" in table
