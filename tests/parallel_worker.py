"""Run under ``torchrun --nproc_per_node P tests/parallel_worker.py ENGINE OUT`` (ENGINE: ddp | fsdp2), or
imported by tests/test_parallel_distillation.py for the one-process references.

Every case trains a tiny student for ``STEPS`` SGD steps with gradient accumulation on a global batch of
``GLOBAL_BATCH`` examples: ``DistillationTrainer`` (the Trainer's DDP, or accelerate's FSDP2 path) and, for
FSDP2, a custom loop over ``fully_shard`` + ``distillation_loss``. Rank 0 saves the final parameters.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# tests/ and examples/ only: the checkout's root would shadow the installed kdfast (with its compiled
# extensions) here and in every process spawned later from a pytest that imported this module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import distil_many_devices as example  # noqa: E402
from distillation_fixtures import examples, stack, tiny_bert, tiny_llama  # noqa: E402

from kdfast.integrations.transformers import DistillationTrainer, distillation_loss  # noqa: E402
from kdfast.integrations.wrapped import fully_shard_model, is_sharded  # noqa: E402

STEPS, MICRO, LR, GLOBAL_BATCH = 3, 2, 0.5, example.GLOBAL_BATCH  # LR: the example loop's
TRAINER_CASES = {  # name: (causal, tied student, strategy)
    "llama-tied": (True, True, None),
    "llama-untied": (True, False, None),
    "bert": (False, True, None),
    "bert-minilm_v2": (False, True, "minilm_v2"),
}


def models(causal: bool, tied: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher), the same weights in every process."""
    torch.manual_seed(0)
    if causal:
        return tiny_llama(16, tied=tied), tiny_llama(24, tied=not tied)
    return tiny_bert(16), tiny_bert(24)


def trainer_args(out: str, world: int, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, report_to=[], use_cpu=True, max_steps=STEPS,
                             per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=GLOBAL_BATCH // (MICRO * world), learning_rate=LR,
                             optim="sgd", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
                             lr_scheduler_type="constant", save_strategy="no", seed=0, remove_unused_columns=False,
                             disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential",
                             logging_steps=1, **extra)


def use_fsdp2_on_cpu(trainer: DistillationTrainer) -> None:
    """accelerate (1.16, state.py) turns FSDP on only for GPU-like backends and runs the Trainer's
    ``fsdp`` option as DDP on CPU. For the test, the same accelerate FSDP2 path a GPU run takes is
    switched on by hand; this changes nothing in how accelerate shards the model."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def train_case(name: str, out: str, world: int, engine: str = "ddp") -> torch.nn.Module:
    """The Trainer case ``name`` on ``world`` processes (this one among them); returns the model."""
    causal, tied, strategy = TRAINER_CASES[name]
    student, teacher = models(causal, tied)
    extra = {"fsdp": True, "fsdp_config": {"version": 2}} if engine == "fsdp2" else {}
    if engine == "fsdp2" and not causal:
        # accelerate 1.16 puts BERT's decoder in a unit apart from cls.predictions.bias, the same tensor as the
        # decoder's bias, which torch 2.13 refuses: the student comes sharded, and accelerate keeps it as it is.
        # Strategies call the layers' projections, not the layers: the student is then one unit.
        fully_shard_model(student, layers=strategy is None)
    trainer = DistillationTrainer(student, trainer_args(out, world, **extra), teacher=teacher,
                                  train_dataset=examples(STEPS * GLOBAL_BATCH, causal), temperature=2.0,
                                  strategy=strategy)
    if engine == "fsdp2":
        use_fsdp2_on_cpu(trainer)
    trainer.train()
    return trainer.model


def full_parameters(model: torch.nn.Module) -> dict:
    """Every parameter's full value (FSDP2's DTensors gathered: all ranks must call this)."""
    return {n: (p.full_tensor() if is_sharded(p) else p).detach().clone() for n, p in model.named_parameters()}


def loop_case(rank: int, world: int, shard_teacher: bool, head_unit: bool) -> tuple[torch.nn.Module, list]:
    """The docs' custom loop (examples/distil_many_devices.py) on a tiny untied Llama; with ``world`` > 1
    the student is sharded by ``fully_shard_model`` (``head_unit``: the LM head an FSDP unit of its own),
    the teacher too when ``shard_teacher``."""
    from torch.distributed.fsdp import fully_shard

    student, teacher = models(causal=True, tied=False)
    if world > 1:
        if head_unit:
            fully_shard(student.lm_head)
        fully_shard_model(student)
        if shard_teacher:
            fully_shard_model(teacher)
    losses = example.with_loop(student, teacher, examples(STEPS * GLOBAL_BATCH, causal=True), rank, world, STEPS)
    return student, losses


def teacher_share_and_loss(rank: int, world: int) -> dict:
    """The fraction of the teacher's parameters this rank holds once sharded (measured on the local
    shards after a loss), and the loss with it against the replicated teacher's."""
    student, teacher = models(causal=True, tied=False)
    batch = stack(examples(2 * world, causal=True)[2 * rank:2 * rank + 2])
    replicated = distillation_loss(student, teacher, batch, temperature=2.0).loss.item()
    total = sum(p.numel() for p in teacher.parameters())
    fully_shard_model(teacher)
    sharded = distillation_loss(student, teacher, batch, temperature=2.0).loss.item()
    local = sum((p.to_local() if is_sharded(p) else p).numel() for p in teacher.parameters())
    return {"rank": rank, "share": local / total, "replicated": replicated, "sharded": sharded}


def bad_layout_messages() -> dict:
    """The errors for a student whose layers are sharded but not the model around its LM head, and for
    a strategy's student sharded layer by layer."""
    from torch.distributed.fsdp import fully_shard

    from kdfast.integrations.wrapped import check_one_unit

    student, teacher = models(causal=True, tied=False)
    for layer in student.model.layers:
        fully_shard(layer)
    messages = {"no_root": "no error", "layer_units": "no error"}
    try:
        distillation_loss(student, teacher, stack(examples(2, causal=True)))
    except ValueError as error:
        messages["no_root"] = str(error)
    try:
        check_one_unit(fully_shard_model(models(causal=False, tied=True)[0]), "model", "strategies")
    except ValueError as error:
        messages["layer_units"] = str(error)
    return messages


def main(engine: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results, report = {}, {}
    for name in TRAINER_CASES:
        model = train_case(name, str(out / name), world, engine)
        results[name] = full_parameters(model)
    if engine == "fsdp2":
        for name, options in {"loop-sharded-teacher": dict(shard_teacher=True, head_unit=False),
                              "loop-head-unit": dict(shard_teacher=False, head_unit=True)}.items():
            model, losses = loop_case(rank, world, **options)
            results[name] = full_parameters(model)
            report[f"{name}-losses"] = losses
        shares = [None] * world
        dist.all_gather_object(shares, teacher_share_and_loss(rank, world))
        report["teacher"] = shares
        report["bad_layout"] = bad_layout_messages()
    if rank == 0:
        torch.save(results, out / "parameters.pt")
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1], Path(sys.argv[2]))
