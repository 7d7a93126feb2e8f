"""Every command of docs/losses.md "Many devices" runs as written (2 CPU processes) and logs the losses of
the one-process run: a new user following them gets the same loss curve."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_section_has_the_launchers_and_engines():
    text = "\n".join(commands())
    assert commands()[0].startswith("python ")
    for needle in ("torchrun --nproc_per_node 2", "accelerate launch --num_processes 2", "--fsdp2", "--use_fsdp",
                   "--loop"):
        assert needle in text


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(commands())))
def test_command_gives_the_one_process_losses(index, workdir):
    reference = workdir / out_dir(commands()[0]) / "losses.json"
    if not reference.is_file():
        run(commands()[0], workdir)
    if index:
        run(commands()[index], workdir)
    expected = json.loads(reference.read_text())
    got = json.loads((workdir / out_dir(commands()[index]) / "losses.json").read_text())
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0]
