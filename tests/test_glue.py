"""Task folders and custom task specs (refused before training), and the fine-tuning path on shared data."""
import json

import pytest
import torch

from kdfast.eval import glue, glue_tasks, stats


def test_glue_dir_missing_a_split_is_refused(tmp_path):
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "train.jsonl").write_text(json.dumps({"sentence": "a b", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"glue_dir: expected cola/validation.jsonl in .*, got no such file"):
        glue_tasks.check_dir(str(tmp_path), glue_tasks.parse_tasks("cola"))
    with pytest.raises(ValueError, match="tasks: expected names among"):
        glue_tasks.parse_tasks("cola,imdb")


@pytest.mark.slow
def test_glue_path_on_shared_tasks_gives_sane_metrics(shared_data, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.data.tokenizer import build_wordpiece

    glue_dir = shared_data / "glue"
    texts = []
    for task in ("cola", "sst2", "stsb"):
        for row in glue_tasks.load_rows(glue_tasks.TASKS[task], "train", str(glue_dir)):
            texts += [row[c] for c in glue_tasks.TASKS[task].columns]
    tokenizer = build_wordpiece(texts, 3000, tmp_path / "model")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128))
    model.save_pretrained(str(tmp_path / "model"))
    results = glue.evaluate_model(str(tmp_path / "model"), glue_tasks.parse_tasks("cola,sst2,stsb"), str(glue_dir),
                                  seeds=[0, 1], lrs=[3e-3], batch_sizes=[64], epochs=3, seq_len=32,
                                  device=torch.device("cpu"), max_train_examples=1000, max_eval_examples=200)
    summary = {name: r.summary() for name, r in results.items()}
    assert set(summary) == {"cola", "sst2", "stsb"}
    assert -1.0 <= summary["cola"]["metrics"]["mcc"]["mean"] <= 1.0
    sst2 = summary["sst2"]["metrics"]["accuracy"]
    assert sst2["mean"] > 0.55 and sst2["low"] <= sst2["mean"] <= sst2["high"]  # above chance after 3 short epochs
    assert 0.0 < summary["stsb"]["metrics"]["pearson"]["mean"] <= 1.0
    assert set(summary["stsb"]["metrics"]) == {"pearson", "spearman"}
    assert all(r.scores[r.task.main_metric].predictions.shape == (2, 200) for r in results.values())
    assert all(s["metrics"][s["main_metric"]]["seeds"] == 2 for s in summary.values())


def test_custom_task_specs_are_checked_before_training(tmp_path):
    spec = {"reviews": {"columns": ["text"], "num_labels": 2, "metrics": ["accuracy", "f1"]},
            "similar": {"columns": ["a", "b"], "num_labels": 1, "metrics": "spearman"}}
    reviews, similar = glue_tasks.parse_tasks("reviews,similar,cola", spec)[:2]
    assert reviews.columns == ("text",) and reviews.main_metric == "accuracy" and similar.metrics == ("spearman",)
    (tmp_path / "reviews").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "reviews" / f"{split}.jsonl").write_text(json.dumps({"review": "fine", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"glue_dir: expected columns \('text', 'label'\) in .*train.jsonl, got "
                                         r"line 1 without \['text'\]"):
        glue_tasks.check_dir(str(tmp_path), [reviews])
    bad = [({"columns": [], "num_labels": 2}, "columns: expected one or two text column names"),
           ({"columns": ["a", "b", "c"], "num_labels": 2}, "columns: expected one or two"),
           ({"columns": ["a"], "num_labels": 0}, "num_labels: expected an int >= 1"),
           ({"columns": ["a"], "num_labels": 1, "metrics": ["accuracy"]}, "metrics: expected names among pearson"),
           ({"columns": ["a"], "num_labels": 3, "metrics": ["auc"]}, "metrics: expected names among accuracy"),
           ({"columns": ["a"], "num_labels": 2, "label": "y"}, "expected keys among columns"),
           (["a"], "expected a mapping")]
    for spec, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            glue_tasks.parse_tasks("mine", {"mine": spec})


def test_custom_task_from_a_spec_file_runs_end_to_end(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.cli import main, run_command
    from kdfast.data.tokenizer import build_wordpiece

    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [{"text": f"this is {words[i % 6]} stuff", "label": int(i % 6 < 3)} for i in range(120)]
    (tmp_path / "data" / "mood").mkdir(parents=True)
    for split, part in (("train", rows[:80]), ("validation", rows[80:])):
        (tmp_path / "data" / "mood" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    (tmp_path / "spec.yaml").write_text("mood: {columns: [text], num_labels: 2, metrics: [accuracy, mcc]}\n")
    tokenizer = build_wordpiece([r["text"] for r in rows], 200, tmp_path / "model")
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "results.json"
    assert main(["glue", "--model", str(tmp_path / "model"), "--tasks", "mood", "--task-spec",
                 str(tmp_path / "spec.yaml"), "--data-dir", str(tmp_path / "data"), "--seeds", "0,1",
                 "--lrs", "3e-3,1e-4",                 "--select", "dev", "--epochs", "3", "--json", str(out)]) == 0
    mood = json.loads(out.read_text())["mood"]
    assert set(mood["metrics"]) == {"accuracy", "mcc"} and mood["metrics"]["accuracy"]["seeds"] == 2
    assert [g["lr"] for g in mood["grid"]] == [3e-3, 1e-4] and all(g["on"].startswith("dev (8 held out")
                                                                   for g in mood["grid"])
    assert mood["lr"] == max(mood["grid"], key=lambda g: g["mean"]["accuracy"])["lr"]
    with pytest.raises(ValueError, match=r"level: expected an interval level in \(0, 1\)"):
        run_command(["glue", "--model", str(tmp_path / "model"), "--tasks", "mood", "--task-spec",
                     str(tmp_path / "spec.yaml"), "--data-dir", str(tmp_path / "data"), "--level", "95"])
    assert stats.RESAMPLES >= 1000


def test_learning_rates_scale_with_the_models_width(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=96, num_attention_heads=4).save_pretrained(tmp_path)
    assert glue.width_scaled(str(tmp_path), [3e-4, 1e-4], 256) == pytest.approx([8e-4, 256e-4 / 96])
    assert glue.width_scaled(str(tmp_path), [3e-4], None) == [3e-4]
    for bad in (0, -256, 2.5, True):
        with pytest.raises(ValueError, match="lr_reference_width: expected a positive hidden size"):
            glue.width_scaled(str(tmp_path), [3e-4], bad)
