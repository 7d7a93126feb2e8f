"""torchrun support: process-group setup (NCCL on GPU, gloo on CPU) and the few collectives the trainer
needs. Without torchrun everything is a single process and no group is created."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Context:
    """Where this process runs: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(preference: str) -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is refused."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: expected a visible CUDA GPU for device='cuda', got none; use device=cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init(preference: str = "auto", timeout_s: float = 1800.0) -> Context:
    """Join the torchrun group when WORLD_SIZE > 1 (idempotent). A collective that waits more than
    ``timeout_s`` seconds for a rank (stuck, or gone without torchrun noticing) raises instead of hanging."""
    if not timeout_s > 0:
        raise ValueError(f"dist_timeout: expected seconds > 0, got {timeout_s!r}")
    device = pick_device(preference)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Context(dist.get_rank(), dist.get_world_size(), device)


def max_across(value: float, context: Context) -> float:
    """The largest ``value`` over all ranks (the value itself in one process)."""
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def dtensor_api():
    """The module with ``DTensor``, ``Shard`` and ``Replicate``: ``torch.distributed.tensor`` (torch >= 2.5),
    ``torch.distributed._tensor`` before; None where torch has neither. (Import statements, not importlib:
    torch.compile traces through this.)"""
    try:
        from torch.distributed import tensor as api
    except ImportError:
        api = None
    if api is None or not hasattr(api, "DTensor"):
        try:
            from torch.distributed import _tensor as api
        except ImportError:
            return None
    return api


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor (a parameter FSDP2 holds sharded, a tensor-parallel weight)."""
    api = dtensor_api()
    return api is not None and isinstance(value, api.DTensor)
