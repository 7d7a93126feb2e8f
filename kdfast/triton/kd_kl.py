"""``kd_kl`` on the Triton backend: the shared chunked driver (``kdfast/functions/vocab_kd/``) on given
[N, V] logits, with the Triton row kernel of ``kdfast.triton.vocab_kd`` writing d loss/d logits.
float64 inputs are declined (backend ``torch`` serves them)."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.functions import vocab_kd
from kdfast.ops import vocab
from kdfast.triton.vocab_kd import rows  # noqa: F401  (the row kernel the op looks up)


def kd_kl(**kwargs) -> torch.Tensor:
    """``kdfast.kd_kl`` with its validated keyword arguments (minus ``backend``): a 0-dim loss."""
    return vocab.kd_kl("triton", **kwargs)


def unsupported_reason(**kwargs) -> Optional[str]:
    return vocab_kd.unsupported_reason(kwargs["student_logits"], kwargs["teacher_logits"])
