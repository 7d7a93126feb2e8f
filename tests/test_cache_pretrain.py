"""`kdfast pretrain` with a cached arm in limited-data mode: the cache is built once over the unique
slice (before the clock), reused every epoch, and reported; dynamic masking is refused."""
from __future__ import annotations

import json

import pytest
from trainer_fixtures import TINY_MODEL, write_corpus
from transformers import BertConfig, BertForMaskedLM

from kdfast.cli import main
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
    return main(args)


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
