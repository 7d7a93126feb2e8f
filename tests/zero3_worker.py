"""Run under ``torchrun --nproc_per_node P tests/zero3_worker.py OUT`` with ``DS_ACCELERATOR=cpu``, or imported by
tests/test_zero3_distillation.py for the one-process references.

Each case trains a tiny student under DeepSpeed ZeRO-3 (``deepspeed.initialize``, stage 3, every parameter
partitioned, SGD, fp32) for ``STEPS`` steps with gradient accumulation over the global batch of
tests/parallel_worker.py, through ``distillation_loss`` in a custom loop; the teacher is replicated or a
ZeRO-3 inference engine. Rank 0 saves the final parameters (gathered) and the per-step losses.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ only, as parallel_worker.py explains

from parallel_worker import GLOBAL_BATCH, LR, MICRO, STEPS, models  # noqa: E402
from test_integrations_transformers import examples, stack  # noqa: E402

from kdfast.integrations.transformers import count_targets, distillation_loss  # noqa: E402

CASES = {  # name: (causal, tied student, teacher a ZeRO-3 engine)
    "llama-tied": (True, True, False),
    "llama-untied": (True, False, False),
    "llama-untied-zero3-teacher": (True, False, True),
    "bert": (False, True, False),
}


def zero3_config(world: int, train: bool = True) -> dict:
    """Stage 3 with every parameter partitioned (no persistence threshold), fp32; SGD for the student."""
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * world),
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if train:
        config.update(optimizer={"type": "SGD", "params": {"lr": LR}}, zero_allow_untested_optimizer=True)
    return config


def micro_batches(data: list, step: int, rank: int, world: int) -> list[dict]:
    """This rank's accumulated micro-batches of global step ``step``: the same split as the DDP/FSDP2 loop
    (examples/distil_many_devices.py), so every world size sees the same global batch."""
    micro = GLOBAL_BATCH // (2 * world)
    mine = data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH][rank * 2 * micro:(rank + 1) * 2 * micro]
    return [stack(mine[i:i + micro]) for i in (0, micro)]


def one_process(name: str) -> tuple[dict, dict, list]:
    """(start, end, per-step losses) of the case in one process with torch's SGD and no DeepSpeed."""
    causal, tied, _ = CASES[name]
    student, teacher = models(causal, tied)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    data, losses = examples(STEPS * GLOBAL_BATCH, causal), []
    for step in range(STEPS):
        batches = micro_batches(data, step, 0, 1)
        num_items = count_targets(batches, causal)
        total = 0.0
        for batch in batches:
            loss = distillation_loss(student, teacher, batch, temperature=2.0, num_items_in_batch=num_items).loss
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return start, {n: p.detach().clone() for n, p in student.named_parameters()}, losses


def zero3_case(name: str, rank: int, world: int) -> tuple[dict, dict]:
    """(end parameters gathered, report: per-step losses and the shares of student and teacher this rank
    holds) of the case under ZeRO-3 on ``world`` ranks."""
    import deepspeed
    import torch.distributed as dist

    causal, tied, zero3_teacher = CASES[name]
    student, teacher = models(causal, tied)
    engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                      config=zero3_config(world))
    if zero3_teacher:
        teacher = deepspeed.initialize(model=teacher, config=zero3_config(world, train=False))[0]
    data, losses = examples(STEPS * GLOBAL_BATCH, causal), []
    for step in range(STEPS):
        batches = micro_batches(data, step, rank, world)
        num_items = count_targets(batches, causal)  # summed over ranks
        total = torch.zeros(())
        for batch in batches:
            loss = distillation_loss(engine, teacher, batch, temperature=2.0, num_items_in_batch=num_items).loss
            engine.backward(loss * world, scale_wrt_gas=False)  # ZeRO averages gradients over ranks
            engine.step()                                       # an SGD step once per accumulation
            total += loss.detach()
        dist.all_reduce(total)
        losses.append(total.item())
    report = {"losses": losses, "student_share": held_share(student), "teacher_share": held_share(teacher)}
    with deepspeed.zero.GatheredParameters(list(student.parameters())):
        end = {n: p.detach().clone() for n, p in student.named_parameters()}
    return end, report


def held_share(model: torch.nn.Module) -> float:
    """The fraction of ``model``'s parameters this rank holds outside a forward (ZeRO-3: its partitions, 1/P
    plus padding), and 1.0 if any parameter is still whole there."""
    if any(p.numel() for p in model.parameters()):
        return 1.0
    return sum(p.ds_tensor.numel() for p in model.parameters()) / sum(p.ds_numel for p in model.parameters())


def main(out: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in CASES:
        results[name] = zero3_case(name, rank, world)
    if rank == 0:
        torch.save({name: end for name, (end, _) in results.items()}, out / "parameters.pt")
        (out / "report.json").write_text(json.dumps({name: report for name, (_, report) in results.items()}))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
