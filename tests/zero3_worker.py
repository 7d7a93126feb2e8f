"""Run under ``torchrun --nproc_per_node P tests/zero3_worker.py OUT`` (deepspeed installed), or imported by
tests/test_zero3_distillation.py for the one-process references.

Each case trains a tiny student under DeepSpeed ZeRO-3 (stage 3, every parameter partitioned, SGD, fp32) for
``STEPS`` steps with gradient accumulation over the global batch of tests/parallel_worker.py: in the docs'
custom loop (examples/distil_many_devices.py: ``deepspeed.initialize``, ``distillation_loss``), the teacher
replicated or a ZeRO-3 inference engine, and with ``DistillationTrainer(args=TrainingArguments(deepspeed=
CONFIG))``. Rank 0 saves the final parameters (gathered), the per-step losses, the share of each model a rank
holds, and the error for a model partitioned without hooks.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ only, as parallel_worker.py explains

from distillation_fixtures import examples, stack  # noqa: E402
from parallel_worker import GLOBAL_BATCH, STEPS, TRAINER_CASES, example, models, trainer_args  # noqa: E402

from kdfast.integrations.transformers import DistillationTrainer, distillation_loss  # noqa: E402

TRAINER_ZERO3 = [name for name, (_, _, strategy) in TRAINER_CASES.items() if strategy is None]
TRAINER_CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
                  **{key: "auto" for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                             "gradient_clipping")}}
CASES = {  # name: (causal, tied student, teacher a ZeRO-3 engine)
    "llama-tied": (True, True, False),
    "llama-untied": (True, False, False),
    "llama-untied-zero3-teacher": (True, False, True),
    "bert": (False, True, False),
}


def one_process(name: str) -> tuple[dict, dict, list]:
    """(start, end, per-step losses) of the case in one process with torch's SGD and no DeepSpeed."""
    causal, tied, _ = CASES[name]
    student, teacher = models(causal, tied)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    losses = example.with_loop(student, teacher, examples(STEPS * GLOBAL_BATCH, causal), 0, 1, STEPS, causal=causal)
    return start, {n: p.detach().clone() for n, p in student.named_parameters()}, losses


def held_share(model: torch.nn.Module) -> float:
    """The fraction of ``model``'s parameters this rank holds outside a forward (ZeRO-3: its partitions, 1/P
    plus padding), and 1.0 if any parameter is whole there."""
    if any(p.numel() for p in model.parameters()):
        return 1.0
    return sum(p.ds_tensor.numel() for p in model.parameters()) / sum(p.ds_numel for p in model.parameters())


def zero3_case(name: str, rank: int, world: int) -> tuple[dict, dict]:
    """(end parameters gathered, report: per-step losses and the share of student and teacher this rank
    holds) of the case under ZeRO-3 on ``world`` ranks."""
    import deepspeed

    causal, tied, zero3_teacher = CASES[name]
    student, teacher = models(causal, tied)
    engine = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                  config=example.zero3_config(world))[0]
    if zero3_teacher:
        teacher = deepspeed.initialize(model=teacher, config=example.zero3_config(world, train=False))[0]
    data = examples(STEPS * GLOBAL_BATCH, causal)
    losses = example.with_loop(student, teacher, data, rank, world, STEPS, engine=engine, causal=causal)
    report = {"losses": losses, "student_share": held_share(student), "teacher_share": held_share(teacher),
              "root_external_parameters": len(getattr(student, "_external_params", {}))}
    with deepspeed.zero.GatheredParameters(list(student.parameters())):
        end = {n: p.detach().clone() for n, p in student.named_parameters()}
    return end, report


def trainer_case(name: str, out: str, world: int) -> tuple[dict, dict]:
    """(end parameters gathered, report: the share of the student this rank holds) of the Trainer case ``name``
    of tests/parallel_worker.py with the Trainer's DeepSpeed ZeRO-3."""
    import deepspeed

    causal, tied, _ = TRAINER_CASES[name]
    student, teacher = models(causal, tied)
    trainer = DistillationTrainer(student, trainer_args(out, world, deepspeed=TRAINER_CONFIG), teacher=teacher,
                                  train_dataset=examples(STEPS * GLOBAL_BATCH, causal), temperature=2.0)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine", type(trainer.model_wrapped)
    report = {"student_share": held_share(trainer.model),
              "root_external_parameters": len(getattr(trainer.model, "_external_params", {}))}
    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, report


def module_loss(world: int) -> tuple[float, float]:
    """The loss with the student passed as ``engine.module`` (first), then as the engine (the docs allow both)."""
    import deepspeed

    student, teacher = models(causal=True, tied=False)
    engine = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                  config=example.zero3_config(world))[0]
    batch = stack(examples(2, causal=True))
    return tuple(distillation_loss(model, teacher, batch).loss.item() for model in (engine.module, engine))


def unhooked_error(world: int) -> str:
    """The error for a student partitioned by ``deepspeed.zero.Init`` alone (no engine, so no hooks)."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=example.zero3_config(world)):
        student = models(causal=True, tied=False)[0]
    teacher = models(causal=True, tied=True)[1]
    try:
        distillation_loss(student, teacher, stack(examples(2, causal=True)))
    except ValueError as error:
        return str(error)
    return "no error"


def main(out: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {name: zero3_case(name, rank, world) for name in CASES}
    for name in TRAINER_ZERO3:
        results[f"trainer-{name}"] = trainer_case(name, str(out / name), world)
    report = {name: case_report for name, (_, case_report) in results.items()}
    report["unhooked"] = unhooked_error(world)
    report["module_and_engine_loss"] = module_loss(world)
    if rank == 0:
        torch.save({name: end for name, (end, _) in results.items()}, out / "parameters.pt")
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
