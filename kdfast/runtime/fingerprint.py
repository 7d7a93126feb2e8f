"""Content hashes, so that the same tokenizer, teacher or token ids hash alike wherever they were loaded
(another path, a copied folder, bf16 on a GPU or fp32 on a CPU): SHA-256, first 32 hex digits. The teacher
cache's fingerprint (``kdfast.cache.fingerprint``) and a run's (``kdfast.eval.fingerprint``) use them."""
from __future__ import annotations

import hashlib
import json
from typing import Iterable

import torch


def digest(chunks: Iterable[bytes]) -> str:
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    return sha.hexdigest()[:32]


def tokenizer_hash(tokenizer) -> str:
    """Of its vocabulary (token -> id pairs, sorted)."""
    return digest([json.dumps(sorted(tokenizer.get_vocab().items())).encode()])


def teacher_hash(teacher: torch.nn.Module) -> str:
    """Of the state dict in key order, floating tensors rounded to bf16 (a teacher loaded in bf16 on GPU or
    fp32 on CPU hashes alike)."""
    def chunks():
        for name, tensor in sorted(teacher.state_dict().items()):
            yield name.encode()
            if tensor.is_floating_point():
                yield tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return digest(chunks())


def tokens_hash(*tensors: torch.Tensor) -> str:
    """Of integer token tensors (each one's shape and its ids as int32)."""
    def chunks():
        for t in tensors:
            yield str(tuple(t.shape)).encode()
            yield t.to(torch.int32).contiguous().numpy().tobytes()
    return digest(chunks())
