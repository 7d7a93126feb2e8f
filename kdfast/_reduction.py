"""How per-row loss terms become one number. Shared by every backend so they agree exactly."""
from __future__ import annotations

REDUCTIONS = ("batchmean", "sum", "mean")
# KD terms of the vocabulary losses; native row kernels take the index (csrc/vocab_kd_math.h, Kind).
KINDS = ("kl", "soft_ce", "reverse_kl", "jsd")


def kd_term(kind: str, beta: float) -> str:
    """The KD term a backend computes for ``kind`` and ``beta``: ``"jsd"`` at beta = 0 is forward KL(p || q)
    and at beta = 1 reverse KL(q || p), the endpoints of TRL's ``generalized_jsd_loss`` and Liger-Kernel's
    ``LigerJSD`` (the mixture's own limits would be 0 with no gradient); any other pair is ``kind``."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "kl" if beta == 0.0 else "reverse_kl"
    return kind


def kd_divisor(reduction: str, rows: int, vocab: int) -> float:
    """``sum``: 1; ``batchmean``: kept rows; ``mean``: kept rows x V (the study's form).
    Never 0, so an empty selection gives a loss of exactly 0."""
    if reduction == "sum":
        return 1.0
    if reduction == "batchmean":
        return float(max(rows, 1))
    return float(max(rows * vocab, 1))


def kd_factor(temperature: float, t2_scale: bool) -> float:
    """The T**2 factor (Hinton et al.) that keeps soft-target gradients temperature-independent."""
    return temperature * temperature if t2_scale else 1.0


def mlm_divisor(reduction: str, labelled_rows: int) -> float:
    """MLM cross-entropy: a sum for ``sum``, else the mean over labelled rows."""
    return 1.0 if reduction == "sum" else float(max(labelled_rows, 1))
