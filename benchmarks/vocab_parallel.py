"""Vocabulary-parallel fused KD: bytes communicated per call (by collective) and time per call, against the
single-device op on the whole heads. Run under torchrun; rank 0 prints one JSON line per shape and writes
``--json``:

    torchrun --nproc_per_node 2 benchmarks/vocab_parallel.py --json benchmarks/results/vocab_parallel_cpu.json

Each shape: KD at T = 2 with the MLM cross-entropy (every row labelled), forward + backward. ``ms`` is the
median over ``--repeats`` calls of the sharded op (every rank at once); ``ms_unsharded`` the single-device op
on rank 0 alone (the other ranks wait), on the same machine: with P ranks sharing its cores, the ratio says
little about P devices. ``max_rel_err``: loss and gradients (d hidden on rank 0, its head shard) against the
single-device op.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import kdfast
from kdfast.functions.vocab_parallel import record_traffic


def shard_rows(vocab: int, world: int, rank: int) -> slice:
    start = sum(vocab // world + (r < vocab % world) for r in range(rank))
    return slice(start, start + vocab // world + (rank < vocab % world))


def call(inputs: dict, kind: str, process_group=None) -> tuple:
    hidden = inputs["student_hidden"].detach().requires_grad_(True)
    weight = inputs["student_weight"].detach().requires_grad_(True)
    out = kdfast.fused_linear_kd(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"],
                                 labels=inputs["labels"], temperature=2.0, kind=kind, mlm_weight=0.5,
                                 process_group=process_group)
    out.loss.backward()
    return out.loss.detach(), hidden.grad, weight.grad


def timed(repeats: int, *args) -> "tuple[float, tuple]":
    """Median ms of ``call(*args)`` over ``repeats`` calls after one warm-up (workspace, first-touch pages)."""
    result = call(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def measure(rows: int, vocab: int, hidden: int, kind: str, repeats: int) -> "dict | None":
    """One shape on every rank; rank 0 returns its row."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = dict(student_hidden=torch.randn(rows, hidden), teacher_hidden=torch.randn(rows, 2 * hidden),
                student_weight=torch.randn(vocab, hidden) * hidden**-0.5,
                teacher_weight=torch.randn(vocab, 2 * hidden) * (2 * hidden) ** -0.5,
                labels=torch.randint(0, vocab, (rows,)))
    mine = shard_rows(vocab, world, rank)
    local = dict(full, student_weight=full["student_weight"][mine], teacher_weight=full["teacher_weight"][mine])
    with record_traffic() as traffic:
        call(local, kind, dist.group.WORLD)
    ms, (loss, d_hidden, d_shard) = timed(repeats, local, kind, dist.group.WORLD)
    dist.barrier()
    row = None
    if rank == 0:
        ms_full, (ref_loss, ref_hidden, ref_weight) = timed(repeats, full, kind)
        statistics_bytes = sum(b for name, b in traffic.bytes.items()
                               if name not in ("all_reduce(d_hidden)", "all_gather(sizes)"))
        row = dict(P=world, rows=rows, V=vocab, H=hidden, kind=kind, bytes=traffic.bytes, calls=traffic.calls,
                   statistics_bytes_per_row=statistics_bytes / rows, ms=round(ms, 2), ms_unsharded=round(ms_full, 2),
                   max_rel_err=max(rel_err(loss, ref_loss), rel_err(d_hidden, ref_hidden),
                                   rel_err(d_shard, ref_weight[mine])))
    dist.barrier()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8000, 32000])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--kinds", nargs="+", default=["kl", "jsd"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = []
    for vocab in args.vocab:
        for rows in args.rows:
            for kind in args.kinds:
                row = measure(rows, vocab, args.hidden, kind, args.repeats)
                if row is not None:
                    print(json.dumps(row), flush=True)
                    results.append(row)
    if dist.get_rank() == 0 and args.json:
        with open(args.json, "w") as out:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), results=results), out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
