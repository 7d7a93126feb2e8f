"""A synthetic teacher cache for timing (``kdfast bench budget``): random ids and weights with the
real K, layout and lookup, for given MLM batches, so a cached arm's data phase includes the real
memory-mapped read. Its targets carry no teacher information."""
from __future__ import annotations

from pathlib import Path

import torch

from kdfast.cache import store
from kdfast.cache.serve import TeacherCache
from kdfast.data.masking import IGNORE
from kdfast.runtime.io import write_json


def build(directory: Path, batches: list, kind: str, k: int, vocab: int, seed: int = 0) -> TeacherCache:
    """A cache for ``batches`` (dicts with ``labels`` [B, L]); batch j's row r is sequence j*B + r.
    Each batch gets ``sequence_index`` [B] (in place) so the cache can serve it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([b["labels"] for b in batches])
    for j, batch in enumerate(batches):
        rows = batch["labels"].shape[0]
        batch["sequence_index"] = torch.arange(j * rows, (j + 1) * rows)
    labelled = labels != IGNORE
    masked = int(labelled.sum())
    weights = torch.rand(masked, k, generator=g)
    weights = (weights / weights.sum(1, keepdim=True)).sort(1, descending=True).values if kind == "topk" \
        else torch.full((masked, k), 1.0 / k)
    tensors = {"sequence": torch.arange(labels.shape[0]),
               "offsets": torch.cat([torch.zeros(1, dtype=torch.long), labelled.sum(1).cumsum(0)]),
               "positions": labelled.nonzero()[:, 1].to(torch.int16),
               "ids": torch.randint(0, vocab, (masked, k), generator=g).to(store.id_dtype(vocab)),
               "weights": weights.half()}
    if kind == "topk":
        tensors["leftover"] = torch.zeros(masked, dtype=torch.float16)
    directory = Path(directory)
    entry = store.write_shard(directory / store.shard_name(0, 0), tensors)
    index = {"format": store.FORMAT, "synthetic": True, "fingerprint": {"sparse": {"kind": kind, "k": k}}, "k": k,
             "temperature": 1.0, "sparse": f"{kind}:{k}", "shards": [{**entry, "sequences": labels.shape[0],
                                                                       "masked": masked}],
             "sequences": labels.shape[0], "masked_tokens": masked,
             "bytes_per_masked_token": entry["bytes"] / max(masked, 1)}
    write_json(directory / store.INDEX, index, sort_keys=True)
    return TeacherCache(directory)
