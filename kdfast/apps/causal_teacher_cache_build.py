"""Build a causal-LM teacher cache: one teacher pass over the packed sequences, keeping the sparse
targets (``kdfast.cache.sparse``) of every target position (layout: ``kdfast.cache.causal``).

Rank r of W (torchrun) builds the sequences i with i % W == r into its own shards, writes
``rank-RRRR.json``; rank 0 then writes ``cache.json``. Sampling draws come from a generator seeded by
(seed, first sequence index of the batch), so a rebuild with the same world size is identical.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from kdfast.apps.teacher_cache_build import ShardWriter, rank_file
from kdfast.cache import causal, codec, sparse, store
from kdfast.data.masking import seeded
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context
from kdfast.runtime.io import write_json

_SAMPLING_STREAM = -3   # the generator's stream id (the masked-LM cache draws from stream -2)


def sparse_targets(logits: torch.Tensor, spec: sparse.SparseSpec, temperature: float,
                   generator: torch.Generator) -> "tuple[torch.Tensor, torch.Tensor]":
    """(ids [M, K] int64 >= 0, weights [M, K] fp32) of teacher logits [M, V]; unused entries have weight 0."""
    if spec.kind == "topk":
        ids, weights, _ = sparse.topk(logits, spec.k, temperature)
    else:
        ids, weights = sparse.sample(logits.cpu(), spec.k, temperature, spec.proposal_temperature, generator)
    return ids.cpu().clamp_min(0), weights.cpu().float()


def teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B·(L-1), V] fp32 logits of positions 0..L-2 (the model's own head, softcap or scaling included)."""
    device = next(teacher.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = teacher(input_ids=input_ids.to(device).long(), use_cache=False).logits
    return logits[:, :-1].float().reshape(-1, logits.shape[-1])


def build(teacher: torch.nn.Module, sequences: torch.Tensor, out: Path, spec: sparse.SparseSpec,
          temperature: float, fingerprint: dict, context: Optional[Context] = None, batch_size: int = 16,
          seed: int = 0, about: Optional[dict] = None) -> None:
    """Build the cache of ``sequences`` [N, L] in ``out`` (``cache.json`` last, by rank 0); ``about``:
    descriptive fields for ``cache.json`` (the teacher's folder and class)."""
    context = context or Context()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, context.rank)
    mine = torch.arange(context.rank, sequences.shape[0], context.world)
    targets = sequences.shape[1] - 1
    vocab = None
    start = time.perf_counter()
    teacher.eval()
    for first in range(0, mine.numel(), batch_size):
        index = mine[first:first + batch_size]
        logits = teacher_logits(teacher, sequences[index])
        vocab = logits.shape[1]
        spec.check_vocab(vocab)
        ids, weights = sparse_targets(logits, spec, temperature, seeded(seed, _SAMPLING_STREAM, int(index[0])))
        del logits
        writer.add({"sequence": index.long(), "counts": torch.full((index.numel(),), targets, dtype=torch.long),
                    "input_ids": codec.encode_ids(sequences[index], vocab),
                    "ids": codec.encode_ids(ids, vocab), "weights": codec.encode_weights(weights)})
    writer.flush()
    seconds = time.perf_counter() - start
    write_json(out / rank_file(context.rank), {"shards": writer.entries, "seconds": seconds, "vocab": vocab,
                                                     "sequences": int(mine.numel()),
                                                     "tokens": int(mine.numel()) * sequences.shape[1]})
    distributed.barrier(context)
    if context.is_main:
        write_json(out / store.INDEX, _index(out, context.world, fingerprint, spec, temperature, about or {}),
                   sort_keys=True)
    distributed.barrier(context)


def _index(out: Path, world: int, fingerprint: dict, spec: sparse.SparseSpec, temperature: float,
           about: dict) -> dict:
    """cache.json from the ranks' reports: shards, fingerprint, encodings, proposal, size and build time."""
    ranks = [store.read_json(out / rank_file(rank)) for rank in range(world)]
    shards = [entry for rank in ranks for entry in rank["shards"]]
    vocab = next(r["vocab"] for r in ranks if r["vocab"] is not None)
    target_tokens = sum(s["masked"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    return {"format": store.FORMAT, "layout": causal.LAYOUT, "fingerprint": fingerprint, **about,
            "sparse": str(spec), "k": spec.k, "temperature": temperature, "proposal": spec.proposal(temperature),
            "vocab": vocab, "seq_len": fingerprint["seq_len"], "id_bytes": codec.id_bytes(vocab),
            "weight_encoding": codec.WEIGHT_ENCODING,
            "targets": "top-K probabilities, renormalised over the K ids when served" if spec.kind == "topk"
            else "distinct sampled ids with importance weights, served as stored",
            "shards": shards, "sequences": sum(r["sequences"] for r in ranks),
            "tokens": sum(r["tokens"] for r in ranks), "target_tokens": target_tokens, "bytes": total_bytes,
            "bytes_per_target_token": total_bytes / max(target_tokens, 1), "world_size": world,
            "build_seconds": max(r["seconds"] for r in ranks),
            "build_device_seconds": sum(r["seconds"] for r in ranks)}
