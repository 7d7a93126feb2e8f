"""`kdfast bench kernels`: the harness runs an op module's impls on tiny shapes and writes the JSON schema."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from kdfast import _ext
from kdfast.bench import kernels
from kdfast.bench.ops import vocab_kd

TINY = {"rows": 37, "V": 203, "Hs": 8, "Ht": 12}


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
def test_vocab_kd_bench_writes_the_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vocab_kd, "shapes", lambda quick, device: [dict(TINY)])
    path = tmp_path / "out.json"
    args = _args(op="vocab_kd", quick=True, device="cpu", impl=["kdfast", "eager"], json=str(path), repeats=1,
                 warmup=0)
    assert kernels.run(args) == 0
    report = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "git_commit", "seed", "threads"):
        assert key in report
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    rows = {(r["impl"], r["backend"]): r for r in report["results"]}
    assert set(rows) == {("kdfast", "cpu"), ("eager", None), ("floor", None)}
    for r in report["results"]:
        assert set(r) >= {"op", "impl", "backend", "shape", "dtype", "median_ms", "peak_mb", "max_rel_err"}
        assert r["op"] == "vocab_kd" and r["shape"] == TINY and r["dtype"] == "float32"
        assert r["median_ms"] > 0 and r["peak_mb"] >= 0
    assert rows[("kdfast", "cpu")]["max_rel_err"] < 1e-5 and rows[("eager", None)]["max_rel_err"] < 1e-5
    assert rows[("floor", None)]["max_rel_err"] is None
    assert "kdfast" in capsys.readouterr().out


def test_reference_matches_eager_in_float64():
    torch.manual_seed(0)
    x = vocab_kd.inputs(dict(TINY, rows=1100), torch.float64, torch.device("cpu"))
    whole = vocab_kd._eager(x)  # one chunk of 1100 rows vs the reference's 512-row chunks
    chunked = vocab_kd.reference(x)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(whole, chunked))


def test_quick_shapes_and_full_grid():
    assert vocab_kd.shapes(True, torch.device("cpu")) == [{"rows": 1024, "V": 30522, "Hs": 384, "Ht": 768}]
    full = vocab_kd.shapes(False, torch.device("cpu"))
    assert {(s["rows"], s["Hs"], s["Ht"]) for s in full} == {(n, hs, ht) for n in (2048, 8192)
                                                            for hs, ht in ((384, 768), (768, 1024))}


def test_both_floors_compute_the_same_products():
    torch.manual_seed(0)
    x = vocab_kd.inputs(TINY, torch.float32, torch.device("cpu"))
    impls = vocab_kd.impls(torch.device("cpu"))
    t, d_hidden, d_weight = impls["floor"](x)
    t_vocab_major, d_hidden_vm, d_weight_vm = impls["floor_vocab_major"](x)
    assert t_vocab_major.shape == (TINY["V"], TINY["rows"])
    for a, b in ((t, t_vocab_major.t()), (d_hidden, d_hidden_vm), (d_weight, d_weight_vm)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
