"""kdfast on a torch without ``torch.library.custom_op``, ``triton_op`` and ``wrap_triton`` (torch 2.3): a
fresh process removes them while it imports kdfast, so the ops are ``kdfast/ops/_library.py``'s eager
stand-ins (CI has torch 2.13 only; on torch 2.3.1 the CPU loss tests were run by hand). Every loss on the
``cpu`` backend (and ``triton`` under the interpreter) must still equal the float64 torch reference,
forward and gradients, with and without autograd."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast import _ext
from kdfast.ops._library import EagerOp

SCRIPT = r"""
import sys
import torch
import torch.distributed._functional_collectives  # torch's own modules that register custom ops, first
removed = {name: getattr(torch.library, name) for name in ("custom_op", "triton_op", "wrap_triton")
           if hasattr(torch.library, name)}  # torch 2.3 has none of them
for name in removed:
    delattr(torch.library, name)
import kdfast  # noqa: E402  (registers its ops while torch.library lacks them)
for name, value in removed.items():  # back for torch's lazily imported modules
    setattr(torch.library, name, value)
from kdfast.ops import attention, hidden, kernels, vocab
from kdfast.ops._library import EagerOp

assert all(isinstance(op, EagerOp) for op in (vocab._fused_linear_kd, vocab._kd_kl, attention._attention_kl,
                                              attention._relation_kl, hidden._hidden_mse, kernels._op))
backends = sys.argv[1].split(",")
torch.manual_seed(0)
B, H, L, D, N, V = 2, 2, 5, 4, 11, 37


def leaves(*shapes):
    return [torch.randn(*s, dtype=torch.float64).requires_grad_() for s in shapes]


def cases():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -2:] = False
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    t_h, t_w = torch.randn(N, 6, dtype=torch.float64), torch.randn(V, 6, dtype=torch.float64)
    yield "fused_linear_kd", leaves((N, 8), (V, 8)), lambda x, be: kdfast.fused_linear_kd(
        x[0], x[1], t_h.to(x[0].dtype), t_w.to(x[0].dtype), labels=labels, mlm_weight=0.5, temperature=2.0,
        backend=be).loss
    t_logits = torch.randn(N, V, dtype=torch.float64)
    yield "kd_kl", leaves((N, V)), lambda x, be: kdfast.kd_kl(x[0], t_logits.to(x[0].dtype), temperature=2.0,
                                                            backend=be)
    q_t, k_t = torch.randn(B, H, L, 6, dtype=torch.float64), torch.randn(B, H, L, 6, dtype=torch.float64)
    yield "attention_kl", leaves((B, H, L, D), (B, H, L, D)), lambda x, be: kdfast.attention_kl(
        x[0], x[1], q_t.to(x[0].dtype), k_t.to(x[0].dtype), mask, backend=be)
    x_t = torch.randn(B, L, 12, dtype=torch.float64)
    yield "relation_kl", leaves((B, L, 8)), lambda x, be: kdfast.relation_kl(x[0], x_t.to(x[0].dtype), 2, mask,
                                                                            backend=be)
    yield "attention_score_mse", leaves((B, H, L, D), (B, H, L, D)), lambda x, be: kdfast.attention_score_mse(
        x[0], x[1], q_t.to(x[0].dtype), k_t.to(x[0].dtype), mask, backend=be)
    h_t = torch.randn(B, L, 12, dtype=torch.float64)
    proj = torch.nn.Linear(8, 12).double()
    yield "hidden_mse", leaves((B, L, 8)), lambda x, be: kdfast.hidden_mse(
        x[0], h_t.to(x[0].dtype), proj.to(x[0].dtype), mask, backend=be)


def error(got, ref):
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))


for name, inputs, loss_of in cases():
    reference = loss_of(inputs, "torch")
    ref_grads = torch.autograd.grad(reference, inputs)
    for backend in backends:
        x = [t.detach().float().requires_grad_() for t in inputs]
        loss = loss_of(x, backend)
        worst = max(error(loss, reference), *(error(g, r) for g, r in zip(torch.autograd.grad(loss, x), ref_grads)))
        assert worst < 1e-5, (name, backend, worst)
        with torch.no_grad():
            assert error(loss_of(x, backend), reference) < 1e-5, (name, backend, "no_grad")
print("compat ok:", ", ".join(backends))
"""


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
def test_losses_without_torch_library_custom_ops(tmp_path):
    backends = "cpu,triton" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"
    here = str(Path(kdfast.__file__).resolve().parents[1])  # the kdfast this test imports (installed or not)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", SCRIPT, backends], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # not the checkout's folder, which `-c` would put first
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"compat ok: {', '.join(backends.split(','))}" in done.stdout


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_eager_op_runs_per_device_with_its_formula():
    """EagerOp: the registered formula runs under autograd, the implementation alone without it, and a device
    without an implementation is an error naming the op."""
    op = EagerOp("test::double", _double, device_types="cuda")
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(NotImplementedError, match="test::double: no implementation for device 'cpu'"):
        op(x)
    op.register_kernel("cpu")(_double)
    calls = []

    def setup(ctx, inputs, output):
        calls.append("setup")

    def backward(ctx, grad):
        calls.append("backward")
        return grad * 2

    op.register_autograd(backward, setup_context=setup)
    (grad,) = torch.autograd.grad(op(x).sum(), x)
    assert calls == ["setup", "backward"] and torch.equal(grad, torch.full((3,), 2.0))
    with torch.no_grad():
        assert torch.equal(op(x), x * 2) and calls == ["setup", "backward"]
