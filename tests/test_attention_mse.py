"""attention_score_mse on every kernel backend vs an independent float64 formula (the full scores)."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from alloc_spy import ShapeSpy
from conftest import needs_triton_interpreter

from kdfast import _backends
from kdfast.losses.attention import attention_score_mse

REPO = Path(__file__).resolve().parents[1]

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(_backends.backend_ready("cpu", torch.device("cpu")) is not None,
                                                 reason="kdfast._C not built")),
    pytest.param("triton", marks=needs_triton_interpreter),
]


def expected(q_s, k_s, q_t, k_t, key_mask, include_masked_keys):
    """Float64 loss and (dQ_s, dK_s) from the explicit [B, h, L, L] score difference."""
    q_s, k_s, q_t, k_t = (x.detach().double() for x in (q_s, k_s, q_t, k_t))
    diff = (q_s @ k_s.transpose(-1, -2) / math.sqrt(q_s.shape[-1])
            - q_t @ k_t.transpose(-1, -2) / math.sqrt(q_t.shape[-1]))
    if key_mask is not None and not include_masked_keys:
        diff = diff * key_mask[:, None, None, :].double()
    count = diff.numel()
    d_scores = 2.0 * diff / count / math.sqrt(q_s.shape[-1])  # d loss / d (q_s k_s^T)
    return (diff.pow(2).sum() / count, d_scores @ k_s, d_scores.transpose(-1, -2) @ q_s)


def make(b, h, length, d_s, d_t, dtype=torch.float32, close=False):
    q_s, k_s = torch.randn(b, h, length, d_s), torch.randn(b, h, length, d_s)
    if close:  # student = teacher up to a relative difference of 1e-3
        q_t, k_t = q_s.clone(), k_s.clone()
        q_s = q_s + 1e-3 * torch.randn_like(q_s)
        k_s = k_s + 1e-3 * torch.randn_like(k_s)
    else:
        q_t, k_t = torch.randn(b, h, length, d_t), torch.randn(b, h, length, d_t)
    return [x.to(dtype).requires_grad_(i < 2) for i, x in enumerate((q_s, k_s, q_t, k_t))]


def rel(out, ref):
    return float((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))


def run(backend, q_s, k_s, q_t, k_t, key_mask=None, include_masked_keys=False):
    loss = attention_score_mse(q_s, k_s, q_t, k_t, key_mask, include_masked_keys, backend=backend)
    return (loss, *torch.autograd.grad(loss, (q_s, k_s)))


def check(backend, inputs, key_mask=None, include_masked_keys=False, tol=1e-5):
    got = run(backend, *inputs, key_mask, include_masked_keys)
    want = expected(*inputs, key_mask, include_masked_keys)
    assert got[0].dtype == torch.float32
    for name, g, w in zip(("loss", "dq_s", "dk_s"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel(g, w) <= tol, f"{name}: relative error {rel(g, w):.2e}"


GRID = [  # (B, h, L, d_s, d_t)
    (2, 3, 1, 16, 24),
    (2, 3, 7, 24, 40),
    (1, 2, 128, 32, 64),
    (1, 1, 513, 40, 24),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64(backend, shape, masked):
    inputs = make(*shape)
    key_mask = None
    if masked:
        key_mask = torch.rand(shape[0], shape[2]) > 0.3
        key_mask[:, 0] = True
    check(backend, inputs, key_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """Q/K as models hold them: [B, L, h, d] buffers seen as [B, h, L, d]; a strided key mask."""
    q_s, k_s, q_t, k_t = (torch.randn(2, 9, 3, d).transpose(1, 2) for d in (16, 16, 24, 24))
    q_s.requires_grad_()
    k_s.requires_grad_()
    key_mask = (torch.rand(9, 2) > 0.3).t()
    check(backend, (q_s, k_s, q_t, k_t), key_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_include_masked_keys(backend):
    inputs = make(2, 2, 19, 16, 32)
    key_mask = torch.rand(2, 19) > 0.5
    check(backend, inputs, key_mask, include_masked_keys=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [7, 128])
def test_student_close_to_teacher(backend, length):
    """E is ~1e-6 of each Gram term here; float64 Grams keep loss and gradients at 1e-5."""
    inputs = make(2, 2, length, 32, 32, close=True)
    key_mask = torch.rand(2, length) > 0.2
    check(backend, inputs, key_mask)


def plain_fp32_gram_algebra(q_s, k_s, q_t, k_t):
    """The same Gram algebra with fp32 Grams: what the float64 path guards against."""
    a_s, a_t = q_s.shape[-1] ** -0.5, q_t.shape[-1] ** -0.5
    x = torch.cat([a_s * q_s, -a_t * q_t], -1)
    y = torch.cat([k_s, k_t], -1)
    gq, gk = x.transpose(-1, -2) @ x, y.transpose(-1, -2) @ y
    count = q_s.shape[0] * q_s.shape[1] * q_s.shape[2] ** 2
    loss = (gq * gk).sum() / count
    return loss, (2 * a_s / count) * (x @ gk)[..., :q_s.shape[-1]], (2 / count) * (y @ gq)[..., :q_s.shape[-1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_gram_algebra_fails_where_float64_passes(backend):
    inputs = make(2, 2, 128, 32, 32, close=True)
    want = expected(*inputs, None, False)
    naive = plain_fp32_gram_algebra(*(x.detach() for x in inputs))
    for g, w in zip(naive, want):  # fp32 Grams lose the difference: loss and both gradients
        assert rel(g, w) > 1e-4
    check(backend, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    inputs = make(2, 2, 33, 16, 32, dtype=torch.bfloat16)
    got = run(backend, *inputs)
    want = expected(*inputs, None, False)
    assert got[1].dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert rel(g, w) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_backward_passes_bitwise_equal(backend):
    inputs = make(1, 2, 17, 24, 16)
    key_mask = torch.rand(1, 17) > 0.3
    first, second = run(backend, *inputs, key_mask), run(backend, *inputs, key_mask)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    loss = attention_score_mse(*inputs, key_mask, backend=backend)
    grads = [torch.autograd.grad(loss, inputs[:2], retain_graph=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_length_by_length_tensor(backend):
    length = 96
    inputs = make(1, 2, length, 16, 24)
    key_mask = torch.rand(1, length) > 0.3
    with ShapeSpy() as spy:
        run(backend, *inputs, key_mask)
    assert spy.shapes, "the spy saw no allocation"
    assert not spy.square(length)
    with ShapeSpy() as spy:  # the spy does catch the reference's scores
        run("torch", *inputs, key_mask)
    assert spy.square(length)


def test_bad_inputs():
    q_s, k_s, q_t, k_t = make(2, 2, 8, 16, 16)
    with pytest.raises(ValueError, match=r"key_mask: expected shape \[B, L\]"):
        attention_score_mse(q_s, k_s, q_t, k_t, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q_t: expected shape"):
        attention_score_mse(q_s, k_s, q_t[:, :, :7], k_t)
    big = torch.randn(1, 1, 4, 130)
    with pytest.raises(ValueError, match=r"backend='torch' always works") as err:
        attention_score_mse(big, big, big, big, backend="cuda")
    assert "cuda" in str(err.value)


@needs_triton_interpreter
def test_triton_declines_large_head_dim():
    big = torch.randn(1, 1, 4, 130)
    with pytest.raises(ValueError, match=r"d <= 128 on backend 'triton'.*backend='torch'"):
        attention_score_mse(big, big, big, big, backend="triton")


def test_cpu_declines_float64_and_auto_falls_back():
    inputs = [x.double() for x in make(1, 1, 5, 8, 8)]
    if _backends.backend_ready("cpu", torch.device("cpu")) is None:
        with pytest.raises(ValueError, match="got float64"):
            attention_score_mse(*inputs, backend="cpu")
    assert _backends.pick("attention_score_mse", torch.device("cpu"), "auto", q_s=inputs[0], k_s=inputs[1],
                          q_t=inputs[2], k_t=inputs[3], key_mask=None, include_masked_keys=False) == "torch"


def _ptxas_spills(source: str, arch: str, tmp_path: Path) -> str:
    proc = subprocess.run(["nvcc", "-c", source, "-o", str(tmp_path / "k.o"), "-O3", "-std=c++17", "-Icsrc",
                           "-Ikernels", "--use_fast_math", "-Xptxas", "-v", f"-arch={arch}"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", ["kernels/attention_mse.cu", "kernels/hidden_mse.cu"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile_without_spills(source, arch, tmp_path):
    log = _ptxas_spills(source, arch, tmp_path)
    assert "registers" in log
    no_spill = " 0 bytes spill stores, 0 bytes spill loads"
    assert no_spill in log
    assert not [line for line in log.splitlines() if "spill" in line and no_spill not in line]
