"""SIGKILL one of two torchrun ranks mid-run: the job ends with an error naming the killed rank (no hang),
then resuming continues from the last checkpoint, losing at most one checkpoint interval. For
``kdfast pretrain`` (``--resume``) and for ``DistillationTrainer`` (``resume_from_checkpoint``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_fixtures import kdfast_env, pretrain_args, train_steps

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "distil_many_devices.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
DEADLINE_S = 300


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=``rank`` (a child of the launcher)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {launcher.pid}")


def kill_rank_when(launcher: subprocess.Popen, ready, rank: int = 1) -> str:
    """SIGKILL worker ``rank`` once ``ready()``; returns torchrun's stderr after it ended (bounded)."""
    deadline = time.time() + DEADLINE_S
    while time.time() < deadline and launcher.poll() is None and not ready():
        time.sleep(0.1)
    assert launcher.poll() is None, "the run ended before a rank could be killed: " + launcher.stderr.read()[-3000:]
    os.kill(rank_pid(launcher, rank), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)                     # ends, does not hang
    assert launcher.returncode != 0
    assert f"rank      : {rank}" in stderr and "SIGKILL" in stderr, stderr[-3000:]
    return stderr


def checkpoint_steps(folder: Path, prefix: str, digits: slice) -> list[int]:
    return sorted(int(p.name[digits]) for p in folder.iterdir() if p.name.startswith(prefix)) if folder.is_dir() else []


@pytest.mark.slow
def test_pretrain_rank_killed_ends_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TORCHRUN, "-m", "kdfast", *pretrain_args(tmp_path, run_dir, f"{60 * 8 * 32}tok", "device=cpu",
                                                      "train.checkpoint_steps=10", "dist_timeout=60")]
    launcher = subprocess.Popen(args, cwd=tmp_path, env=kdfast_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    kill_rank_when(launcher, lambda: len(train_steps(run_dir)) >= 25)
    killed_at = train_steps(run_dir)[-1]["step"]
    assert not (run_dir / "summary.json").exists()
    assert killed_at - checkpoint_steps(run_dir / "checkpoints", "step-", slice(5, 14))[-1] <= 10 + 1

    done = subprocess.run(args + ["--resume"], cwd=tmp_path, env=kdfast_env(), capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tokens"] == 60 * 8 * 32
    assert [r["step"] for r in train_steps(run_dir)] == list(range(1, 61))


@pytest.mark.slow
def test_distillation_trainer_rank_killed_ends_then_resumes(tmp_path):
    out = tmp_path / "ckpt"
    args = [*TORCHRUN, str(EXAMPLE), "--steps", "60", "--save-steps", "10", "--out", str(out)]
    env = {**kdfast_env(), "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    kill_rank_when(launcher, lambda: len(checkpoint_steps(out, "checkpoint-", slice(11, None))) >= 2)
    saved = checkpoint_steps(out, "checkpoint-", slice(11, None))
    assert saved[-1] < 60 and not (out / "losses.json").exists()

    done = subprocess.run(args + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert len(json.loads((out / "losses.json").read_text())) == 60     # the curve continues from the checkpoint
