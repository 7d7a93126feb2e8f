"""Distil a tiny Llama into a smaller one on one or many processes: the commands of docs/losses.md,
"Many devices". The global batch (8 sequences per step, 2 accumulated micro-batches) is the same for any
number of processes, so every launch gives the same losses. Rank 0 writes them to OUT/losses.json.

    python examples/distil_many_devices.py --out runs/one                           # one process
    torchrun --nproc_per_node 2 examples/distil_many_devices.py --out runs/ddp      # DistillationTrainer, DDP
    torchrun --nproc_per_node 2 examples/distil_many_devices.py --fsdp2 --out runs/fsdp2
    torchrun --nproc_per_node 2 examples/distil_many_devices.py --loop --out runs/loop   # fully_shard + loop
    torchrun --nproc_per_node 2 examples/distil_many_devices.py --zero3 --out runs/zero3 # DeepSpeed ZeRO-3 + loop
    torchrun --nproc_per_node 2 examples/distil_many_devices.py --steps 60 --save-steps 10 --out runs/ckpt [--resume]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from kdfast.integrations.transformers import DistillationTrainer, count_targets, distillation_loss
from kdfast.integrations.wrapped import fully_shard_model, is_sharded

GLOBAL_BATCH, ACCUMULATION, LENGTH, VOCAB = 8, 2, 16, 128


def llama(width: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))


def sequences(count: int) -> list[dict]:
    """Random token sequences, every fourth right-padded; the labels are the tokens (the model shifts them)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=generator)
        mask = torch.ones(LENGTH, dtype=torch.long)
        mask[LENGTH - 4 * (i % 4 == 3):] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def with_trainer(student, teacher, data, out: Path, world: int, steps: int, fsdp2: bool, save_steps: int,
                 resume: bool) -> list[float]:
    """DistillationTrainer: DDP under torchrun / accelerate launch, FSDP2 with ``fsdp2``; a checkpoint every
    ``save_steps`` steps (0: none), ``resume`` from the newest one in ``out``."""
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2}} if fsdp2 else {}
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=GLOBAL_BATCH // (ACCUMULATION * world),
                             gradient_accumulation_steps=ACCUMULATION, max_steps=steps, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", train_sampling_strategy="sequential",
                             logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                             ddp_timeout=120, **saving, **fsdp)
    trainer = DistillationTrainer(student, args, teacher=teacher, train_dataset=data, temperature=2.0)
    trainer.train(resume_from_checkpoint=resume or None)
    engine = ("FSDP2" if any(is_sharded(p) for p in trainer.model.parameters()) else
              type(trainer.model_wrapped).__name__)
    print(f"rank {trainer.args.process_index}: student trained under {engine}")
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def zero3_config(world: int, train: bool = True) -> dict:
    """DeepSpeed ZeRO-3 (fp32, every parameter partitioned) for the loop's batches; SGD when ``train``, else
    a configuration for an inference engine (the teacher)."""
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // (ACCUMULATION * world),
              "gradient_accumulation_steps": ACCUMULATION, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if train:
        config.update(optimizer={"type": "SGD", "params": {"lr": 0.5}}, zero_allow_untested_optimizer=True)
    return config


def with_loop(student, teacher, data, rank: int, world: int, steps: int, engine=None,
              causal: bool = True) -> list[float]:
    """A custom loop of SGD steps over ``data`` (a list of examples), this rank's share of each global batch.
    ``engine``: the DeepSpeed engine around ``student``, which then runs the backward and the SGD steps;
    ``causal``: False for masked LMs (their targets are counted unshifted)."""
    optimizer = None if engine is not None else torch.optim.SGD(student.parameters(), lr=0.5)
    micro = GLOBAL_BATCH // (ACCUMULATION * world)
    losses = []
    for step in range(steps):
        mine = data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH][rank * micro * ACCUMULATION:]
        batches = [{k: torch.stack([e[k] for e in mine[i:i + micro]]) for k in mine[0]}
                   for i in range(0, micro * ACCUMULATION, micro)]
        num_items = count_targets(batches, causal)  # summed over ranks
        total = torch.zeros(())
        for batch in batches:
            loss = distillation_loss(student if engine is None else engine, teacher, batch, temperature=2.0,
                                     num_items_in_batch=num_items).loss
            if engine is None:
                (loss * world).backward()                # DDP and FSDP average gradients over ranks
            else:
                engine.backward(loss * world, scale_wrt_gas=False)  # so does DeepSpeed; no 1/accumulation
                engine.step()                            # an SGD step at the end of the accumulation
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return losses


def with_zero3(student, teacher, data, rank: int, world: int, steps: int) -> list[float]:
    """The custom loop under DeepSpeed ZeRO-3: student and teacher partitioned, 1/P of each per rank."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    engine = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=zero3_config(world))[0]
    teacher = deepspeed.initialize(model=teacher, config=zero3_config(world, train=False))[0]
    return with_loop(student, teacher, data, rank, world, steps, engine=engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fsdp2", action="store_true", help="the Trainer's FSDP2 (accelerate's FSDP plugin)")
    parser.add_argument("--loop", action="store_true", help="a custom loop over fully_shard + distillation_loss")
    parser.add_argument("--zero3", action="store_true", help="a custom loop under DeepSpeed ZeRO-3 (needs deepspeed)")
    parser.add_argument("--save-steps", type=int, default=0, help="Trainer: a checkpoint every N steps in --out")
    parser.add_argument("--resume", action="store_true", help="Trainer: continue from the newest checkpoint")
    args = parser.parse_args()
    out = Path(args.out)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    teacher, student = llama(64), llama(32)
    data = sequences(GLOBAL_BATCH) * args.steps   # the same 8 sequences every step: the loss goes down
    if args.zero3:
        losses = with_zero3(student, teacher, data, rank, world, args.steps)
    elif args.loop:
        if world > 1:
            dist.init_process_group("gloo")  # this example runs on CPU
            fully_shard_model(student)       # FSDP2: fully_shard on each layer, then on the model
            fully_shard_model(teacher)       # the teacher too: 1/P of it per rank
        losses = with_loop(student, teacher, data, rank, world, args.steps)
    else:
        losses = with_trainer(student, teacher, data, out, world, args.steps, args.fsdp2, args.save_steps, args.resume)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(losses))
        print("losses", " ".join(f"{loss:.6f}" for loss in losses))
    if dist.is_initialized():
        dist.destroy_process_group()  # before exit: a live gloo group can abort the process at teardown


if __name__ == "__main__":
    main()
