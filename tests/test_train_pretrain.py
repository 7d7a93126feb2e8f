"""A pretraining run killed with SIGKILL resumes to the same total budget; two torchrun ranks (gloo)
stop on the same step."""
import json
import signal
import subprocess
import sys
import time

import pytest
from trainer_fixtures import kdfast_env, pretrain_args, train_steps


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_budget_and_continues_the_curve(tmp_path):
    run_dir = tmp_path / "run"
    budget_tokens = 120 * 8 * 32                               # 120 steps of 8 x 32 tokens
    args = [sys.executable, "-m", "kdfast", *pretrain_args(tmp_path, run_dir, f"{budget_tokens}tok",
                                                           "train.checkpoint_steps=10")]
    proc = subprocess.Popen(args, cwd=tmp_path, env=kdfast_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(train_steps(run_dir)) >= 25:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = train_steps(run_dir)[-1]["step"]
    assert not (run_dir / "summary.json").exists()
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    last_checkpoint = int(saved[-1][5:14])
    assert killed_at - last_checkpoint <= 10 + 1               # at most one checkpoint interval lost

    done = subprocess.run(args + ["--resume"], cwd=tmp_path, env=kdfast_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens"] == budget_tokens and summary["budget_used"] == budget_tokens and summary["steps"] == 120
    steps = [r["step"] for r in train_steps(run_dir)]
    assert steps == list(range(1, 121))                        # every step once: the curve continues
    evals = summary["curve"]
    assert [e["step"] for e in evals] == sorted(e["step"] for e in evals) and evals[-1]["step"] == 120
    assert evals[-1]["heldout_mlm_loss"] < evals[0]["heldout_mlm_loss"] - 0.2


@pytest.mark.slow
def test_torchrun_ranks_stop_on_the_same_step(tmp_path):
    run_dir = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdfast",
            *pretrain_args(tmp_path, run_dir, "4s", "device=cpu")]      # 4 device-seconds over 2 ranks
    done = subprocess.run(args, cwd=tmp_path, env=kdfast_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((run_dir / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["steps"] >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == ranks[0]["steps"] and summary["tokens"] == ranks[0]["steps"] * 8 * 32
    assert abs(summary["budget_used"] - 4.0) < 2 * summary["budget_used"] / summary["steps"]   # within a step
