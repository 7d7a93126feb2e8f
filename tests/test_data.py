"""Corpus checks, packing, MLM masking and the shared batch order."""
from pathlib import Path

import pytest
import torch
from trainer_fixtures import write_corpus

from kdfast.data import corpus, dataset, packing
from kdfast.data import tokenizer as tokenizers
from kdfast.data.masking import IGNORE, mask_tokens, seeded
from kdfast.data.stream import BatchStream, MaskingConfig


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    docs = corpus.documents([str(write_corpus(folder))])
    return tokenizers.build_wordpiece(docs, 500, folder / "tokenizer")


def test_empty_and_binary_corpus_files_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="data: expected a non-empty text corpus, got .*empty"):
        corpus.check_sources([str(empty)])
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(ValueError, match="binary"):
        corpus.check_sources([str(binary)])
    with pytest.raises(ValueError, match="not found"):
        corpus.check_sources([str(tmp_path / "missing.txt")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="none found"):
        corpus.check_sources([str(tmp_path / "sub")])


def test_packing_fills_sequences_with_cls_and_sep(tok, tmp_path):
    seqs = packing.pack(corpus.documents([str(write_corpus(tmp_path, 20_000))]), tok, 32)
    assert seqs.dtype == torch.int32 and seqs.shape[1] == 32 and seqs.shape[0] > 10
    assert bool((seqs[:, 0] == tok.cls_token_id).all()) and bool((seqs[:, -1] == tok.sep_token_id).all())
    assert bool((seqs != tok.pad_token_id).all())
    assert packing.pack(corpus.documents([str(tmp_path / "corpus.txt")]), tok, 32, max_sequences=3).shape[0] == 3


def test_dynamic_masking_is_15_percent_with_80_10_10():
    ids = torch.randint(10, 1000, (64, 128))
    ids[:, 0] = 1
    masked, labels = mask_tokens(ids, seeded(0, 0), 1000, mask_id=4, special=(1,))
    chosen = labels != IGNORE
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert not bool(chosen[:, 0].any())                       # special tokens never predicted
    assert bool((labels[chosen] == ids[chosen]).all())
    as_mask = (masked[chosen] == 4).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and 0.07 < kept < 0.14   # 10% kept (+ random hits of the same token)
    assert bool((masked[~chosen] == ids[~chosen]).all())


def test_static_masking_caps_predictions_and_is_fixed_per_sequence(tok, tmp_path):
    seqs = packing.pack(corpus.documents([str(write_corpus(tmp_path, 20_000))]), tok, 128)
    masking = MaskingConfig(len(tok), tok.mask_token_id, (tok.cls_token_id, tok.sep_token_id), "static", 0.3, 20)
    first = BatchStream(seqs, 4, masking, seed=3)
    epoch_batches = [first.next() for _ in range(seqs.shape[0] // 4 * 2)]
    assert max(int((b["labels"] != IGNORE).sum(1).max()) for b in epoch_batches) == 20
    # the same sequence gets the same masks in both epochs
    seen = {}
    for b in epoch_batches:
        for row, labels in zip(b["input_ids"], b["labels"]):
            key = tuple(torch.where(labels != IGNORE, labels, row).tolist())
            seen.setdefault(key, set()).add(tuple(labels.tolist()))
    assert all(len(masks) == 1 for masks in seen.values())


def test_stream_order_is_shared_sharded_and_resumable():
    seqs = torch.arange(10 * 16, dtype=torch.int32).view(10, 16) + 10
    masking = MaskingConfig(500, 4, (), "dynamic")
    a, b = BatchStream(seqs, 4, masking, seed=1), BatchStream(seqs, 4, masking, seed=1)
    for _ in range(3):
        assert torch.equal(a.next()["input_ids"], b.next()["input_ids"])
    assert a.epochs == pytest.approx(1.2)
    state = a.state_dict()
    expected = a.next()
    resumed = BatchStream(seqs, 4, masking, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next()["labels"], expected["labels"])
    ranks = [BatchStream(seqs, 4, masking, seed=1, rank=r, world=2) for r in range(2)]
    whole = BatchStream(seqs, 4, masking, seed=1).next()
    shards = [r.next() for r in ranks]
    assert torch.equal(torch.cat([shards[0]["input_ids"][:1], shards[1]["input_ids"][:1]]), whole["input_ids"][:2])
    with pytest.raises(ValueError, match="batch_size: expected a multiple of the world size 2, got 3"):
        BatchStream(seqs, 3, masking, world=2)


def test_unique_tokens_limits_the_distinct_data(tok, tmp_path):
    path = str(write_corpus(tmp_path))
    data = dataset.load([path], tok, 32, unique_tokens=320)
    assert data.train.shape == (10, 32) and data.unique_tokens == 320 and data.heldout.shape[0] >= 1
    with pytest.raises(ValueError, match="unique_tokens: expected at most the corpus size"):
        dataset.load([path], tok, 32, unique_tokens=10**9)


def test_tokenizer_mismatch_is_named(tok, tmp_path):
    with pytest.raises(ValueError, match="tokenizer: expected 30522 tokens to match the teacher's vocabulary, got 500"):
        tokenizers.check_matches(tok, 30522)
    other = tokenizers.build_wordpiece(["alpha beta gamma delta"] * 50, 500, Path(tmp_path) / "other")
    with pytest.raises(ValueError, match="differs"):
        tokenizers.check_matches(other, len(other), tok)
