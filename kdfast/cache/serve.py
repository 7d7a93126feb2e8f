"""Serve a built teacher cache to training: the sparse targets of a batch, looked up by the
sequence indices the data stream yields, checked against the batch's static masks."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from kdfast.cache import fingerprint as fingerprints
from kdfast.cache import store
from kdfast.data.masking import IGNORE

TARGET_KEYS = ("teacher_ids", "teacher_weights")
DYNAMIC_REFUSAL = ("masking: expected 'static' for a teacher cache, got 'dynamic': dynamic masking draws new "
                   "masked positions (so a new teacher input) every epoch, which no cache built once can serve; "
                   "use --masking static")


def build_cost(index: dict, unit: str) -> float:
    """What building a cache (its ``cache.json`` or ``TeacherCache.summary()``) spent, in a budget unit:
    device-seconds (``s``), teacher FLOPs (``flop``) or corpus tokens run through the teacher (``tok``)."""
    return float({"s": index["build_device_seconds"], "flop": index["teacher_flops"], "tok": index["tokens"]}[unit])


def report_note(row: dict, fraction: float, unit: str) -> str:
    """The report line of a cached arm's cache: what it is, what building it cost, what the arm was charged."""
    c = row["teacher_cache"]
    proposal = f", proposal softmax(t/{c['proposal']['tau']:g})" if c.get("proposal") else ""
    return (f"Teacher cache of {row['arm']}: {c['sparse']}{proposal} at T={c['temperature']:g} in {c['directory']}, "
            f"{c['masked_tokens']:,} masked tokens of {c['sequences']:,} sequences, "
            f"{c['bytes_per_masked_token']:.1f} bytes per masked token, built in {c['build_seconds']:.1f} s "
            f"({c['teacher_flops']:.3g} teacher FLOPs; reused every epoch); charged "
            f"{fraction * build_cost(c, unit):.4g} {unit} to the arm.")


class TeacherCache:
    """A finished cache in ``directory`` (shards memory-mapped). ``fingerprint``: refuse a cache built
    from other inputs; ``verify``: check every shard's CRC-32 (reads the files once)."""

    def __init__(self, directory, fingerprint: Optional[dict] = None, verify: bool = True):
        self.directory = Path(directory)
        self.index = store.read_index(self.directory)
        if fingerprint is not None:
            fingerprints.check(self.index["fingerprint"], fingerprint, str(self.directory))
        self.kind = self.index["fingerprint"]["sparse"]["kind"]
        self.k = self.index["k"]
        self.temperature = self.index["temperature"]
        self.shards = [store.read_shard(self.directory / e["file"], e, verify) for e in self.index["shards"]]
        count = self.index["sequences"]
        self._shard = np.full(count, -1, dtype=np.int32)
        self._start = np.zeros(count, dtype=np.int64)
        self._stop = np.zeros(count, dtype=np.int64)
        for number, (entry, shard) in enumerate(zip(self.index["shards"], self.shards)):
            self._place(number, entry, shard)
        missing = np.flatnonzero(self._shard < 0)
        if missing.size:
            raise store.CacheFileError(self.directory / store.INDEX, f"expected targets for all {count} sequences, "
                                                                    f"got none for sequence {int(missing[0])}")

    def cost(self, unit: str) -> float:
        return build_cost(self.index, unit)

    def summary(self) -> dict:
        """The cache's report fields: spec, proposal, size and build cost."""
        keys = ("sparse", "k", "temperature", "proposal", "sequences", "masked_tokens", "tokens", "bytes",
                "bytes_per_masked_token", "build_seconds", "build_device_seconds", "teacher_flops", "world_size")
        return {"directory": str(self.directory), **{k: self.index.get(k) for k in keys}}

    def _place(self, number: int, entry: dict, shard: dict) -> None:
        path = self.directory / entry["file"]
        need = {"sequence", "offsets", "positions", "ids", "weights"} | ({"leftover"} if self.kind == "topk" else set())
        if set(shard) != need:
            raise store.CacheFileError(path, f"expected tensors {sorted(need)}, got {sorted(shard)}")
        sequence, offsets = shard["sequence"].numpy(), shard["offsets"].numpy()
        rows = shard["positions"].shape[0]
        if (offsets.shape != (sequence.shape[0] + 1,) or offsets[0] != 0 or offsets[-1] != rows
                or np.any(np.diff(offsets) < 0) or tuple(shard["ids"].shape) != (rows, self.k)
                or tuple(shard["weights"].shape) != (rows, self.k)
                or np.any((sequence < 0) | (sequence >= self._shard.shape[0]))):
            raise store.CacheFileError(path, "expected consistent sequence/offsets/positions/ids/weights tensors, "
                                             "got mismatched shapes or out-of-range entries")
        self._shard[sequence] = number
        self._start[sequence], self._stop[sequence] = offsets[:-1], offsets[1:]

    def targets(self, sequence_index: torch.Tensor, labels: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(ids [M, K] int64, -1 padding; weights [M, K] fp32) for the M labelled positions of
        ``labels`` [B, L] in row-major order, B = ``sequence_index`` [B]; top-K weights renormalised."""
        ids, weights = [], []
        labelled = (labels != IGNORE).cpu()
        for row, sequence in enumerate(sequence_index.tolist()):
            shard = self.shards[self._shard[sequence]]
            part = slice(int(self._start[sequence]), int(self._stop[sequence]))
            positions = labelled[row].nonzero().squeeze(1)
            cached = shard["positions"][part]
            if positions.shape != cached.shape or not torch.equal(positions, cached.long()):
                raise ValueError(f"teacher cache: sequence {sequence}: expected the batch's static masked positions "
                                 f"{positions.tolist()} to be the cached ones, got {cached.tolist()} (another masking "
                                 f"seed or corpus order?)")
            ids.append(shard["ids"][part])
            weights.append(shard["weights"][part])
        ids = torch.cat(ids).long() if ids else torch.empty(0, self.k, dtype=torch.long)
        weights = torch.cat(weights).float() if weights else torch.empty(0, self.k)
        if self.kind == "topk":
            weights = weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return ids, weights

    def attach(self, next_batch: Callable[[], dict]) -> Callable[[], dict]:
        """A batch source like ``next_batch`` whose batches (with ``sequence_index``) also carry
        ``teacher_ids`` and ``teacher_weights`` [M, K] for their labelled positions."""
        def with_targets() -> dict:
            batch = next_batch()
            if "sequence_index" not in batch:
                raise ValueError("batch: expected 'sequence_index' [B] to look up the teacher cache, got keys "
                                 f"{sorted(batch)}")
            ids, weights = self.targets(batch["sequence_index"], batch["labels"])
            return {**batch, TARGET_KEYS[0]: ids, TARGET_KEYS[1]: weights}
        return with_targets
