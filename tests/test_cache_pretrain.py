"""`kdfast pretrain` with a cached arm in limited-data mode: the cache is built once over the unique
slice (before the clock), reused every epoch, and reported; dynamic masking is refused."""
from __future__ import annotations

import json

import pytest
from trainer_fixtures import TINY_MODEL, write_corpus
from transformers import BertConfig, BertForMaskedLM

from kdfast.cli import main, run_command
from kdfast.data.tokenizer import build_wordpiece


@pytest.fixture
def teacher_dir(tmp_path):
    folder = tmp_path / "teacher"
    tokenizer = build_wordpiece([write_corpus(tmp_path).read_text()], 600, folder)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(folder))
    return folder


def _pretrain(tmp_path, teacher_dir, *extra):
    args = ["pretrain", "--strategy", "vanilla-cached-sample", "--teacher", str(teacher_dir), "--data",
            str(tmp_path / "corpus.txt"), "--unique-tokens", "1024", "--budget", "4096tok", "--out",
            str(tmp_path / "run"), "--device", "cpu", *TINY_MODEL, "teacher.cache_k=8", *extra]
    return run_command(args)


def test_cached_arm_trains_over_epochs_from_one_cache(tmp_path, teacher_dir):
    assert _pretrain(tmp_path, teacher_dir, "--masking", "static") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cache = summary["teacher_cache"]
    assert summary["steps"] == 16 and summary["epochs"] == 4 and summary["unique_tokens"] == 1024
    assert cache["sparse"] == "sample:8" and cache["tokens"] == 1024 and cache["teacher_flops"] > 0
    assert cache["directory"] == str(tmp_path / "run" / "teacher-cache" / "sample-8")
    assert (tmp_path / "run" / "teacher-cache" / "sample-8" / "cache.json").is_file()


def test_dynamic_masking_is_refused_with_the_reason(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="dynamic masking draws new masked positions"):
        _pretrain(tmp_path, teacher_dir, "--masking", "dynamic")
    assert not (tmp_path / "run" / "teacher-cache").exists()


def test_cli_build_then_pretrain_reuses_it(tmp_path, teacher_dir, capsys):
    root = tmp_path / "caches"
    common = ["--teacher", str(teacher_dir), "--data", str(tmp_path / "corpus.txt"), "--unique-tokens", "1024",
              "--masking", "static", "--device", "cpu", "data.seq_len=32"]
    assert main(["teacher-cache", "build", "--sparse", "topk:8", "--out", str(root / "topk-8"), *common]) == 0
    assert "topk:8, 32 sequences" in capsys.readouterr().out
    index = (root / "topk-8" / "cache.json").read_text()
    assert _pretrain(tmp_path, teacher_dir, "--masking", "static", "--strategy", "vanilla-cached-topk",
                     "--teacher-cache", str(root)) == 0
    assert (root / "topk-8" / "cache.json").read_text() == index          # reused, not rebuilt
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["teacher_cache"]["sparse"] == "topk:8"
    with pytest.raises(ValueError, match="expected 'static'"):
        run_command(["teacher-cache", "build", "--sparse", "topk:8", "--out", str(tmp_path / "x"), *common[:-3],
              "--masking", "dynamic"])


def test_a_corrupt_shard_prints_one_error_line_and_exits_2(tmp_path, teacher_dir, capsys, monkeypatch):
    monkeypatch.delenv("KDFAST_DEBUG", raising=False)
    out = tmp_path / "topk-8"
    command = ["teacher-cache", "build", "--sparse", "topk:8", "--out", str(out), "--teacher", str(teacher_dir),
               "--data", str(tmp_path / "corpus.txt"), "--unique-tokens", "1024", "--masking", "static",
               "--device", "cpu", "data.seq_len=32"]
    assert main(command) == 0
    shard = next(out.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("kdfast: error:")]
    assert f"teacher cache: {shard}: expected CRC-32" in line and "rebuild it with `kdfast teacher-cache build`" in line
