"""CUDA backend of the vocabulary KD: the kernel compiles for sm_80 and sm_90 without register spills
(needs nvcc), and on a GPU matches the float64 formulas. Its arithmetic (csrc/vocab_kd_math.h) is the
CPU kernel's, which tests/test_vocab_kd_cpu.py checks everywhere."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import vocab_kd_float64 as f64
from vocab_kd_inputs import assert_close, make

import kdfast
from kdfast import _ext

REPO = Path(__file__).resolve().parents[1]
_CUDA_NVCC = Path("/usr/local/cuda/bin/nvcc")
NVCC = shutil.which("nvcc") or (str(_CUDA_NVCC) if _CUDA_NVCC.exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernel_compiles_without_spills(arch, tmp_path):
    cmd = [NVCC, "-c", "kernels/vocab_kd.cu", "-o", str(tmp_path / "vocab_kd.o"), "-O3", "-std=c++17", "-Icsrc",
           "-Ikernels", "--use_fast_math", "-Xcompiler", "-fPIC", "-Xptxas", "-v", f"-arch=sm_{arch}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(stores == "0" and loads == "0" for stores, loads in spills), log


gpu = pytest.mark.skipif(not torch.cuda.is_available() or _ext.CUDA is None,
                         reason="needs a CUDA device and the kdfast._cuda extension")


def _to_cuda(inputs: dict) -> dict:
    return {k: (v.detach().cuda().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
            for k, v in inputs.items()}


@gpu
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_cuda_matches_float64(temperature, kind, reduction):
    inputs = make()
    options = dict(temperature=temperature, kind=kind, reduction=reduction, mlm_weight=0.7, teacher_topk=None)
    gpu_inputs = _to_cuda(inputs)
    out = kdfast.fused_linear_kd(**gpu_inputs, **options, backend="cuda")
    names = ["student_hidden", "student_weight", "student_bias"]
    grads = torch.autograd.grad(out.loss, [gpu_inputs[n] for n in names])
    got = tuple(x.cpu() for x in (out.loss.detach(), *grads))
    assert_close(got, f64.loss_and_grads(**inputs, **options), 1e-5)


@gpu
def test_cuda_bf16_topk_and_kd_kl():
    inputs = make(dtype=torch.bfloat16)
    options = dict(temperature=2.0, mlm_weight=0.5, teacher_topk=9)
    gpu_inputs = _to_cuda(inputs)
    out = kdfast.fused_linear_kd(**gpu_inputs, **options, backend="cuda")
    assert f64.rel_err(out.loss.cpu(), f64.loss_and_grads(**inputs, **options)[0]) <= 1e-3
    s = (torch.randn(13, 999) * 3).requires_grad_(True)
    t = torch.randn(13, 999) * 3
    got = kdfast.kd_kl(s.detach().cuda(), t.cuda(), temperature=2.0, backend="cuda")
    assert f64.rel_err(got.cpu(), f64.kd_kl(s.double(), t.double(), temperature=2.0)) <= 1e-5


@gpu
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)])
def test_cuda_divergences_match_float64(kind, beta, temperature):
    inputs = make()
    options = dict(temperature=temperature, kind=kind, beta=beta, mlm_weight=0.7, mask=torch.rand(29) < 0.7)
    gpu_inputs = _to_cuda(inputs)
    out = kdfast.fused_linear_kd(**gpu_inputs, **dict(options, mask=options["mask"].cuda()), backend="cuda")
    names = ["student_hidden", "student_weight", "student_bias"]
    grads = torch.autograd.grad(out.loss, [gpu_inputs[n] for n in names])
    got = tuple(x.cpu() for x in (out.loss.detach(), *grads))
    assert_close(got, f64.loss_and_grads(**inputs, **options), 1e-5)
    s, t = torch.randn(13, 999) * 3, torch.randn(13, 999) * 3
    t[:, ::5] -= 1e4  # far below the rest: p underflows there
    s64 = s.double().requires_grad_(True)
    ref = f64.kd_kl(s64, t.double(), temperature=temperature, kind=kind, beta=beta)
    (ref_grad,) = torch.autograd.grad(ref, [s64])
    s_gpu = s.cuda().requires_grad_(True)
    loss = kdfast.kd_kl(s_gpu, t.cuda(), temperature=temperature, kind=kind, beta=beta, backend="cuda")
    (grad,) = torch.autograd.grad(loss, [s_gpu])
    assert f64.rel_err(loss.cpu(), ref) <= 1e-5 and f64.rel_err(grad.cpu(), ref_grad) <= 1e-5


@gpu
def test_cuda_jsd_topk_and_extreme_logits():
    inputs = make()
    options = dict(temperature=2.0, kind="jsd", beta=0.3, teacher_topk=7, mlm_weight=0.5)
    out = kdfast.fused_linear_kd(**_to_cuda(inputs), **options, backend="cuda")
    assert f64.rel_err(out.loss.cpu(), f64.loss_and_grads(**inputs, **options)[0]) <= 1e-5
    s = torch.randn(12, 777) * 3 + torch.randint(-1, 2, (12, 1)) * 1e4
    t = torch.randn(12, 777) * 3 + torch.randint(-1, 2, (12, 1)) * 1e4
    s[:6, 5] += 25.0
    t[:3, 5] += 25.0
    t[3:6, 9] += 25.0
    for kind in ("reverse_kl", "jsd"):
        s64 = s.double().requires_grad_(True)
        ref = f64.kd_kl(s64, t.double(), temperature=0.5, kind=kind, beta=0.3)
        (ref_grad,) = torch.autograd.grad(ref, [s64])
        s_gpu = s.cuda().requires_grad_(True)
        loss = kdfast.kd_kl(s_gpu, t.cuda(), temperature=0.5, kind=kind, beta=0.3, backend="cuda")
        (grad,) = torch.autograd.grad(loss, [s_gpu])
        assert f64.rel_err(loss.cpu(), ref) <= 1e-5 and f64.rel_err(grad.cpu(), ref_grad) <= 1e-5
