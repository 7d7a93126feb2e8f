"""Triton attention/relation KL under TRITON_INTERPRET=1 against a float64 formula written here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from alloc_spy import ShapeSpy
from conftest import needs_triton_interpreter

from kdfast.losses import attention_kl, relation_kl

pytestmark = needs_triton_interpreter

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def kl_loss64(q_s, k_s, q_t, k_t, key_mask):
    """Mean over valid (b, h, i) of sum_j p_t (log p_t - log p_s), all in float64."""
    def log_probs(q, k):
        scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
        if key_mask is not None:  # exp(-1e30 - max) is exactly 0 in float64
            scores = scores.masked_fill(~key_mask[:, None, None, :], -1e30)
        return F.log_softmax(scores, dim=-1)

    log_s, log_t = log_probs(q_s, k_s), log_probs(q_t, k_t)
    rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, h, L]
    if key_mask is None:
        return rows.mean()
    weights = key_mask[:, None, :].double().expand_as(rows)
    return (rows * weights).sum() / weights.sum().clamp_min(1)


def heads64(x, num_heads):
    b, length, width = x.shape
    return x.double().reshape(b, length, num_heads, width // num_heads).transpose(1, 2)


def rel_err(out, ref):
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-300))


def make_mask(b, length, fully_masked_batch=True):
    mask = torch.rand(b, length) > 0.3
    mask[:, 0] = True
    if fully_masked_batch and b > 1:
        mask[-1] = False
    return mask


def check_attention(b, h, length, d_s, d_t, dtype, masked, scale=1.0):
    q_s, k_s = (torch.randn(b, h, length, d_s).mul(scale).to(dtype).requires_grad_() for _ in range(2))
    q_t, k_t = (torch.randn(b, h, length, d_t).mul(scale).to(dtype) for _ in range(2))
    mask = make_mask(b, length) if masked else None
    loss = attention_kl(q_s, k_s, q_t, k_t, mask, backend="triton")
    grads = torch.autograd.grad(loss, (q_s, k_s))
    q64, k64 = q_s.detach().double().requires_grad_(), k_s.detach().double().requires_grad_()
    ref = kl_loss64(q64, k64, q_t, k_t, mask)
    refs = torch.autograd.grad(ref, (q64, k64))
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype
    assert rel_err(loss, ref) <= tol
    for grad, ref_grad in zip(grads, refs):
        assert rel_err(grad, ref_grad) <= tol


@pytest.mark.parametrize("b, h, length, d_s, d_t, masked", [
    (2, 2, 1, 8, 12, False),
    (2, 2, 1, 8, 12, True),
    (3, 2, 7, 24, 40, False),
    (3, 2, 7, 24, 40, True),
    (1, 2, 128, 32, 16, False),
    (2, 2, 128, 32, 16, True),
    (1, 1, 513, 8, 16, True),
])
def test_attention_kl_fp32_matches_float64(b, h, length, d_s, d_t, masked):
    check_attention(b, h, length, d_s, d_t, torch.float32, masked)


def test_attention_kl_extreme_logits():
    check_attention(2, 2, 70, 16, 24, torch.float32, masked=True, scale=6.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_kl_half_matches_float64(dtype):
    check_attention(2, 2, 70, 48, 64, dtype, masked=True)


def test_attention_kl_reads_strided_views_of_a_fused_projection():
    b, h, length, d = 2, 2, 33, 16
    qk = torch.randn(b, length, 2, h, d).permute(2, 0, 3, 1, 4)  # q and k interleaved in one buffer
    q_s, k_s = qk[0].requires_grad_(), qk[1].requires_grad_()
    q_t, k_t = torch.randn(b, h, length, 24), torch.randn(b, h, length, 24)
    mask = make_mask(b, length)
    loss = attention_kl(q_s, k_s, q_t, k_t, mask, backend="triton")
    ref = kl_loss64(q_s.detach(), k_s.detach(), q_t, k_t, mask)
    assert rel_err(loss, ref) <= 1e-5


def check_relation(b, length, width_s, width_t, heads, dtype, masked, weight=1.0):
    """Loss and dx of ``weight * relation_kl`` against the float64 formula."""
    x_s = torch.randn(b, length, width_s).to(dtype).requires_grad_()
    x_t = torch.randn(b, length, width_t).to(dtype)
    mask = make_mask(b, length) if masked else None
    loss = relation_kl(x_s, x_t, heads, mask, backend="triton")
    (grad,) = torch.autograd.grad(weight * loss, x_s)
    x64 = x_s.detach().double().requires_grad_()
    xs, xt = heads64(x64, heads), heads64(x_t, heads)
    ref = kl_loss64(xs, xs, xt, xt, mask)
    (ref_grad,) = torch.autograd.grad(weight * ref, x64)
    assert rel_err(loss, ref) <= TOL[dtype]
    assert rel_err(grad, ref_grad) <= TOL[dtype]


@pytest.mark.parametrize("b, length, heads, masked", [(2, 1, 3, False), (3, 7, 3, True), (2, 128, 3, True),
                                                    (1, 513, 1, False)])
def test_relation_kl_fp32_matches_float64(b, length, heads, masked):
    # relation heads of d_s = 8 and d_t = 12, decoupled from any attention head count
    check_relation(b, length, 8 * heads, 12 * heads, heads, torch.float32, masked)


def test_relation_kl_bf16_matches_float64():
    check_relation(2, 70, 48, 80, 4, torch.bfloat16, masked=True)


def test_gradients_follow_grad_output():
    check_relation(2, 7, 16, 24, 2, torch.float32, masked=True, weight=-2.5)


def test_two_backward_passes_are_bitwise_equal():
    x_s = torch.randn(1, 100, 32, requires_grad=True)
    x_t = torch.randn(1, 100, 48)
    mask = make_mask(1, 100)
    first, second = (torch.autograd.grad(relation_kl(x_s, x_t, 2, mask, backend="triton"), x_s)[0]
                     for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend, allocates_scores", [("triton", False), ("torch", True)])
def test_no_length_by_length_tensor_is_allocated(backend, allocates_scores):
    b, length, width = 2, 37, 24
    x_s = torch.randn(b, length, width, requires_grad=True)
    x_t = torch.randn(b, length, 40)
    mask = make_mask(b, length)
    with ShapeSpy() as spy:
        loss = relation_kl(x_s, x_t, 4, mask, backend=backend)
        loss.backward()
    assert (b, length, width) in spy.shapes  # the spy saw the backward's dx
    assert bool(spy.square(length)) == allocates_scores


def test_teacher_gets_no_gradient():
    q_s, k_s = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(2))
    q_t, k_t = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(2))
    attention_kl(q_s, k_s, q_t, k_t, backend="triton").backward()
    assert q_s.grad is not None and q_t.grad is None and k_t.grad is None


def test_head_size_over_128_names_the_torch_backend():
    q = torch.randn(1, 1, 4, 160)
    with pytest.raises(ValueError, match=r"head sizes up to 128, got d_s=160.*backend='torch'"):
        attention_kl(q, q, q, q, backend="triton")
    with pytest.raises(ValueError, match=r"head sizes up to 128, got d_s=160.*backend='torch'"):
        relation_kl(torch.randn(1, 4, 320), torch.randn(1, 4, 64), 2, backend="triton")


def test_float64_is_declined_with_the_way_out():
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float32, bfloat16 or float16, got torch.float64.*backend='torch'"):
        relation_kl(x, x, 2, backend="triton")
