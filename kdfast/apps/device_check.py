"""``kdfast device-check``: what a developer lent a GPU runs first, in at most 8 minutes, into one JSON.

Jobs, in priority order (each is skipped, with the reason, when the time left cannot cover its estimate):
1. ``kdfast selftest`` on every GPU backend in fp32, bf16 and fp16;
2. kernel benchmarks (``kdfast bench kernels`` harness) against eager, ``torch.compile`` and Liger-Kernel when
   installed: vocabulary KD at the study's BERT shape (8192 rows, Hs/Ht 768/1024), relation KL and attention-score
   MSE at BERT's lengths (128, 512), vocabulary KD at one LLM shape (V = 128256, Hs/Ht 2048/4096), then the other
   BERT vocabulary shapes;
3. a budget calibration (``kdfast bench budget``) with real GPU time at the study's shapes: a BERT-base-sized
   teacher (random weights, no download), the 6L-768 student, batch 256 x 128.

``OUT/device_check.json``: ``environment``, ``jobs`` (per job: ``status`` ok / error / skipped, ``reason``,
``seconds`` and its figures: selftest rows, benchmark rows, the calibration report); rewritten after every job,
so a killed run keeps what it measured. Without a GPU every job is skipped with the reason, unless ``--smoke``
runs them at quick shapes on the CPU (a check of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from kdfast.runtime.environment import environment

LIMIT_S = 450  # 7.5 min of jobs: the 8 minutes less start-up
BERT_VOCAB_SHAPE = {"rows": 8192, "V": 30522, "Hs": 768, "Ht": 1024}
LLM_VOCAB_SHAPE = {"rows": 8192, "V": 128256, "Hs": 2048, "Ht": 4096}
BERT_LENGTHS = (128, 512)
STUDY_CALIBRATION = ["--teacher", "bert-base-config", "--student", "6L-768", "--batch", "256", "--seq", "128",
                     "--strategies", "no-kd,vanilla,tinybert,minilm,minilm_v2", "--budget", "24h"]


@dataclass
class Job:
    """One measurement: ``run(device, smoke, out) -> figures``; ``estimate_s``: what it needs on an H100/H200."""

    name: str
    estimate_s: float
    run: Callable[[torch.device, bool, Path], object]
    in_smoke: bool = True  # --smoke on the CPU runs it (one quick shape per op)


def _selftest(device: torch.device, smoke: bool, out: Path) -> list:
    from kdfast import selftest

    dtypes = [torch.float32] if device.type == "cpu" else list(selftest.DTYPES.values())
    results = selftest.check(device, dtypes=dtypes)
    print(selftest.format_table(results), flush=True)
    failed = [r for r in results if r.failed]
    if failed:
        raise ValueError(f"selftest: {len(failed)} failure(s): " + "; ".join(f"{r.op}/{r.backend}/{r.dtype}"
                                                                           for r in failed))
    return [dataclasses.asdict(r) for r in results]


def _bench(op: str, keep: Callable[[dict], bool]):
    """A job timing ``op`` on the shapes ``keep`` accepts (on CPU with --smoke: its quick shape, no compile)."""
    def run(device: torch.device, smoke: bool, out: Path) -> list:
        from kdfast.bench import kernels

        log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        if device.type == "cpu":
            return kernels.bench_op(op, device, None, True, ["kdfast", "eager"], 1, 2, log=log)
        return kernels.bench_op(op, device, None, False, None, 2, 5, log=log, keep=keep)
    return run


def _calibration(device: torch.device, smoke: bool, out: Path) -> dict:
    from kdfast.apps import calibrate

    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    argv = ["--quick", "--device", "cpu"] if device.type == "cpu" else [*STUDY_CALIBRATION, "--device", "cuda"]
    report = calibrate.calibrate(calibrate.options_from(parser.parse_args([*argv, "--out", str(out)])))
    calibrate.write(report, out / "calibration", None)
    return report


def _length_in(lengths):
    return lambda shape: shape["L"] in lengths


def _other_bert_vocab(shape: dict) -> bool:
    return shape["V"] == BERT_VOCAB_SHAPE["V"] and shape != BERT_VOCAB_SHAPE


JOBS = (
    Job("selftest", 90, _selftest),
    Job("bench vocab_kd BERT", 60, _bench("vocab_kd", lambda shape: shape == BERT_VOCAB_SHAPE)),
    Job("bench relation_kl BERT", 60, _bench("relation_kl", _length_in(BERT_LENGTHS))),
    Job("bench attention_mse BERT", 60, _bench("attention_mse", _length_in(BERT_LENGTHS))),
    Job("bench vocab_kd LLM", 60, _bench("vocab_kd", lambda shape: shape == LLM_VOCAB_SHAPE), in_smoke=False),
    Job("calibration", 120, _calibration),
    Job("bench vocab_kd other BERT shapes", 90, _bench("vocab_kd", _other_bert_vocab), in_smoke=False),
)


def skip_reason(job: Job, device: torch.device, smoke: bool, left_s: float) -> Optional[str]:
    """Why ``job`` does not run here, or None."""
    if device.type != "cuda" and not smoke:
        return (f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): GPU figures "
                f"only{'; --smoke runs this job at a quick shape on the CPU' if job.in_smoke else ''}")
    if device.type != "cuda" and not job.in_smoke:
        return "--smoke: the quick vocab_kd shape already ran in 'bench vocab_kd BERT'"
    if device.type == "cuda" and left_s < job.estimate_s:
        return f"time limit: {left_s:.0f} s left of --limit, the job needs about {job.estimate_s:.0f} s"
    return None


def run_jobs(device: torch.device, smoke: bool, out: Path, limit_s: float, only: Optional[list] = None) -> dict:
    """Every job (or those named in ``only``) in order; the report, also written to ``OUT/device_check.json``."""
    report = {"environment": environment(device), "smoke": smoke, "limit_s": limit_s, "jobs": {}}
    start = time.monotonic()
    for job in JOBS:
        if only and job.name not in only:
            continue
        reason = skip_reason(job, device, smoke, limit_s - (time.monotonic() - start))
        entry = {"status": "skipped", "reason": reason} if reason else _run_one(job, device, smoke, out)
        report["jobs"][job.name] = entry
        seconds = f" in {entry['seconds']:.1f} s" if "seconds" in entry else ""
        why = f" ({entry['reason']})" if entry.get("reason") else ""
        print(f"device-check: {job.name}: {entry['status']}{why}{seconds}", flush=True)
        report["seconds"] = round(time.monotonic() - start, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def _run_one(job: Job, device: torch.device, smoke: bool, out: Path) -> dict:
    """Run a job; an error is recorded (with its traceback) rather than ending the check: device time is scarce."""
    began = time.monotonic()
    try:
        figures = job.run(device, smoke, out)
        status, extra = "ok", {"figures": figures}
    except Exception as error:  # noqa: BLE001 - every other job still runs
        status, extra = "error", {"reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    return {"status": status, "seconds": round(time.monotonic() - began, 1), **extra}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="device-check", help="folder for device_check.json (and the calibration)")
    parser.add_argument("--limit", type=float, default=LIMIT_S, help=f"seconds for all jobs (default {LIMIT_S})")
    parser.add_argument("--smoke", action="store_true", help="without a GPU: run every job at quick CPU shapes")
    parser.add_argument("--only", action="append", default=None, metavar="JOB",
                        help="run only this job (repeatable): " + ", ".join(job.name for job in JOBS))


def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.only or [] if name not in {job.name for job in JOBS}]
    if unknown:
        raise ValueError(f"only: expected job names among {', '.join(job.name for job in JOBS)}, got {unknown}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = run_jobs(device, args.smoke, Path(args.out), args.limit, args.only)
    statuses = [entry["status"] for entry in report["jobs"].values()]
    print(f"device-check: {statuses.count('ok')} ok, {statuses.count('error')} errors, {statuses.count('skipped')} "
          f"skipped in {report.get('seconds', 0.0):.0f} s; wrote {Path(args.out) / 'device_check.json'}")
    return 1 if "error" in statuses else 0
