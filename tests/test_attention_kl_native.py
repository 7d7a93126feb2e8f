"""attention_kl / relation_kl on the native backends (cpu; cuda where a GPU exists) against an
independent float64 formula, plus determinism, the no-[L, L]-allocation guarantee, bad inputs
and the CUDA kernel's spill check."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from alloc_spy import ShapeSpy

import kdfast
from kdfast import _ext

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _ext.CUDA is not None else [])
DEVICE = {"cpu": "cpu", "cuda": "cuda"}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

pytestmark = pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")


# ---------------------------------------------------------------- float64 formula (independent)
def kl_formula(q_s, k_s, q_t, k_t, key_mask):
    """Mean over (B, h, valid query rows) of KL(softmax(t) || softmax(s)) over valid keys, float64."""
    q_s, k_s, q_t, k_t = (x.double() for x in (q_s, k_s, q_t, k_t))
    b, h, length, _ = q_s.shape
    valid = torch.ones(b, length, dtype=torch.bool) if key_mask is None else key_mask.cpu()
    valid = valid.to(q_s.device)
    keys = valid[:, None, None, :]
    s = torch.einsum("bhid,bhjd->bhij", q_s, k_s) / q_s.shape[-1] ** 0.5
    t = torch.einsum("bhid,bhjd->bhij", q_t, k_t) / q_t.shape[-1] ** 0.5
    s, t = s.masked_fill(~keys, -1e30), t.masked_fill(~keys, -1e30)
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    per_key = torch.where(keys, log_p.exp() * (log_p - log_q), torch.zeros((), dtype=s.dtype, device=s.device))
    rows = per_key.sum(-1) * valid[:, None, :]
    return rows.sum() / max(int(valid.sum()) * h, 1)


def relation_formula(x_s, x_t, heads, key_mask):
    def split(x):
        b, length, width = x.shape
        return x.reshape(b, length, heads, width // heads).permute(0, 2, 1, 3)
    return kl_formula(split(x_s), split(x_s), split(x_t), split(x_t), key_mask)


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_mask(batch, length, device, fully_masked_row=True):
    mask = torch.rand(batch, length) > 0.3
    mask[:, 0] = True
    if fully_masked_row and batch > 1:
        mask[-1] = False
    return mask.to(device)


def check_against_formula(loss, grads, ref_loss, ref_grads, dtype):
    tol = TOLERANCE[dtype]
    assert torch.isfinite(loss) and rel_err(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert rel_err(g, ref) <= tol, rel_err(g, ref)


# ---------------------------------------------------------------- accuracy grid
GRID = [  # (B, heads, L, masked)
    (2, 3, 1, False), (2, 3, 1, True), (3, 2, 7, False), (3, 2, 7, True),
    (2, 2, 128, True), (1, 2, 513, False), (2, 1, 513, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,heads,length,masked", GRID)
def test_attention_kl_matches_float64(backend, batch, heads, length, masked):
    device = DEVICE[backend]
    q_s, k_s = (torch.randn(batch, heads, length, 24, device=device, requires_grad=True) for _ in range(2))
    q_t, k_t = (torch.randn(batch, heads, length, 40, device=device) for _ in range(2))
    mask = make_mask(batch, length, device) if masked else None
    loss = kdfast.attention_kl(q_s, k_s, q_t, k_t, mask, backend=backend)
    grads = torch.autograd.grad(loss, (q_s, k_s))
    leaves = [x.detach().double().requires_grad_() for x in (q_s, k_s)]
    ref = kl_formula(*leaves, q_t, k_t, mask)
    check_against_formula(loss, grads, ref, torch.autograd.grad(ref, leaves), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,length,masked", [(2, 1, True), (3, 7, True), (2, 128, False), (1, 513, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relation_kl_matches_float64(backend, batch, length, masked, dtype):
    device = DEVICE[backend]
    heads = 3  # relation heads of widths 16 (student) and 12 (teacher); neither equals an attention head count
    x_s = torch.randn(batch, length, 48, device=device).to(dtype).requires_grad_()
    x_t = torch.randn(batch, length, 36, device=device).to(dtype)
    mask = make_mask(batch, length, device) if masked else None
    loss = kdfast.relation_kl(x_s, x_t, heads, mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, x_s)
    leaf = x_s.detach().double().requires_grad_()
    ref = relation_formula(leaf, x_t, heads, mask)
    check_against_formula(loss, (grad,), ref, torch.autograd.grad(ref, leaf), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_and_strided_inputs(backend):
    """Scores in the hundreds (near one-hot softmaxes) and a non-contiguous q_s."""
    device = DEVICE[backend]
    base = torch.randn(2, 33, 3, 32, device=device) * 6
    q_s = base.transpose(1, 2).requires_grad_()  # [B, h, L, d] with a strided L
    k_s = (torch.randn(2, 3, 33, 32, device=device) * 6).requires_grad_()
    q_t, k_t = (torch.randn(2, 3, 33, 16, device=device) * 8 for _ in range(2))
    loss = kdfast.attention_kl(q_s, k_s, q_t, k_t, backend=backend)
    grads = torch.autograd.grad(loss, (q_s, k_s))
    leaves = [x.detach().double().requires_grad_() for x in (q_s, k_s)]
    ref = kl_formula(*leaves, q_t, k_t, None)
    check_against_formula(loss, grads, ref, torch.autograd.grad(ref, leaves), torch.float32)


def test_all_rows_masked_gives_zero_loss_and_gradient():
    x_s = torch.randn(2, 9, 32, requires_grad=True)
    loss = kdfast.relation_kl(x_s, torch.randn(2, 9, 32), 2, torch.zeros(2, 9, dtype=torch.bool), backend="cpu")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x_s.grad, torch.zeros_like(x_s))


# ---------------------------------------------------------------- determinism, memory
@pytest.mark.parametrize("op", ["attention_kl", "relation_kl"])
def test_two_backward_passes_are_bitwise_equal(op):
    if op == "attention_kl":
        inputs = [torch.randn(3, 4, 150, 32, requires_grad=True) for _ in range(2)] + \
                 [torch.randn(3, 4, 150, 48) for _ in range(2)]
        run = lambda: kdfast.attention_kl(*inputs, make_mask(3, 150, "cpu"), backend="cpu")  # noqa: E731
        leaves = inputs[:2]
    else:
        leaves = [torch.randn(3, 150, 96, requires_grad=True)]
        x_t = torch.randn(3, 150, 72)
        run = lambda: kdfast.relation_kl(leaves[0], x_t, 4, make_mask(3, 150, "cpu"), backend="cpu")  # noqa: E731
    torch.manual_seed(1)
    first = torch.autograd.grad(run(), leaves)
    torch.manual_seed(1)
    second = torch.autograd.grad(run(), leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["attention_kl", "relation_kl"])
def test_cpu_path_allocates_no_length_by_length_tensor(op):
    length = 96
    mask = make_mask(2, length, "cpu")
    if op == "attention_kl":
        leaves = [torch.randn(2, 3, length, 16, requires_grad=True) for _ in range(2)]
        teacher = [torch.randn(2, 3, length, 24) for _ in range(2)]
        run = lambda: kdfast.attention_kl(*leaves, *teacher, mask, backend="cpu")  # noqa: E731
    else:
        leaves = [torch.randn(2, length, 48, requires_grad=True)]
        x_t = torch.randn(2, length, 36)
        run = lambda: kdfast.relation_kl(leaves[0], x_t, 3, mask, backend="cpu")  # noqa: E731
    with ShapeSpy() as spy:
        torch.autograd.grad(run(), leaves)
    assert spy.shapes, "the spy saw no op at all"
    assert not spy.square(length)
    # the eager formula does allocate them, so the spy would catch a kernel that did
    with ShapeSpy() as spy:
        relation_formula(torch.randn(2, length, 48), torch.randn(2, length, 36), 3, mask)
    assert spy.square(length)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_get_clear_errors():
    x = torch.randn(2, 8, 48)
    with pytest.raises(ValueError, match=r"x_t: expected shape \[B, L, Ht\] with the B, L of x_s"):
        kdfast.relation_kl(x, torch.randn(3, 8, 48), 4, backend="cpu")
    with pytest.raises(ValueError, match=r"x_t: expected shape \[B, L, Ht\] with the B, L of x_s"):
        kdfast.relation_kl(x, torch.randn(2, 9, 48), 4, backend="cpu")
    with pytest.raises(ValueError, match="x_s: expected a width divisible by num_relation_heads=5, got width 48"):
        kdfast.relation_kl(x, x, 5, backend="cpu")
    with pytest.raises(ValueError, match=r"key_mask: expected shape \[B, L\] = \(2, 8\), got \(2, 7\)"):
        kdfast.relation_kl(x, x, 4, torch.ones(2, 7, dtype=torch.bool), backend="cpu")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q_t: expected shape \[B, h, L, d_t\] with the B, h, L of q_s"):
        kdfast.attention_kl(q, q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), backend="cpu")
    big = torch.randn(1, 2, 8, 160)
    with pytest.raises(ValueError, match=r"d_s=160, d_t=16: expected d <= 128 .*use backend='torch'"):
        kdfast.attention_kl(big, big, q, q, backend="cpu")
    with pytest.raises(ValueError, match=r"d_s=16, d_t=136: expected d <= 128 .*use backend='torch'"):
        kdfast.relation_kl(torch.randn(1, 8, 48), torch.randn(1, 8, 408), 3, backend="cpu")
    # auto falls back to torch for those instead of failing
    assert torch.isfinite(kdfast.attention_kl(big, big, q, q))


# ---------------------------------------------------------------- CUDA kernel compiles without spills
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernel_compiles_without_spills(arch, tmp_path):
    cmd = ["nvcc", "-c", "kernels/attention_kl.cu", "-o", str(tmp_path / "attention_kl.o"), "-O3", "-std=c++17",
           "-Icsrc", "-Ikernels", "-Xptxas", "-v", f"-arch={arch}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, log  # ptxas reported on every kernel
    assert all(stores == "0" and loads == "0" for stores, loads in spills), log
