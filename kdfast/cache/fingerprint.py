"""What a teacher cache was built from, so a run never reads targets of another teacher, tokenizer,
corpus, masking or sparse spec. A mismatch names the first differing field."""
from __future__ import annotations

import torch

from kdfast.runtime.fingerprint import teacher_hash, tokenizer_hash, tokens_hash

FIELDS = ("tokenizer", "teacher", "corpus", "masking_seed", "masking", "seq_len", "sparse", "temperature")


def make(tokenizer, teacher, sequences: torch.Tensor, masking, seed: int, spec, temperature: float) -> dict:
    """The fingerprint of a cache for these inputs (``masking``: a ``MaskingConfig``; ``spec``: a ``SparseSpec``)."""
    return {"tokenizer": tokenizer_hash(tokenizer), "teacher": teacher_hash(teacher), "corpus": tokens_hash(sequences),
            "masking_seed": int(seed),
            "masking": {"mode": masking.mode, "prob": masking.prob, "max_predictions": masking.max_predictions,
                        "mask_id": masking.mask_id, "special": list(masking.special)},
            "seq_len": int(sequences.shape[1]),
            "sparse": {"kind": spec.kind, "k": spec.k, "proposal_temperature": spec.proposal_temperature},
            "temperature": float(temperature)}


def check(found: dict, wanted: dict, where: str) -> None:
    """Refuse a cache (at ``where``) whose fingerprint differs from ``wanted``, naming the field."""
    for field in FIELDS:
        if found.get(field) != wanted.get(field):
            raise ValueError(f"teacher cache: {where} was built for a different {field}: expected "
                             f"{wanted.get(field)!r}, got {found.get(field)!r}; rebuild it or use another folder")
