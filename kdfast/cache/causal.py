"""Serve a causal-LM teacher cache to training: the packed sequences it was built from, and the sparse
targets of every target position (position i predicts token i+1), memory-mapped.

Layout (``kdfast.cache.store`` containers, columns encoded by ``kdfast.cache.codec``): shard
``shard-rRRRR-pPPPPP.safetensors`` holds S sequences of length L: ``sequence`` [S] int64 (index in the
packed corpus), ``offsets`` [S+1] int64 (= (L-1)·s), ``input_ids`` uint8 [S, L, B], and for their
S·(L-1) targets ``ids`` uint8 [S·(L-1), K, B] and ``weights`` uint8 [S·(L-1), K, 3]. ``cache.json``
has ``"layout": "causal"``, the fingerprint and the build statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from kdfast.cache import codec, store
from kdfast.cache import fingerprint as fingerprints
from kdfast.cache.sparse import SparseSpec
from kdfast.runtime.fingerprint import digest, tokenizer_hash, tokens_hash

LAYOUT = "causal"
COLUMNS = {"sequence", "offsets", "input_ids", "ids", "weights"}
TEACHER_FILES = ("config.json", "*.safetensors", "*.bin")


def teacher_files_hash(folder: Union[str, Path]) -> str:
    """Of the files that define a saved HF teacher (config and weights, by content), so a cache can be
    matched to a teacher folder without constructing the model."""
    folder = Path(folder)
    files = sorted({p for pattern in TEACHER_FILES for p in folder.glob(pattern) if p.is_file()})
    if not any(p.name != "config.json" for p in files):
        raise ValueError(f"teacher: expected a saved HF model folder (config.json and weight files), got "
                         f"{str(folder)!r} with none of {', '.join(TEACHER_FILES[1:])}")
    def chunks():
        for path in files:
            yield path.name.encode()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    yield block
    return digest(chunks())


def make_fingerprint(tokenizer, teacher_folder: Union[str, Path], sequences: torch.Tensor, spec,
                     temperature: float) -> dict:
    """What a causal cache was built from: tokenizer vocabulary, teacher files, packed corpus [N, L],
    sequence length, sparse spec (a ``SparseSpec``) and temperature."""
    return {"tokenizer": tokenizer_hash(tokenizer), "teacher": teacher_files_hash(teacher_folder),
            "corpus": tokens_hash(sequences), "seq_len": int(sequences.shape[1]),
            "sparse": {"kind": spec.kind, "k": spec.k, "proposal_temperature": spec.proposal_temperature},
            "temperature": float(temperature)}


class CausalTeacherCache:
    """A finished causal cache in ``directory``, shards memory-mapped. Given ``tokenizer`` (its
    vocabulary), ``teacher`` (a saved model folder, hashed by file content; no model is built) or
    ``seq_len``, a cache built for another one is refused, naming the field. ``verify`` checks every
    shard's CRC-32 (reads the files once)."""

    def __init__(self, directory, *, tokenizer=None, teacher: Union[str, Path, None] = None,
                 seq_len: Optional[int] = None, verify: bool = True):
        self.directory = Path(directory)
        self.index = store.read_index(self.directory)
        if self.index.get("layout") != LAYOUT:
            raise ValueError(f"teacher_cache: expected a cache built from a causal LM teacher (layout 'causal'), got "
                             f"{str(self.directory)!r} with layout {self.index.get('layout', 'masked-LM')!r}; a "
                             f"masked-LM cache trains through `kdfast pretrain --teacher-cache`")
        self.check(tokenizer=tokenizer, teacher=teacher, seq_len=seq_len)
        self.k, self.vocab = self.index["k"], self.index["vocab"]
        self.seq_len, self.temperature = self.index["seq_len"], self.index["temperature"]
        self.kind = SparseSpec.parse(self.index["sparse"]).kind
        self.shards = [store.read_shard(self.directory / e["file"], e, verify) for e in self.index["shards"]]
        self._local = np.zeros(self.index["sequences"], dtype=np.int64)
        self._shard = store.shard_of_sequences(self.directory, self.index, self.shards, self._place)

    def __len__(self) -> int:
        return int(self.index["sequences"])

    def check(self, tokenizer=None, teacher: Union[str, Path, None] = None, seq_len: Optional[int] = None) -> None:
        """Refuse (naming the field) a cache built for another tokenizer, teacher folder or sequence length."""
        found = self.index["fingerprint"]
        wanted = dict(found)
        if tokenizer is not None:
            wanted["tokenizer"] = tokenizer_hash(tokenizer)
        if teacher is not None:
            wanted["teacher"] = teacher_files_hash(teacher)
        if seq_len is not None:
            wanted["seq_len"] = int(seq_len)
        fingerprints.check(found, wanted, str(self.directory))

    def _place(self, number: int, entry: dict, shard: dict) -> np.ndarray:
        """Check one shard; record where each of its sequences sits in it; return their indices."""
        path = self.directory / entry["file"]
        if set(shard) != COLUMNS:
            raise store.CacheFileError(path, f"expected tensors {sorted(COLUMNS)}, got {sorted(shard)}")
        sequence = shard["sequence"].numpy()
        count, targets = sequence.shape[0], self.seq_len - 1
        width = codec.id_bytes(self.vocab)
        if (tuple(shard["input_ids"].shape) != (count, self.seq_len, width)
                or tuple(shard["ids"].shape) != (count * targets, self.k, width)
                or tuple(shard["weights"].shape) != (count * targets, self.k, codec.WEIGHT_BYTES)
                or np.any((sequence < 0) | (sequence >= self._local.shape[0]))):
            raise store.CacheFileError(path, "expected consistent sequence/input_ids/ids/weights tensors, got "
                                             "mismatched shapes or out-of-range sequences")
        self._local[sequence] = np.arange(count)
        return sequence

    def _where(self, sequence: int) -> "tuple[dict, int]":
        if not 0 <= sequence < len(self):
            raise IndexError(f"sequence_index: expected values in [0, {len(self)}) (the cache's sequences), got "
                             f"{sequence}")
        return self.shards[self._shard[sequence]], int(self._local[sequence])

    def input_ids(self, sequence: int) -> torch.Tensor:
        """[L] int64: the packed sequence ``sequence`` the targets were computed on."""
        shard, local = self._where(sequence)
        return codec.decode_ids(shard["input_ids"][local])

    def targets(self, sequence_index: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(ids [B, L-1, K] int64, -1 padding; weights [B, L-1, K] fp32) for sequences ``sequence_index``
        [B]: position i's target distribution over token i+1 (top-K renormalised over its K ids)."""
        targets = self.seq_len - 1
        ids, weights = [], []
        for sequence in torch.as_tensor(sequence_index).reshape(-1).tolist():
            shard, local = self._where(int(sequence))
            rows = slice(local * targets, (local + 1) * targets)
            ids.append(shard["ids"][rows])
            weights.append(shard["weights"][rows])
        shape = (len(ids), targets, self.k)
        ids = codec.decode_ids(torch.stack(ids)) if ids else torch.empty(shape, dtype=torch.long)
        weights = codec.decode_weights(torch.stack(weights)) if weights else torch.empty(shape)
        if self.kind == "topk":
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(weights > 0, ids, -1), weights

    def dataset(self) -> "CausalCacheDataset":
        return CausalCacheDataset(self)


class CausalCacheDataset(torch.utils.data.Dataset):
    """Example i: ``input_ids`` [L] and ``labels`` [L] (the same ids: HF causal LMs shift them) of cached
    sequence i, and its ``sequence_index`` (0-dim int64), which finds its targets in the cache."""

    def __init__(self, cache: CausalTeacherCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        ids = self.cache.input_ids(int(i))
        return {"input_ids": ids, "labels": ids.clone(), "sequence_index": torch.tensor(int(i))}
