"""The C++ CPU kernels on several OpenMP threads. Each pytest-xdist worker runs torch on one thread (conftest), so
this module alone sets 2: every op on the ``cpu`` backend equals the float64 ``torch`` reference (loss and
gradients, 1e-5), at sizes that split the work over threads (rows, heads, chunks), with a mask."""
from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import _ext

pytestmark = pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
B, HEADS, L, D = 3, 4, 67, 16
STUDENT = ("student_hidden", "student_weight", "q_s", "k_s", "x_s", "h_s")


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def loss_and_grads(fn, tensors: dict, backend: str, dtype: torch.dtype, **options) -> list:
    """[loss, d student tensor for each] of ``fn(**tensors, **options, backend=backend)`` in ``dtype``."""
    leaves = {k: v.detach().to(dtype).requires_grad_(k in STUDENT) if v.is_floating_point() else v
              for k, v in tensors.items()}
    loss = fn(**leaves, **options, backend=backend)
    floating = [v for v in leaves.values() if v.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, floating)]


def assert_matches_float64(fn, tensors: dict, **options) -> None:
    got = loss_and_grads(fn, tensors, "cpu", torch.float32, **options)
    ref = loss_and_grads(fn, tensors, "torch", torch.float64, **options)
    for g, r in zip(got, ref):
        assert (g.double() - r).norm() <= 1e-5 * r.norm(), float((g.double() - r).norm() / r.norm())


def key_mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L // 2:] = False
    return mask


def test_fused_linear_kd():
    n, hs, ht, v = 301, 24, 40, 5003
    labels = torch.randint(0, v, (n,))
    labels[::4] = -100
    tensors = dict(student_hidden=torch.randn(n, hs), student_weight=torch.randn(v, hs) / hs**0.5,
                   teacher_hidden=torch.randn(n, ht), teacher_weight=torch.randn(v, ht) / ht**0.5, labels=labels)
    def loss(**kwargs):
        return kdfast.fused_linear_kd(**kwargs).loss

    for kind in ("kl", "reverse_kl", "jsd"):
        assert_matches_float64(loss, tensors, temperature=2.0, mlm_weight=0.5, kind=kind)


@pytest.mark.parametrize("name", ["attention_kl", "attention_score_mse"])
def test_attention(name):
    tensors = {k: torch.randn(B, HEADS, L, D) for k in ("q_s", "k_s", "q_t", "k_t")}
    assert_matches_float64(getattr(kdfast, name), dict(tensors, key_mask=key_mask()))


def test_relation_kl():
    tensors = dict(x_s=torch.randn(B, L, 48), x_t=torch.randn(B, L, 64), key_mask=key_mask())
    assert_matches_float64(kdfast.relation_kl, tensors, num_relation_heads=4)


def test_hidden_mse():
    tensors = dict(h_s=torch.randn(B, L, 48), h_t=torch.randn(B, L, 48), mask=key_mask())
    assert_matches_float64(kdfast.hidden_mse, tensors)
