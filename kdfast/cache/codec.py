"""Exact, compact column encodings of a causal-LM teacher cache (``kdfast.cache.causal``).

- **Token ids** in the fewest whole bytes that hold every id of the vocabulary, little-endian
  ``uint8 [..., B]``: B = 2 for V <= 65,536 (BERT, GPT-2, Llama 2, Mistral), 3 for V <= 16,777,216
  (Llama 3's 128,256, Gemma's 256,000, Qwen's 151,936), else 4. Whole bytes keep encoding and
  decoding to shifts over contiguous memory; a 17- or 18-bit packing would save 6-7 bits per id
  at the cost of bit-level gathers, and 3 bytes already fit the budget (``bytes_per_target``).
- **Weights** (probabilities or importance weights, finite and >= 0) as 24-bit floats: float32
  without its sign bit (always 0 here) and with the mantissa rounded to nearest at 16 bits, so the
  exponent range is float32's and the relative error is at most 2^-17 ≈ 7.6e-6 per weight (float16
  would give 4.9e-4, too coarse for a gradient that must match the live teacher's within 1e-5).
"""
from __future__ import annotations

import torch

WEIGHT_BYTES = 3
WEIGHT_ENCODING = "float24: float32 without its sign bit, mantissa rounded to 16 bits (relative error <= 2^-17)"
_DROPPED_BITS = 32 - 1 - 8 * WEIGHT_BYTES   # 7 low mantissa bits


def id_bytes(vocab: int) -> int:
    """Bytes per token id for a vocabulary of ``vocab`` ids (0 .. vocab-1)."""
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ValueError(f"vocab: expected an int >= 1, got {vocab!r}")
    return 2 if vocab <= 1 << 16 else 3 if vocab <= 1 << 24 else 4


def encode_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """uint8 [..., B] little-endian bytes of ``ids`` (integers in [0, vocab))."""
    ids = ids.long()
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise ValueError(f"ids: expected values in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    return torch.stack([(ids >> (8 * i)) & 0xFF for i in range(id_bytes(vocab))], -1).to(torch.uint8)


def decode_ids(data: torch.Tensor) -> torch.Tensor:
    """int64 [...] ids from uint8 [..., B] little-endian bytes."""
    out = data[..., 0].long()
    for i in range(1, data.shape[-1]):
        out |= data[..., i].long() << (8 * i)
    return out


def encode_weights(weights: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3] float24 of finite ``weights`` >= 0 (rounded to nearest)."""
    weights = weights.float()
    if weights.numel() and not (bool(torch.isfinite(weights).all()) and float(weights.min()) >= 0):
        raise ValueError(f"weights: expected finite values >= 0, got range [{float(weights.min())}, "
                         f"{float(weights.max())}]")
    bits = weights.contiguous().view(torch.int32).long()
    rounded = (bits + (1 << (_DROPPED_BITS - 1))) >> _DROPPED_BITS
    return torch.stack([(rounded >> (8 * i)) & 0xFF for i in range(WEIGHT_BYTES)], -1).to(torch.uint8)


def decode_weights(data: torch.Tensor) -> torch.Tensor:
    """float32 [...] weights from uint8 [..., 3] float24."""
    return (decode_ids(data) << _DROPPED_BITS).to(torch.int32).view(torch.float32)


def bytes_per_target(vocab: int, k: int, seq_len: int) -> float:
    """Cache bytes per target token of a causal cache at K entries per target: ids and weights of each
    entry, plus the sequence's input ids and its index spread over its seq_len - 1 targets."""
    per_sequence = seq_len * id_bytes(vocab) + 8 + 8   # input ids, sequence index, offset
    return k * (id_bytes(vocab) + WEIGHT_BYTES) + per_sequence / (seq_len - 1)
