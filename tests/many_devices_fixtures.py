"""Helpers of the many-devices tests (DDP, FSDP2, ZeRO-3 and the docs' commands): the docs' launch commands
and how to run them, one process's reference training and the parameter comparison."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import parallel_worker as worker
import pytest
import torch

WORLD = 2
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "losses.md"
BLOCK = re.compile(r"^<!-- many-devices -->\n```bash\n(.*?)^```", re.S | re.M)
TIMEOUT_S = 300


def commands() -> list[str]:
    (block,) = BLOCK.findall(DOC.read_text())
    return [line for line in block.splitlines() if line.strip()]


def out_dir(command: str) -> str:
    words = shlex.split(command)
    return words[words.index("--out") + 1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder where ``examples/`` is the repository's; the commands write their runs/ there."""
    folder = tmp_path_factory.mktemp("many-devices")
    (folder / "examples").symlink_to(REPO / "examples")
    return folder


def run(command: str, cwd: Path) -> None:
    """The command as a user types it, with this Python's scripts (torchrun, accelerate) first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(shlex.split(command.replace("python ", f"{sys.executable} ", 1)), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"



def one_process_parameters(name: str, out: Path) -> tuple[dict, dict]:
    """(start, end) parameters of the Trainer case ``name`` in this process."""
    causal, tied, _ = worker.TRAINER_CASES[name]
    start = {n: p.detach().clone() for n, p in worker.models(causal, tied)[0].named_parameters()}
    return start, worker.full_parameters(worker.train_case(name, str(out), world=1))


def assert_same_steps(start: dict, expected: dict, got: dict) -> None:
    """Parameters equal within 1e-5 of the update's size (fp32), parameter by parameter."""
    assert set(got) == set(expected)
    moved = torch.cat([(expected[n] - start[n]).reshape(-1) for n in expected]).norm()
    assert moved > 1e-2
    for name in expected:
        error = (got[name] - expected[name]).norm()
        assert error <= 1e-5 * max(moved, expected[name].norm()), (name, float(error), float(moved))
