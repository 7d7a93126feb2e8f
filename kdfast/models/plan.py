"""What a strategy asks the models to keep: a plan per model of tapped layers.

Layer indices are 0-based encoder layers for q/k/v; hidden states are 0 = embeddings and
i = output of layer i (so 0..num_layers). Everything not named is dropped as soon as the next
layer has consumed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


def _indices(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({int(v) for v in values}))


@dataclass(frozen=True)
class ModelPlan:
    """Tapped tensors of one model: ``q``/``k``/``v`` layers, ``hidden`` states, and ``decoder``
    (keep the pre-decoder states, i.e. the MLM head transform output, plus the decoder)."""

    q: tuple[int, ...] = ()
    k: tuple[int, ...] = ()
    v: tuple[int, ...] = ()
    hidden: tuple[int, ...] = ()
    decoder: bool = False

    def __post_init__(self):
        for name in ("q", "k", "v", "hidden"):
            object.__setattr__(self, name, _indices(getattr(self, name)))

    def validate(self, who: str, num_layers: int) -> None:
        """Raise a ValueError naming the layer and the fix when the plan reads a missing layer."""
        for name in ("q", "k", "v"):
            for layer in getattr(self, name):
                if not 0 <= layer < num_layers:
                    raise ValueError(f"plan.{who}.{name}: expected layers in 0..{num_layers - 1} (the {who} has "
                                     f"{num_layers} layers), got layer {layer}; fix the strategy's layer map "
                                     f"(e.g. teacher_layer=) or use a model with more layers")
        for index in self.hidden:
            if not 0 <= index <= num_layers:
                raise ValueError(f"plan.{who}.hidden: expected hidden-state indices in 0..{num_layers} "
                                 f"(0 = embeddings, the {who} has {num_layers} layers), got {index}; fix the "
                                 f"strategy's layer map or use a model with more layers")

    @property
    def qkv_layers(self) -> tuple[int, ...]:
        return _indices(self.q + self.k + self.v)

    @property
    def empty(self) -> bool:
        return not (self.qkv_layers or self.hidden or self.decoder)


@dataclass(frozen=True)
class Plan:
    """The plan of a teacher-student pair; ``teacher`` is None when no teacher runs (no-kd)."""

    student: ModelPlan = field(default_factory=ModelPlan)
    teacher: ModelPlan | None = None
