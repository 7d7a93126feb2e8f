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
        assert r["working_mb"] == pytest.approx(r["peak_mb"] - r["outputs_mb"], abs=0.02)
    assert rows[("kdfast", "cpu")]["max_rel_err"] < 1e-5 and rows[("eager", None)]["max_rel_err"] < 1e-5
    assert rows[("floor", None)]["max_rel_err"] is None
    assert rows[("eager", None)]["peak_vs_eager"] == 1.0 and rows[("kdfast", "cpu")]["outputs_mb"] > 0
    assert "kdfast" in capsys.readouterr().out
    expected_peak = (2 * 37 * 203 * 4 + 4 * (37 * 8 + 203 * 8)) / 2**20  # one 37-row chunk of each logit tensor
    assert all(r["analytic_peak_mb_cuda"] == round(expected_peak, 2) for r in report["results"])
    phases = rows[("kdfast", "cpu")]["chunk_phases_ms"]
    assert set(phases) == {*vocab_kd.PHASES, "other", "total", "chunk_rows"} and phases["chunk_rows"] == 37
    assert all(phases[name] >= 0 for name in vocab_kd.PHASES) and phases["total"] > 0
    assert phases["other"] >= -0.01  # the phases happen inside the timed call
    assert "chunk_phases_ms" not in rows[("eager", None)]


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
def test_several_kinds_in_one_run(tmp_path, monkeypatch):
    """``--kind all`` (or a comma list) times each shape once per kind and writes one row per kind, shape and impl."""
    monkeypatch.setattr(vocab_kd, "shapes", lambda quick, device: [dict(TINY)])
    path = tmp_path / "out.json"
    args = _args(op="vocab_kd", quick=True, device="cpu", impl=["kdfast"], json=str(path), repeats=1, warmup=0,
                 kind=kernels.kind_list("all"))
    assert kernels.run(args) == 0
    rows = json.loads(path.read_text())["results"]
    kdfast_rows = [r for r in rows if r["impl"] == "kdfast"]
    assert [r["shape"]["kind"] for r in kdfast_rows] == list(kernels.KINDS)
    assert all(r["max_rel_err"] < 1e-5 for r in kdfast_rows)
    assert kernels.kind_list("kl, jsd") == ("kl", "jsd")
    with pytest.raises(argparse.ArgumentTypeError, match="got 'kl,js'"):
        kernels.kind_list("kl,js")
    keep = kernels._shape_filter(["rows=2048", "V=30522,128256"])
    assert keep({"rows": 2048, "V": 128256}) and not keep({"rows": 2048, "V": 151936})


def test_llm_shapes_keep_the_cuda_chunk_bytes():
    """LLM vocabularies are in the full grid (selectable with --shape V=...); the CUDA driver's chunks take
    fewer rows as V grows, so its logit buffers stay at CUDA_CHUNK_BYTES whatever rows x V."""
    from kdfast.functions import vocab_kd as driver

    llm = [s for s in vocab_kd.shapes(False, torch.device("cuda")) if s["V"] != vocab_kd.VOCAB]
    assert {(s["V"], s["Hs"], s["Ht"], s["rows"]) for s in llm} == {(v, 2048, 4096, 8192)
                                                                  for v in (128256, 151936, 262144)}
    assert {s["rows"] for s in vocab_kd.shapes(False, torch.device("cpu")) if s["V"] != vocab_kd.VOCAB} == {2048}
    assert kernels._shape_filter(["V=151936"])(llm[1]) and not kernels._shape_filter(["V=151936"])(llm[0])
    for shape in llm:
        chunk = driver.rows_within(shape["rows"], shape["V"], driver.CUDA_CHUNK_BYTES)
        assert chunk < shape["rows"] and 2 * chunk * shape["V"] * 4 <= driver.CUDA_CHUNK_BYTES
        grads_mb = 4 * (shape["rows"] * shape["Hs"] + shape["V"] * shape["Hs"]) / 2**20
        assert vocab_kd.analytic_peak_mb_cuda(shape) <= driver.CUDA_CHUNK_BYTES / 2**20 + grads_mb
        doubled = vocab_kd.analytic_peak_mb_cuda(dict(shape, rows=2 * shape["rows"]))  # only d_hidden grows
        growth = 4 * shape["rows"] * shape["Hs"] / 2**20
        assert doubled - vocab_kd.analytic_peak_mb_cuda(shape) == pytest.approx(growth, abs=0.02)
    assert driver.rows_within(4096, 262144, driver.CPU_CHUNK_BYTES) == 64


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
def test_phase_hook_sees_every_chunk_and_costs_nothing_off(monkeypatch):
    from kdfast.functions import vocab_kd as driver
    from kdfast.functions.vocab_kd import phases

    monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", "16")
    x = vocab_kd.inputs(dict(TINY), torch.float32, torch.device("cpu"))
    marks = []
    with driver.phase_hook(marks.append):
        hooked = vocab_kd._kdfast("cpu")(x)
    assert marks == ["start", *vocab_kd.PHASES] * 3  # 37 rows in chunks of 16
    plain = vocab_kd._kdfast("cpu")(x)  # outside the block: no hook, the same numbers
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain)) and phases._PHASE_HOOK[0] is None


def test_reference_matches_eager_in_float64():
    torch.manual_seed(0)
    x = vocab_kd.inputs(dict(TINY, rows=1100), torch.float64, torch.device("cpu"))
    whole = vocab_kd._eager(x)  # one chunk of 1100 rows vs the reference's 512-row chunks
    chunked = vocab_kd.reference(x)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(whole, chunked))


def test_quick_shapes_and_full_grid():
    assert vocab_kd.shapes(True, torch.device("cpu")) == [{"rows": 1024, "V": 30522, "Hs": 384, "Ht": 768}]
    full = [s for s in vocab_kd.shapes(False, torch.device("cpu")) if s["V"] == 30522]
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
