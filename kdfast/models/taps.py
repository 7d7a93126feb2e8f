"""Tapped tensors of one forward pass (``ModelTaps``) and of a teacher-student pair (``Taps``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class ModelTaps:
    """What one model kept of a forward pass, per its ``ModelPlan``.

    ``q``/``k``/``v``: layer -> [B, h, L, d] (before the attention op; views of the [B, L, H]
    projection outputs, so ``concat`` gives [B, L, H] back without a copy).
    ``hidden``: index -> [B, L, H] (0 = embeddings, i = output of layer i).
    ``decoder_input`` [B, L, H]: the MLM head transform output; ``decoder_weight`` [V, H] and
    ``decoder_bias`` [V] turn it into logits. ``input_ids``/``attention_mask`` [B, L] are the
    inputs the pass ran on (for agreement checks).
    """

    num_layers: int
    num_heads: int
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    q: dict = field(default_factory=dict)
    k: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)
    hidden: dict = field(default_factory=dict)
    decoder_input: Optional[torch.Tensor] = None
    decoder_weight: Optional[torch.Tensor] = None
    decoder_bias: Optional[torch.Tensor] = None

    @staticmethod
    def concat(x: torch.Tensor) -> torch.Tensor:
        """[B, h, L, d] -> [B, L, h*d] (heads concatenated, as MiniLMv2's relations read them)."""
        b, h, length, d = x.shape
        return x.transpose(1, 2).reshape(b, length, h * d)

    def layer_list(self, kind: str) -> list:
        """``q``/``k``/``v`` as a list over all layers, None where not tapped."""
        taps = getattr(self, kind)
        return [taps.get(i) for i in range(self.num_layers)]

    def hidden_list(self) -> list:
        """Hidden states as a list of num_layers + 1 entries, None where not tapped."""
        return [self.hidden.get(i) for i in range(self.num_layers + 1)]

    def logits(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MLM logits [N, V] of the rows selected by the [B, L] bool ``rows`` (all rows if None)."""
        if self.decoder_input is None:
            raise ValueError("decoder_input: expected the pre-decoder states, got None (the plan did not ask for "
                             "decoder=True)")
        x = self.decoder_input.reshape(-1, self.decoder_input.shape[-1])
        if rows is not None:
            x = x[rows.reshape(-1)]
        return F.linear(x, self.decoder_weight, self.decoder_bias)


@dataclass
class Taps:
    """Both sides of a ``DistillPair`` pass (``teacher`` is None without a teacher)."""

    student: ModelTaps
    teacher: Optional[ModelTaps]
