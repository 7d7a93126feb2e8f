"""Softcapped and rescaled heads in fused_linear_kd (Gemma 2 cap, Cohere logit_scale, Granite logits_scaling) on
the torch, cpu and triton backends (triton under TRITON_INTERPRET=1) against the float64 formulas of
tests/vocab_kd_float64.py, every kind, loss and gradients; bad caps."""
from __future__ import annotations

import pytest
import torch
import vocab_kd_float64 as f64
from vocab_kd_inputs import BACKENDS, assert_close, make, run
from vocab_kd_inputs import SMALL_N as N
from vocab_kd_inputs import SMALL_V as V

import kdfast

FAMILIES = {
    "gemma2": dict(student_softcap=30.0, teacher_softcap=30.0),                 # final_logit_softcapping
    "cohere": dict(student_logit_scale=0.0625, teacher_logit_scale=0.125),     # logit_scale multiplies
    "granite": dict(student_logit_scale=1 / 8.0, teacher_logit_scale=1 / 16.0),  # logits_scaling divides
    "mixed": dict(student_softcap=20.0, student_logit_scale=2.0, teacher_logit_scale=0.5),
}
KINDS = [("kl", 0.5), ("soft_ce", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
# Every kind with Gemma 2's cap (the tanh's chain rule); forward KL and JSD with the other families.
CASES = [("gemma2", *kind) for kind in KINDS] + [(family, *kind) for family in ("cohere", "granite", "mixed")
                                                for kind in (KINDS[0], KINDS[3])]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    if request.param == "triton":
        from kdfast.triton import vocab_kd

        monkeypatch.setattr(vocab_kd, "block_size", lambda vocab: (128, 4))
    return request.param


def capped_inputs(family: str) -> dict:
    """Raw logits of std ~60 for capped heads (many past the cap of 30: tanh saturates), ~2 after the scales."""
    scale = 30.0 if "softcap" in str(FAMILIES[family]) else {"cohere": 12.0, "granite": 8.0}.get(family, 1.0)
    return make(n=N, v=V, scale=scale)


@pytest.mark.parametrize("family, kind, beta", CASES)
def test_capped_heads_match_float64(backend, family, kind, beta):
    inputs = capped_inputs(family)
    options = dict(FAMILIES[family], kind=kind, beta=beta, temperature=2.0, mlm_weight=0.7, kd_weight=1.3)
    assert_close(run(inputs, backend, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_cap_with_chunks_topk_and_reweighted_parts(backend_name, monkeypatch):
    """Several chunks (the dz/du scratch per chunk), a top-k teacher after the cap, and kd / mlm back-propagated
    in another ratio than the loss's (the driver recomputes the MLM gradient through the cap)."""
    monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", "5")
    inputs = make(n=N, v=V, scale=30.0)
    options = dict(student_softcap=30.0, teacher_softcap=25.0, kind="kl", temperature=2.0, teacher_topk=20,
                   mlm_weight=0.5)
    out = kdfast.fused_linear_kd(**inputs, **options, backend=backend_name)
    leaves = [inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]]
    got = (out.loss.detach(), *torch.autograd.grad(2.0 * out.kd + 3.0 * out.mlm, leaves))
    args = {k: (v.detach().double().requires_grad_(k.startswith("student_") and v.is_floating_point())
                if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    kd = f64.loss(**args, **dict(options, mlm_weight=0.0))
    mlm = f64.loss(**args, **dict(options, kd_weight=0.0, mlm_weight=1.0))
    ref_grads = torch.autograd.grad(2.0 * kd + 3.0 * mlm, [args[k] for k in ("student_hidden", "student_weight",
                                                                               "student_bias")])
    assert_close(got, (kd.detach() + 0.5 * mlm.detach(), *ref_grads), 1e-5)


def test_identity_map_is_the_plain_head():
    inputs = make(n=N, v=V)
    plain = kdfast.fused_linear_kd(**inputs, temperature=2.0, backend="cpu")
    same = kdfast.fused_linear_kd(**inputs, temperature=2.0, backend="cpu", student_softcap=None, student_logit_scale=1)
    assert torch.equal(plain.loss, same.loss)


@pytest.mark.parametrize("name, value, error, message", [
    ("student_softcap", 0.0, ValueError, r"student_softcap: expected a finite number > 0, got 0.0"),
    ("teacher_softcap", -30.0, ValueError, r"teacher_softcap: expected a finite number > 0, got -30.0"),
    ("student_logit_scale", 0.0, ValueError, r"student_logit_scale: expected a finite number > 0, got 0.0"),
    ("teacher_logit_scale", float("inf"), ValueError, r"teacher_logit_scale: expected a finite number > 0, got inf"),
    ("student_softcap", "30", TypeError, r"student_softcap: expected a positive number, got str"),
])
def test_bad_caps_and_scales(name, value, error, message):
    with pytest.raises(error, match=message):
        kdfast.fused_linear_kd(**make(n=N, v=V), **{name: value})
    with pytest.raises(error, match=message):
        kdfast.FusedLinearKDLoss(**{name: value})


def test_teacher_map_refused_with_sparse_targets():
    inputs = make(n=N, v=V)
    ids, weights = torch.randint(0, V, (N, 4)), torch.rand(N, 4)
    with pytest.raises(ValueError, match=r"teacher_targets: expected alone, without teacher_softcap"):
        kdfast.fused_linear_kd(inputs["student_hidden"], inputs["student_weight"], teacher_targets=(ids, weights),
                               teacher_softcap=30.0)
