"""Inputs of the vocabulary-KD tests and their float64 comparison, shared by the CPU, Triton, CUDA and
divergence tests."""
from __future__ import annotations

import pytest
import torch
import vocab_kd_float64 as f64
from conftest import needs_triton_interpreter

import kdfast
from kdfast import _ext

N, HS, HT, V = 29, 8, 12, 1100  # V spans two full 512-element blocks and a partial one
# The divergence, softcap and precision tests' size: V a full 512-element C++ block and a partial one, 5 Triton
# chunks of 128 (their backend fixture sets that), the last partial.
SMALL_N, SMALL_V = 13, 555
BACKENDS = [pytest.param("torch"),
            pytest.param("cpu", marks=pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")),
            pytest.param("triton", marks=needs_triton_interpreter)]


def make(n=N, hs=HS, ht=HT, v=V, dtype=torch.float32, scale=1.0, bias=True, ignored=True):
    """Fresh inputs; logits have a std of about 2*scale. Every third label ignored when ``ignored``."""
    def randn(*size, s=1.0):
        return (torch.randn(*size, dtype=torch.float64) * s).to(dtype)
    labels = torch.randint(0, v, (n,))
    if ignored:
        labels[::3] = -100
    return dict(student_hidden=randn(n, hs, s=scale).requires_grad_(True),
                student_weight=randn(v, hs, s=2 / hs**0.5).requires_grad_(True),
                teacher_hidden=randn(n, ht, s=scale), teacher_weight=randn(v, ht, s=2 / ht**0.5),
                student_bias=randn(v, s=0.5).requires_grad_(True) if bias else None,
                teacher_bias=randn(v, s=0.5) if bias else None, labels=labels)


def assert_close(got: tuple, ref: tuple, tol: float) -> None:
    names = ("loss", "d_hidden", "d_weight", "d_bias")
    errors = {name: f64.rel_err(g, r) for name, g, r in zip(names, got, ref)}
    assert all(e <= tol for e in errors.values()), errors


def run(inputs: dict, backend: str, **options) -> tuple:
    """(loss, d hidden, d weight[, d bias]) of fused_linear_kd."""
    out = kdfast.fused_linear_kd(**inputs, **options, backend=backend)
    leaves = [inputs[k] for k in ("student_hidden", "student_weight", "student_bias") if inputs.get(k) is not None]
    return (out.loss.detach(), *torch.autograd.grad(out.loss, leaves))
