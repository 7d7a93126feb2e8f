"""``kdfast selftest`` on CPU: it checks every op on every available backend and catches a wrong one."""
from __future__ import annotations

import pytest
import torch
from conftest import interpreting_triton

from kdfast import _backends, selftest
from kdfast.cli import main


def test_check_covers_every_op_and_available_backend():
    results = selftest.check("cpu", seed=1)
    seen = {(r.op, r.backend) for r in results}
    for op in _backends.OPS:
        for backend in selftest.available_backends(op, torch.device("cpu")):
            assert (op, backend) in seen
        assert (op, "torch") in seen
    if interpreting_triton():  # Triton's interpreter serves CPU tensors: it is checked too
        assert {"kd_kl", "fused_linear_kd"} <= {op for op, backend in seen if backend == "triton"}
    assert all(r.dtype == "float32" for r in results)
    assert not [r for r in results if r.failed], selftest.format_table(results)
    assert all(r.loss_err < 1e-5 and r.grad_err < 1e-5 for r in results if r.status == "ok")


@pytest.fixture
def torch_only(monkeypatch):
    """Check only the reference backend (fast whatever kernels exist)."""
    monkeypatch.setattr(selftest, "available_backends", lambda op, device: ["torch"])


def test_wrong_result_fails_and_exits_non_zero(monkeypatch, capsys, torch_only):
    import kdfast.reference.kd_kl as reference

    exact = reference.kd_kl

    def off_by_one_percent(**kwargs):  # float64 (the reference side of the check) stays exact
        loss = exact(**kwargs)
        return loss if kwargs["student_logits"].dtype == torch.float64 else loss * 1.01

    monkeypatch.setattr(reference, "kd_kl", off_by_one_percent)
    failed = [r for r in selftest.check("cpu", seed=3) if r.failed]
    assert [(r.op, r.backend) for r in failed] == [("kd_kl", "torch")]
    assert failed[0].loss_err == pytest.approx(0.01, rel=1e-3)
    assert main(["selftest", "--device", "cpu", "--seed", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "relative error above" in out


def test_exception_is_a_failure_and_decline_is_skipped(monkeypatch):
    import kdfast.reference.hidden_mse as reference

    def broken(**kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(reference, "hidden_mse", broken)
    monkeypatch.setattr(selftest, "available_backends", lambda op, device: ["torch", "cuda"])
    results = {(r.op, r.backend): r for r in selftest.check("cpu", seed=4)}
    assert results["hidden_mse", "torch"].failed
    assert "kernel exploded" in results["hidden_mse", "torch"].detail
    declined = results["kd_kl", "cuda"]
    assert declined.status == "skipped" and "CUDA tensors" in declined.detail


def test_cli_prints_table_and_passes(capsys, torch_only):
    assert main(["selftest", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in _backends.OPS:
        assert op in out
    assert "checks passed on cpu" in out
