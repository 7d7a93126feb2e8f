"""Backend dispatch: explicit choices, auto order, clear refusals."""
import pytest
import torch

import kdfast
from kdfast import _backends


def test_torch_backend_always_serves_cpu():
    assert _backends.pick("kd_kl", torch.device("cpu"), "torch") == "torch"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend: expected one of 'auto'"):
        kdfast.kd_kl(torch.randn(2, 3), torch.randn(2, 3), backend="tpu")


def test_cuda_backend_on_cpu_tensors_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run kd_kl: .*CUDA tensors.*backend='torch'"):
        kdfast.kd_kl(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_auto_on_cpu_never_picks_gpu_backends():
    for op in _backends.OPS:
        assert _backends.pick(op, torch.device("cpu")) in ("cpu", "torch")


def test_info_reports_every_op():
    from kdfast.info import collect

    report = collect()
    assert set(report["backends"]) == set(_backends.OPS)
    assert report["extensions"]["kdfast._C"] == "built"
