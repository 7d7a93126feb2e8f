"""`kdfast device-check` (kdfast/apps/device_check.py) without a GPU: every job skipped with its reason and one
JSON written; the time limit and a failing job on their own (the GPU figures need a device: benchmarks/)."""
from __future__ import annotations

import json

import pytest
import torch

from kdfast.apps import device_check
from kdfast.cli import main, run_command


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_every_job_is_skipped_with_its_reason(tmp_path, capsys):
    assert main(["device-check", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert list(report["jobs"]) == [job.name for job in device_check.JOBS]
    for entry in report["jobs"].values():
        assert entry["status"] == "skipped" and "no CUDA device" in entry["reason"]
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"] == torch.__version__
    assert "device-check: selftest: skipped (no CUDA device" in capsys.readouterr().out


def test_a_job_the_time_left_cannot_cover_is_skipped():
    job = device_check.JOBS[0]
    assert "time limit: 10 s left" in device_check.skip_reason(job, torch.device("cuda"), False, 10)
    assert device_check.skip_reason(job, torch.device("cuda"), False, 10_000) is None


def test_a_failing_job_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(device, smoke, out):
        raise RuntimeError("kernel launch failed")

    jobs = (device_check.Job("broken", 1, broken), device_check.Job("fine", 1, lambda device, smoke, out: [1.5]))
    monkeypatch.setattr(device_check, "JOBS", jobs)
    report = device_check.run_jobs(torch.device("cpu"), True, tmp_path, 60)
    assert report["jobs"]["broken"]["status"] == "error"
    assert "RuntimeError: kernel launch failed" in report["jobs"]["broken"]["reason"]
    assert report["jobs"]["fine"] == {"status": "ok", "seconds": report["jobs"]["fine"]["seconds"], "figures": [1.5]}
    assert json.loads((tmp_path / "device_check.json").read_text())["jobs"]["fine"]["figures"] == [1.5]


def test_unknown_job_names_are_refused():
    with pytest.raises(ValueError, match="only: expected job names among selftest"):
        run_command(["device-check", "--only", "benchmarks"])
