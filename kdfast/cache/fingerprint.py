"""What a teacher cache was built from, so a run never reads targets of another teacher, tokenizer,
corpus, masking or sparse spec. A mismatch names the first differing field."""
from __future__ import annotations

import hashlib
import json

import torch

FIELDS = ("tokenizer", "teacher", "seq_len", "corpus", "masking_seed", "masking", "sparse", "temperature")


def _sha(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:32]


def tokenizer_hash(tokenizer) -> str:
    return _sha([json.dumps(sorted(tokenizer.get_vocab().items())).encode()])


def teacher_hash(teacher: torch.nn.Module) -> str:
    """Over the parameters rounded to bf16 (a teacher loaded in bf16 on GPU or fp32 on CPU hashes alike)."""
    def chunks():
        for name, tensor in sorted(teacher.state_dict().items()):
            yield name.encode()
            if tensor.is_floating_point():
                yield tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return _sha(chunks())


def corpus_hash(sequences: torch.Tensor) -> str:
    """Of the packed training sequences [N, L] (the unique slice in limited-data mode)."""
    return _sha([str(tuple(sequences.shape)).encode(), sequences.to(torch.int32).contiguous().numpy().tobytes()])


def make(tokenizer, teacher, sequences: torch.Tensor, masking, seed: int, spec, temperature: float) -> dict:
    """The fingerprint of a cache for these inputs (``masking``: a ``MaskingConfig``; ``spec``: a ``SparseSpec``)."""
    return {"tokenizer": tokenizer_hash(tokenizer), "teacher": teacher_hash(teacher), "corpus": corpus_hash(sequences),
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
