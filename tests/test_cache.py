"""Teacher cache: build, fingerprint, serving aligned with the data stream, corrupt/truncated shards,
an interrupted (ENOSPC) build, and the refusals (K > V, dynamic masking)."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast.apps import teacher_cache_build as builder
from kdfast.apps.teacher_cache import ensure
from kdfast.cache import fingerprint, sparse, store
from kdfast.cache.serve import TeacherCache
from kdfast.data.dataset import PretrainData
from kdfast.data.stream import BatchStream, MaskingConfig
from kdfast.models import ModelPlan, run_model
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context

V, L, N = 120, 24, 21


class Vocab:
    """The one tokenizer method a fingerprint reads."""

    def __init__(self, size: int):
        self.size = size

    def get_vocab(self) -> dict:
        return {f"t{i}": i for i in range(self.size)}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)).eval()
    sequences = torch.randint(5, V, (N, L), dtype=torch.int32)
    sequences[:, 0], sequences[:, -1] = 2, 3
    data = PretrainData(sequences, sequences[:2], MaskingConfig(V, 4, (0, 2, 3, 4), "static", 0.15, 5))
    return teacher, data


def make(tmp_path, setup, spec="topk:8", seed=0, **kw):
    teacher, data = setup
    return ensure(tmp_path / "cache", teacher, Vocab(V), data, seed, sparse.SparseSpec.parse(spec), 1.0,
                  batch_size=4, **kw)


def stream_batch(data, cache: TeacherCache, seed=0):
    stream = BatchStream(data.train, 6, data.masking, seed)
    return cache.attach(stream.next)()


@pytest.mark.parametrize("spec", ["topk:8", "sample:8"])
def test_served_targets_line_up_with_the_stream_and_the_teacher(tmp_path, setup, spec):
    teacher, data = setup
    cache = make(tmp_path, setup, spec)
    batch = stream_batch(data, cache)
    labelled = batch["labels"] != -100
    ids, weights = batch["teacher_ids"], batch["teacher_weights"]
    assert ids.shape == weights.shape == (int(labelled.sum()), 8)
    with torch.no_grad():
        p = torch.softmax(run_model(teacher, batch, ModelPlan(decoder=True)).logits(labelled), -1)
    if spec.startswith("topk"):
        top = p.topk(8, -1)
        assert torch.equal(ids, top.indices)
        assert torch.allclose(weights, top.values / top.values.sum(1, keepdim=True), rtol=2e-3)
    else:
        valid = ids >= 0
        assert torch.allclose(weights.sum(1), torch.ones(ids.shape[0]), atol=1e-3)   # r = p: w = count/K
        assert bool((p.gather(1, ids.clamp_min(0))[valid] > 0).all())
    index = cache.index
    assert index["masked_tokens"] == sum(e["masked"] for e in index["shards"]) and index["teacher_flops"] > 0
    assert index["fingerprint"]["sparse"]["kind"] == spec[:-2].rstrip(":")


def test_bytes_per_masked_token_at_k32(tmp_path, setup):
    """K=32: int16 ids (V <= 32768) + fp16 weights + int16 position + fp16 leftover, plus offsets."""
    index = make(tmp_path, setup, "topk:32").index
    assert index["bytes_per_masked_token"] <= 200
    assert 2 * 32 + 2 * 32 + 2 + 2 <= index["bytes_per_masked_token"]
    assert store.id_dtype(30522) == torch.int16 and store.id_dtype(50265) == torch.int32   # 4*32+2*32+4 = 196 B


def test_a_different_fingerprint_is_refused_naming_the_field(tmp_path, setup):
    make(tmp_path, setup)
    with pytest.raises(ValueError, match="different masking_seed"):
        make(tmp_path, setup, seed=1)
    with pytest.raises(ValueError, match="different sparse"):
        make(tmp_path, setup, "sample:8")


def test_truncated_or_corrupt_shards_are_named(tmp_path, setup):
    cache = make(tmp_path, setup)
    shard = tmp_path / "cache" / cache.index["shards"][0]["file"]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(ValueError, match=f"{shard}.*truncated"):
        TeacherCache(tmp_path / "cache")
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(ValueError, match=f"{shard}.*corrupt"):
        TeacherCache(tmp_path / "cache")
    shard.write_bytes(b"\xff" * len(raw))  # a broken header, with the CRC check off
    with pytest.raises(ValueError, match=f"{shard}.*unreadable header"):
        TeacherCache(tmp_path / "cache", verify=False)


def test_enospc_mid_build_leaves_no_shard_a_later_run_reads(tmp_path, setup, monkeypatch):
    monkeypatch.setattr(builder, "SHARD_ROWS", 20)  # several shards; the second write fails
    real = store.atomic_open
    calls = []

    def failing_open(path):
        calls.append(path)
        if len(calls) == 2:
            class Full:
                def __enter__(self):
                    self.inner = real(path)
                    self.f = self.inner.__enter__()
                    return self

                def write(self, data):
                    self.f.write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")

                def __exit__(self, *exc):
                    return self.inner.__exit__(*exc)
            return Full()
        return real(path)

    monkeypatch.setattr(store, "atomic_open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        make(tmp_path, setup)
    folder = tmp_path / "cache"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [store.shard_name(0, 0)]          # the whole first shard; no temporary, no second, no index
    with pytest.raises(ValueError, match="cache.json.*did not finish"):
        TeacherCache(folder)
    monkeypatch.setattr(store, "atomic_open", real)
    assert make(tmp_path, setup).index["sequences"] == N   # a rerun builds it whole


def test_each_rank_builds_its_own_shards(tmp_path, setup, monkeypatch):
    teacher, data = setup
    monkeypatch.setattr(distributed, "barrier", lambda context: None)
    spec = sparse.SparseSpec.parse("topk:4")
    wanted = fingerprint.make(Vocab(V), teacher, data.train, data.masking, 0, spec, 1.0)
    for rank in (1, 0):  # rank 0 writes cache.json from both ranks' reports
        builder.build(teacher, data.train, data.masking, tmp_path / "c", spec, 1.0, 0, wanted, Context(rank, 2),
                      batch_size=4)
    cache = TeacherCache(tmp_path / "c", wanted)
    assert {e["file"] for e in cache.index["shards"]} == {store.shard_name(0, 0), store.shard_name(1, 0)}
    assert cache.index["sequences"] == N
    assert json.loads((tmp_path / "c" / "rank-0001.json").read_text())["sequences"] == 10
    single = make(tmp_path, setup, "topk:4")
    batch = stream_batch(data, single)
    assert torch.equal(cache.targets(batch["sequence_index"], batch["labels"])[0], batch["teacher_ids"])


def test_refusals(tmp_path, setup):
    teacher, data = setup
    with pytest.raises(ValueError, match=f"K <= the teacher's vocabulary size {V}, got K={V + 1}"):
        make(tmp_path, setup, f"topk:{V + 1}")
    dynamic = PretrainData(data.train, data.heldout, MaskingConfig(V, 4, (0, 2, 3, 4), "dynamic"))
    with pytest.raises(ValueError, match="static.*new masked positions"):
        make(tmp_path, (teacher, dynamic))
    with pytest.raises(ValueError, match="sparse: expected 'topk:K' or 'sample:K'"):
        sparse.SparseSpec.parse("top:3")
