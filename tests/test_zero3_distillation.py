"""distillation_loss and DistillationTrainer under DeepSpeed ZeRO-3 on 2 real processes (gloo on CPU, torchrun;
``deepspeed.initialize`` with stage 3 in a custom loop, or the Trainer's ``deepspeed=`` config): after 3 SGD steps
with gradient accumulation the student equals one process's on the same global batch, for a tiny Llama (tied and
untied heads; in the loop the teacher replicated or a ZeRO-3 engine) and a tiny BERT; the docs' ZeRO-3 command
gives the one-process losses; partitioned models without the engine's hooks are refused.

CI does not install deepspeed: the 2-rank tests skip there (and wherever deepspeed's CPU collective is not
built yet), the refusals run everywhere."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import many_devices_fixtures as docs
import parallel_worker as worker
import pytest
import torch
import torch.utils.cpp_extension
import zero3_worker
from many_devices_fixtures import WORLD, assert_same_steps, one_process_parameters

import kdfast

TIMEOUT_S = 300
DOC_BLOCK = docs.BLOCK.pattern.replace("many-devices", "many-devices deepspeed")
workdir = docs.workdir  # the fixture: a folder whose examples/ is the repository's


def shm_comm_built() -> bool:
    """deepspeed's CPU collective (``deepspeed_shm_comm``, built by ``deepspeed.init_distributed`` on first use)
    is in torch's extension cache: a JIT build took 21 min on this 2-core machine, too long for a test."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())
    flavour = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    folder = root / f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{flavour}"
    return (folder / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()


def deepspeed_skip_reason() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return ("deepspeed is not installed (CI does not install it; pip install deepspeed into a venv with this torch "
                "to run the ZeRO-3 tests)")
    if torch.version.cuda is None and not shm_comm_built():
        return ("deepspeed's CPU collective deepspeed_shm_comm is not built: the first deepspeed.init_distributed on "
                "CPU JIT-builds it into torch's extension cache (21 min on 2 shared cores), too long for a test")
    return None


needs_deepspeed = pytest.mark.skipif(deepspeed_skip_reason() is not None, reason=str(deepspeed_skip_reason()))


def environment() -> dict:
    """This process's environment for the ranks: the kdfast imported here first on the path, one thread each."""
    root = str(Path(kdfast.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def run_zero3_worker(out: Path) -> tuple[dict, dict]:
    """(parameters per case, report) of one 2-rank run of tests/zero3_worker.py writing to ``out``."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD)]
    run([*torchrun, zero3_worker.__file__, str(out)], cwd=out)
    return torch.load(out / "parameters.pt"), json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> tuple[dict, dict]:
    return run_zero3_worker(tmp_path_factory.mktemp("zero3"))


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(zero3_worker.CASES))
def test_zero3_on_two_ranks_equals_one_process(zero3_run, name):
    parameters, report = zero3_run
    start, expected, losses = zero3_worker.one_process(name)
    assert_same_steps(start, expected, parameters[name])
    assert report[name]["losses"] == pytest.approx(losses, rel=1e-5)
    assert report[name]["student_share"] == pytest.approx(1 / WORLD, abs=0.02)  # partitioned, head included
    zero3_teacher = zero3_worker.CASES[name][2]
    assert report[name]["teacher_share"] == pytest.approx(1 / WORLD if zero3_teacher else 1.0, abs=0.02)
    # the head was gathered by its own module's hooks, not by DeepSpeed's discovery of parameters read elsewhere
    assert report[name]["root_external_parameters"] == 0


@needs_deepspeed
@pytest.mark.slow
def test_zero3_student_passed_as_its_module_gives_the_engines_loss(zero3_run):
    through_module, through_engine = zero3_run[1]["module_and_engine_loss"]
    assert through_module == pytest.approx(through_engine, rel=1e-6)


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("name", zero3_worker.TRAINER_ZERO3)
def test_trainer_with_deepspeed_zero3_on_two_ranks_equals_one_process(zero3_run, name, tmp_path):
    """DistillationTrainer with TrainingArguments(deepspeed=ZeRO-3 config), on CPU: the Trainer's engine."""
    parameters, report = zero3_run
    start, expected = one_process_parameters(name, tmp_path)
    assert_same_steps(start, expected, parameters[f"trainer-{name}"])
    assert report[f"trainer-{name}"]["student_share"] == pytest.approx(1 / WORLD, abs=0.02)
    assert report[f"trainer-{name}"]["root_external_parameters"] == 0


@needs_deepspeed
@pytest.mark.slow
def test_zero3_init_without_engine_is_refused(zero3_run):
    message = zero3_run[1]["unhooked"]
    assert message.startswith("student: expected a DeepSpeed ZeRO-3 model hooked by its engine"), message
    assert "deepspeed.initialize" in message


def doc_commands() -> list[str]:
    (block,) = re.findall(DOC_BLOCK, docs.DOC.read_text(), re.S | re.M)
    return [line for line in block.splitlines() if line.strip()]


def test_the_docs_have_the_zero3_command():
    (command,) = doc_commands()
    assert command.startswith("torchrun --nproc_per_node 2 ") and "--zero3" in command


@needs_deepspeed
@pytest.mark.slow
def test_docs_zero3_command_gives_the_one_process_losses(workdir):
    """The docs' command, with ``torchrun`` run as ``python -m torch.distributed.run`` of this Python (the
    same entry point; a venv whose torch comes from another one has no torchrun script of its own)."""
    reference = workdir / docs.out_dir(docs.commands()[0]) / "losses.json"
    if not reference.is_file():
        docs.run(docs.commands()[0], workdir)
    (command,) = doc_commands()
    words = shlex.split(command)
    run([sys.executable, "-m", "torch.distributed.run", *words[1:]], cwd=workdir)
    got = json.loads((workdir / docs.out_dir(command) / "losses.json").read_text())
    assert got == pytest.approx(json.loads(reference.read_text()), rel=1e-4)


def test_partitioned_student_without_hooks_is_refused():
    student, teacher = worker.models(causal=True, tied=False)
    student.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ValueError, match=r"^student: expected a DeepSpeed ZeRO-3 model hooked by its engine.*"
                                         r"'lm_head.weight'.*on the model; pass the engine deepspeed.initialize"):
        worker.distillation_loss(student, teacher, worker.stack(worker.examples(2, causal=True)))


def test_partitioned_teacher_whose_head_is_not_hooked_is_refused():
    student, teacher = worker.models(causal=True, tied=False)
    teacher.model.norm.weight.ds_id = 0
    teacher.ds_id = 0  # the engine hooked the root but not the LM head module
    with pytest.raises(ValueError, match=r"^teacher: expected a DeepSpeed ZeRO-3 model hooked.*on the LM head module"):
        worker.distillation_loss(student, teacher, worker.stack(worker.examples(2, causal=True)))


def test_strategy_under_zero3_is_refused(tmp_path):
    from test_integrations_transformers import make_trainer

    student, teacher = worker.models(causal=False, tied=True)
    data = worker.examples(2, causal=False)
    trainer = make_trainer(tmp_path, student, teacher, data, steps=1, batch=2, strategy="minilm_v2")
    student.bert.encoder.layer[0].output.dense.weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks partitioned parameters
    with pytest.raises(ValueError, match=r"^model: expected no DeepSpeed ZeRO-3 partitioning with "
                                         r"strategy='minilm_v2'.*'bert.encoder.layer.0.output.dense.weight'"):
        trainer.compute_loss(student, worker.stack(data))
