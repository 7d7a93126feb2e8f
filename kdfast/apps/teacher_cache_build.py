"""Build a teacher cache: one teacher pass over the unique corpus with its static masks, keeping
sparse targets (``kdfast.cache.sparse``) for every masked position (layout: ``kdfast.cache.store``).

Rank r of W (torchrun) builds the sequences i with i % W == r into its own shards, writes
``rank-RRRR.json``; rank 0 then writes ``cache.json``. Sampling draws come from a generator seeded by
(seed, first sequence index of the batch), so a rebuild with the same world size is identical.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from kdfast.budget.flops import EncoderShape
from kdfast.cache import sparse, store
from kdfast.cache.serve import DYNAMIC_REFUSAL
from kdfast.data.masking import IGNORE, seeded
from kdfast.data.stream import mask_rows
from kdfast.models import ModelPlan, run_model
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context
from kdfast.runtime.io import write_json

SHARD_ROWS = 1 << 20  # masked positions per shard file (~134 MB at K=32)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:04d}.json"


def _targets(logits: torch.Tensor, spec: sparse.SparseSpec, temperature: float, generator) -> dict:
    """Shard columns of sparse targets for logits [M, V] (fp32 on any device), moved to the CPU."""
    if spec.kind == "topk":
        ids, weights, leftover = sparse.topk(logits, spec.k, temperature)
        extra = {"leftover": leftover.to("cpu", torch.float16)}
    else:
        ids, weights = sparse.sample(logits.cpu(), spec.k, temperature, spec.proposal_temperature, generator)
        extra = {}
    return {"ids": ids.to("cpu", store.id_dtype(logits.shape[1])), "weights": weights.to("cpu", torch.float16), **extra}


class _ShardWriter:
    """Collects per-batch columns and writes a shard each time ``SHARD_ROWS`` masked rows are held."""

    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank
        self.parts: list[dict] = []
        self.rows = 0
        self.entries: list[dict] = []

    def add(self, columns: dict) -> None:
        self.parts.append(columns)
        self.rows += columns["positions"].shape[0]
        if self.rows >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        tensors = {key: torch.cat([p[key] for p in self.parts]) for key in self.parts[0] if key != "counts"}
        counts = torch.cat([p["counts"] for p in self.parts])
        tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        entry = store.write_shard(self.out / store.shard_name(self.rank, len(self.entries)), tensors)
        self.entries.append({**entry, "sequences": int(counts.numel()), "masked": int(counts.sum())})
        self.parts, self.rows = [], 0


def build(teacher: torch.nn.Module, sequences: torch.Tensor, masking, out: Path, spec: sparse.SparseSpec,
          temperature: float, seed: int, fingerprint: dict, context: Optional[Context] = None,
          batch_size: int = 64) -> None:
    """Build the cache of ``sequences`` [N, L] in ``out`` (``cache.json`` last, by rank 0).

    ``masking``: the run's ``MaskingConfig`` (static); ``seed``: the masking seed of the run."""
    context = context or Context()
    if masking.mode != "static":
        raise ValueError(DYNAMIC_REFUSAL)
    vocab = teacher.config.vocab_size
    spec.check_vocab(vocab)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    plan = ModelPlan(decoder=True)
    writer = _ShardWriter(out, context.rank)
    mine = torch.arange(context.rank, sequences.shape[0], context.world)
    masked = 0
    start = time.perf_counter()
    teacher.eval()
    for first in range(0, mine.numel(), batch_size):
        index = mine[first:first + batch_size]
        batch = mask_rows(sequences[index], index.tolist(), 0, seed, masking)
        labelled = batch["labels"] != IGNORE
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            taps = run_model(teacher, {k: v.to(device) for k, v in batch.items()}, plan)
            logits = taps.logits(labelled.to(device)).float()
        columns = _targets(logits, spec, temperature, seeded(seed, -2, int(index[0])))
        rows, positions = labelled.nonzero(as_tuple=True)
        columns.update(sequence=index.long(), positions=positions.to(torch.int16),
                       counts=labelled.sum(1).long())
        writer.add(columns)
        masked += int(rows.numel())
    writer.flush()
    seconds = time.perf_counter() - start
    shape = EncoderShape.of(teacher.config)
    tokens = mine.numel() * sequences.shape[1]
    flops = shape.encoder_forward(tokens, sequences.shape[1]) + shape.head_forward(masked)
    write_json(out / _rank_file(context.rank), {"shards": writer.entries, "seconds": seconds, "teacher_flops": flops,
                                                "masked": masked, "sequences": int(mine.numel()), "tokens": tokens},
               sort_keys=True)
    distributed.barrier(context)
    if context.is_main:
        write_json(out / store.INDEX, _index(out, context.world, fingerprint, spec, temperature, vocab), sort_keys=True)
    distributed.barrier(context)


def _index(out: Path, world: int, fingerprint: dict, spec: sparse.SparseSpec, temperature: float,
           vocab: int) -> dict:
    """cache.json from the ranks' reports: shards, fingerprint, proposal, and the build's cost."""
    ranks = [store.read_json(out / _rank_file(rank)) for rank in range(world)]
    shards = [entry for rank in ranks for entry in rank["shards"]]
    masked = sum(r["masked"] for r in ranks)
    total_bytes = sum(s["bytes"] for s in shards)
    proposal = None
    if spec.kind == "sample":
        tau = temperature if spec.proposal_temperature is None else spec.proposal_temperature
        proposal = {"name": "softmax(teacher_logits / tau)", "tau": tau,
                    "weights": "count/K * p/r, p = softmax(teacher_logits / temperature)"}
    return {"format": store.FORMAT, "fingerprint": fingerprint, "sparse": str(spec), "k": spec.k,
            "temperature": temperature, "proposal": proposal, "vocab": vocab,
            "id_dtype": str(store.id_dtype(vocab)).replace("torch.", ""), "weight_dtype": "float16",
            "targets": "top-K probabilities, renormalised over the K ids when served" if spec.kind == "topk"
            else "distinct sampled ids with importance weights, served as stored",
            "shards": shards, "sequences": sum(r["sequences"] for r in ranks), "masked_tokens": masked,
            "tokens": sum(r["tokens"] for r in ranks), "bytes": total_bytes,
            "bytes_per_masked_token": total_bytes / max(masked, 1), "world_size": world,
            "build_seconds": max(r["seconds"] for r in ranks),
            "build_device_seconds": sum(r["seconds"] for r in ranks),
            "teacher_flops": sum(r["teacher_flops"] for r in ranks)}
