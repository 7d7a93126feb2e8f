"""Column encodings of the causal teacher cache: ids exact in 2 or 3 bytes (4 beyond 2^24), weights as
float24 within 2^-17 relative, and the bytes per target token at K = 32 for Llama 3's V = 128,256."""
from __future__ import annotations

import pytest
import torch

from kdfast.cache import codec


@pytest.mark.parametrize("vocab,width", [(2, 2), (30_522, 2), (65_536, 2), (65_537, 3), (128_256, 3),
                                         (256_000, 3), (1 << 24, 3), ((1 << 24) + 1, 4)])
def test_ids_round_trip_exactly_in_the_fewest_bytes(vocab, width):
    ids = torch.cat([torch.tensor([0, vocab - 1, vocab // 2]), torch.randint(0, vocab, (97,))]).reshape(4, 25)
    data = codec.encode_ids(ids, vocab)
    assert data.dtype == torch.uint8 and data.shape == (4, 25, width) == (*ids.shape, codec.id_bytes(vocab))
    assert torch.equal(codec.decode_ids(data), ids)


def test_weights_are_float24_within_two_to_the_minus_17():
    w = torch.cat([torch.rand(5000) ** 12, torch.rand(1000) * 40, torch.tensor([0.0, 1.0, 0.5, 1e-30, 3e30])])
    back = codec.decode_weights(codec.encode_weights(w))
    relative = ((back.double() - w.double()).abs() / w.double().clamp_min(1e-38))[w > 0]
    assert float(relative.max()) <= 2 ** -17 and float(relative.mean()) > 2 ** -20   # rounded, not truncated to 0
    assert back[-5:-2].tolist() == [0.0, 1.0, 0.5]


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_bad_weights_and_ids_are_refused(bad):
    with pytest.raises(ValueError, match="weights: expected finite values >= 0"):
        codec.encode_weights(torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 10\)"):
        codec.encode_ids(torch.tensor([3, 10]), 10)


def test_bytes_per_target_token_at_k32():
    """3-byte ids + 3-byte weights = 192 bytes for 32 entries, plus the input ids and index of the
    sequence: 195.1 bytes at L = 256 (<= 200); V <= 65,536: 162.1."""
    assert 192 < codec.bytes_per_target(128_256, 32, 256) <= 200
    assert codec.bytes_per_target(128_256, 32, 256) == pytest.approx(195.07, abs=0.01)
    assert codec.bytes_per_target(32_000, 32, 256) == pytest.approx(162.07, abs=0.01)
