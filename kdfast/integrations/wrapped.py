"""Run a loss inside a model's own forward, so the hooks of the DDP or FSDP2 wrapper around it fire.

DDP all-reduces gradients only for a forward that went through it; FSDP2 gathers a module's sharded
parameters in a hook before that module's forward and frees them after. So the fused KD loss, which
reads the student's LM head weight instead of calling the head, runs as the student's forward
(:func:`run_as_forward`), where FSDP2 has gathered the root module's parameters, and reads the head
after the base model ran (:func:`gathered_head`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from kdfast.integrations.lm_head import LMHead, find_lm_head

_ABSENT = object()


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(what to call, the model itself): a ``DistributedDataParallel`` is called and its ``.module``
    is the model; FSDP2's ``fully_shard`` wraps in place, so the model is called as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return (model, model.module) if isinstance(model, DistributedDataParallel) else (model, model)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, function: Callable[..., Any]):
    saved = module.__dict__.get("forward", _ABSENT)
    module.forward = function
    try:
        yield
    finally:
        if saved is _ABSENT:
            del module.forward
        else:
            module.forward = saved


def run_as_forward(caller: nn.Module, module: nn.Module, function: Callable[..., Any], inputs: dict) -> Any:
    """``function(**inputs)`` run as ``module``'s forward by calling ``caller(**inputs)`` (``module``
    itself, or the DDP around it): the forward pre- and post-hooks of every wrapper fire around it.
    Return tensors in tuples, lists or dicts (FSDP2 finds them there to hook the backward)."""
    with _forward_replaced(module, function):
        return caller(**inputs)


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter FSDP2 holds sharded outside its module's forward)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_fsdp_module(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


HOW_TO_WRAP = ("apply fully_shard to the layers and then to the whole model, fully_shard(model), as accelerate's "
               "FSDP2 plugin does (kdfast.integrations.wrapped.fully_shard_model(model) does both)")


def check_not_zero3(model: nn.Module, who: str) -> None:
    """DeepSpeed ZeRO-3 partitions parameters outside their module's forward (``ds_id`` marks them):
    the fused loss reads the head weight without calling the head, so such models are refused."""
    partitioned = next((name for name, p in model.named_parameters() if hasattr(p, "ds_id")), None)
    if partitioned is not None:
        raise ValueError(f"{who}: expected a model not partitioned by DeepSpeed ZeRO-3, got parameter {partitioned!r} "
                         f"partitioned by it; use ZeRO stage 0-2, DDP or FSDP2 (docs/losses.md, Many devices)")


def check_fsdp_layout(model: nn.Module, who: str) -> None:
    """A model with FSDP2-sharded parameters must itself be the root FSDP module, else its root
    parameters (the LM head's among them) are neither gathered in its forward nor reduced after."""
    sharded = next((name for name, p in model.named_parameters() if is_sharded(p)), None)
    if sharded is not None and not is_fsdp_module(model):
        raise ValueError(f"{who}: expected fully_shard applied to the whole model when any of its layers is sharded, "
                         f"got sharded parameter {sharded!r} under a model that is not an FSDP module; {HOW_TO_WRAP}")


def gathered_head(model: nn.Module, who: str) -> LMHead:
    """The LM head, read inside ``model``'s forward after its base model ran: an FSDP2 unit of the
    head's own (accelerate puts the final norm and the head in one) is gathered if it is not yet."""
    head = find_lm_head(model, who)
    decoder = model.get_output_embeddings()
    if is_sharded(head.weight) and is_fsdp_module(decoder):
        decoder.unshard()
        head = find_lm_head(model, who)
    if is_sharded(head.weight):
        raise ValueError(f"{who}: expected the LM head weight gathered inside the model's forward, got a sharded "
                         f"DTensor of local shape {tuple(head.weight.to_local().shape)}; {HOW_TO_WRAP}")
    return head


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A constant's full value: an FSDP2-sharded DTensor is all-gathered, a tensor is returned as is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 model after a forward without backward (a teacher):
    the root unit, and units made with ``reshard_after_forward=False`` (accelerate's final norm and
    head), keep them gathered until a backward that never comes."""
    for module in model.modules():
        if is_fsdp_module(module):
            module.reshard()


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes in the model's ``_no_split_modules`` except any holding the LM head
    weight (BERT's embeddings hold the tied decoder weight, which must stay in the root unit)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    head = getattr(model.get_output_embeddings(), "weight", None)
    return [m for m in model.modules() if type(m).__name__ in names and m is not model
            and all(p is not head for p in m.parameters())]


def fully_shard_model(model: nn.Module, layers: bool = True, **fsdp_options) -> nn.Module:
    """FSDP2's layout for the fused loss: ``fully_shard`` on each transformer layer (``layers``), then on
    the whole model, which holds embeddings and LM head; for a student in a custom loop, or a teacher
    kept 1/P per rank. ``layers=False`` makes the model one unit, as strategies need (they call the
    layers' projections, not the layers). ``fsdp_options`` go to ``fully_shard``. Returns the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in transformer_layers(model) if layers else ():
        fully_shard(layer, **fsdp_options)
    return fully_shard(model, **fsdp_options)


def check_one_unit(model: nn.Module, who: str, why: str) -> None:
    """Refuse FSDP2 units below the root of ``model``, whose hooks a tapped forward would not fire."""
    inner = next((name for name, m in model.named_modules() if name and is_fsdp_module(m)), None)
    if inner is not None:
        raise ValueError(f"{who}: expected one FSDP unit for the whole model ({why}), got a unit of its own at "
                         f"{inner!r}; shard it with kdfast.integrations.wrapped.fully_shard_model(model, "
                         f"layers=False), that is fully_shard(model) alone, before the Trainer")
