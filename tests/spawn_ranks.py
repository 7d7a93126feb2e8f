"""Run a function on real gloo process groups: spawned CPU processes, each bounded in time."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def _entry(worker: Callable, rank: int, world: int, folder: str, timeout_s: float, env: dict, args: tuple) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    out = Path(folder) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = ("ok", worker(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", traceback.format_exc())
    out.write_bytes(pickle.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(worker: Callable, world: int, folder: Path, *args, timeout_s: float = 120.0,
              env: "dict[str, str] | None" = None) -> "list[Any]":
    """``[worker(rank, world, *args) for each rank]``, each run in its own spawned process inside a gloo
    group of ``world`` ranks (collectives time out after ``timeout_s``). ``worker`` must be importable
    (a module-level function). Raises with the rank's traceback if one fails, or if the ranks have not
    all finished after ``timeout_s`` (they are killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_entry, args=(worker, rank, world, str(folder), timeout_s, dict(env or {}), args))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    for proc in procs:
        proc.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if hung:
        raise TimeoutError(f"ranks {hung} of {world} still running after {timeout_s} s")
    results = []
    for rank in range(world):
        path = folder / f"rank{rank}.pkl"
        if not path.exists():
            raise RuntimeError(f"rank {rank} exited with code {procs[rank].exitcode} and no result")
        status, value = pickle.loads(path.read_bytes())
        if status == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results
