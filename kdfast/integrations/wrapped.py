"""Run a loss inside a model's own forward, so the hooks of the DDP, FSDP2 or DeepSpeed wrapper around it fire.

DDP all-reduces gradients only for a forward that went through it; FSDP2 gathers a module's sharded
parameters in a hook before that module's forward and frees them after. So the fused KD loss, which
reads the student's LM head weight instead of calling the head, runs as the student's forward
(:func:`run_as_forward`), where FSDP2 has gathered the root module's parameters, and reads the head
after the base model ran (:func:`gathered_head`). DeepSpeed ZeRO-3 gathers a parameter only in its
own module's forward and backward hooks: there the fused op runs as the LM head's forward
(:func:`run_as_head_forward`). DeepSpeed is imported only when a model is already partitioned by it.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable

import torch
from torch import nn

from kdfast.integrations.lm_head import LMHead, find_lm_head
from kdfast.runtime.distributed import is_dtensor

_ABSENT = object()


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(what to call, the model itself): a ``DistributedDataParallel`` or a DeepSpeed engine is called
    and its ``.module`` is the model; FSDP2's ``fully_shard`` wraps in place, so the model is called as it is."""
    from torch.nn.parallel import DistributedDataParallel

    wrappers = (DistributedDataParallel,)
    if "deepspeed" in sys.modules:  # an engine exists only once deepspeed is imported
        from deepspeed import DeepSpeedEngine

        wrappers += (DeepSpeedEngine,)
    return (model, model.module) if isinstance(model, wrappers) else (model, model)


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


is_sharded = is_dtensor  # a parameter FSDP2 holds sharded outside its module's forward


def is_fsdp_module(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2 in its public place
        return False
    return isinstance(model, FSDPModule)


HOW_TO_WRAP = ("apply fully_shard to the layers and then to the whole model, fully_shard(model), as accelerate's "
               "FSDP2 plugin does (kdfast.integrations.wrapped.fully_shard_model(model) does both)")


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 partitions (``ds_id`` marks them): outside its module's
    forward and backward hooks it holds only this rank's partition."""
    return hasattr(tensor, "ds_id")


ZERO3_HOW = ("pass the engine deepspeed.initialize(model=..., config=... stage 3) returns (or its .module), whose "
             "hooks gather each module's parameters")


def check_zero3_hooks(model: nn.Module, who: str) -> None:
    """A ZeRO-3-partitioned model must carry the engine's module hooks (``deepspeed.zero.Init`` alone
    partitions without them), its LM head module among them: the fused op runs as the head's forward."""
    partitioned = next((name for name, p in model.named_parameters() if is_zero3_partitioned(p)), None)
    if partitioned is None:
        return
    decoder = model.get_output_embeddings()
    hooked = [m for m in (model, decoder) if "ds_id" in m.__dict__]  # what the engine sets on each module it hooks
    if len(hooked) < 2:
        raise ValueError(f"{who}: expected a DeepSpeed ZeRO-3 model hooked by its engine, root and LM head module, got "
                         f"parameter {partitioned!r} partitioned without hooks on "
                         f"{'the LM head module' if hooked else 'the model'}; {ZERO3_HOW}")


def run_as_head_forward(model: nn.Module, function: Callable[[torch.Tensor], Any], hidden: torch.Tensor) -> Any:
    """``function(hidden)``, run as the LM head module's forward when ``model`` is partitioned by ZeRO-3:
    its hooks gather the head's parameters for the call, again before its backward (the op saves the
    weight), and partition the gradient after; otherwise called directly."""
    decoder = model.get_output_embeddings()
    if not any(is_zero3_partitioned(p) for p in decoder.parameters()):
        return function(hidden)
    with _forward_replaced(decoder, function):
        return decoder(hidden)  # positional: ZeRO-3 hooks the backward of positional inputs only

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
    """A constant's full value: an FSDP2-sharded DTensor is all-gathered, a ZeRO-3 partitioned parameter
    gathered and copied (the copy outlives the gather), a tensor is returned as is."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    if is_zero3_partitioned(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.detach().clone()
    return tensor


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
