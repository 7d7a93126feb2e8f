"""The optimizer: apex FusedAdam/FusedLAMB when apex is installed and the run is on CUDA, otherwise
torch AdamW (its fused kernel on CUDA). Biases and norms get no weight decay."""
from __future__ import annotations

import importlib.util
from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "lamb")


def _groups(parameters: Iterable[torch.nn.Parameter], weight_decay: float) -> list:
    parameters = [p for p in parameters if p.requires_grad]
    return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]


def build(parameters: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float, betas, eps: float,
          device: torch.device) -> torch.optim.Optimizer:
    """``name`` in adamw | lamb; ``lr`` is the peak rate (the schedule scales it every step)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    groups = _groups(parameters, weight_decay)
    apex = device.type == "cuda" and importlib.util.find_spec("apex") is not None
    if apex:
        from apex.optimizers import FusedAdam, FusedLAMB

        if name == "lamb":
            return FusedLAMB(groups, lr=lr, betas=tuple(betas), eps=eps)
        return FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adam_w_mode=True)
    if name == "lamb":
        raise ValueError("train.optimizer: expected 'adamw' without apex on CUDA, got 'lamb' (apex FusedLAMB needs "
                         "apex installed and a GPU)")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
