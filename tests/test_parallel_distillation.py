"""DistillationTrainer and distillation_loss on 2 real processes (gloo on CPU, torchrun): after 3 SGD
steps with gradient accumulation the student equals one process's on the same global batch, under DDP and
FSDP2; a sharded teacher holds 1/P of its parameters per rank and gives the replicated teacher's loss;
a student sharded without the model around its head is refused before any step."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import parallel_worker as worker
import pytest
import torch
from many_devices_fixtures import WORLD, assert_same_steps, one_process_parameters

TIMEOUT_S = 420
WORKER = Path(worker.__file__)


def torchrun(*args: str, cwd: Path, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` with a wall-clock limit; its output is shown on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    """``parallel_run(engine)``: (parameters per case, report) of one 2-rank run of every case under
    ``engine`` (ddp | fsdp2), launched once per module."""
    runs = {}

    def run(engine: str) -> tuple[dict, dict]:
        if engine not in runs:
            out = tmp_path_factory.mktemp(engine)
            torchrun(str(WORKER), engine, str(out), cwd=out)
            runs[engine] = torch.load(out / "parameters.pt"), json.loads((out / "report.json").read_text())
        return runs[engine]

    return run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``one_process(name)``: (start, end) parameters of the Trainer case ``name`` in this process, trained
    once per module (the DDP and the FSDP2 run are compared with the same one)."""
    runs = {}

    def run(name: str) -> tuple[dict, dict]:
        if name not in runs:
            runs[name] = one_process_parameters(name, tmp_path_factory.mktemp(name))
        return runs[name]

    return run


@functools.lru_cache(maxsize=None)
def one_process_loop() -> tuple[dict, dict, list]:
    """(start, end, per-step losses) of the custom loop in this process."""
    start = {n: p.detach().clone() for n, p in worker.models(causal=True, tied=False)[0].named_parameters()}
    model, losses = worker.loop_case(rank=0, world=1, shard_teacher=False, head_unit=False)
    return start, worker.full_parameters(model), losses


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", list(worker.TRAINER_CASES))
def test_trainer_on_two_ranks_equals_one_process(parallel_run, one_process, engine, name):
    parameters, _ = parallel_run(engine)
    start, expected = one_process(name)
    assert_same_steps(start, expected, parameters[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["loop-sharded-teacher", "loop-head-unit"])
def test_fully_shard_custom_loop_equals_one_process(parallel_run, name):
    """distillation_loss in a loop: student sharded (head in the root unit, or a unit of its own),
    teacher sharded or replicated; the same steps and per-step losses as one process."""
    parameters, report = parallel_run("fsdp2")
    start, expected, losses = one_process_loop()
    assert_same_steps(start, expected, parameters[name])
    assert report[f"{name}-losses"] == pytest.approx(losses, rel=1e-5)


@pytest.mark.slow
def test_sharded_teacher_holds_its_share_and_gives_the_replicated_loss(parallel_run):
    for rank in parallel_run("fsdp2")[1]["teacher"]:
        assert rank["share"] == pytest.approx(1 / WORLD, abs=0.02), rank
        assert rank["sharded"] == pytest.approx(rank["replicated"], rel=1e-6), rank


@pytest.mark.slow
def test_bad_fsdp_layouts_are_refused_with_how_to_wrap(parallel_run):
    messages = parallel_run("fsdp2")[1]["bad_layout"]
    assert messages["no_root"].startswith("student: expected fully_shard applied to the whole model"), messages
    assert "fully_shard(model)" in messages["no_root"] and "fully_shard_model" in messages["no_root"]
    assert messages["layer_units"].startswith("model: expected one FSDP unit for the whole model"), messages
    assert "layers=False" in messages["layer_units"]
