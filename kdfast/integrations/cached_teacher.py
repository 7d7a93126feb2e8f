"""A causal-LM teacher cache in place of the teacher in :class:`DistillationTrainer`: the checks that the
cache fits the student and the data, and the sparse targets of each batch (found by ``sequence_index``).
No teacher model exists in the process."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn
from transformers import default_data_collator

from kdfast.cache.causal import CausalTeacherCache
from kdfast.integrations.lm_head import is_causal_lm
from kdfast.integrations.loss import check_model

INDEX_KEY = "sequence_index"


class CachedTeacher:
    """Serves ``cache``'s targets to the trainer's loss, batch by batch."""

    def __init__(self, cache: CausalTeacherCache):
        self.cache = cache

    @classmethod
    def for_trainer(cls, teacher_cache, student: nn.Module, teacher: Optional[nn.Module], temperature: float,
                    teacher_topk: Optional[int], strategy: Optional[str], trainer_kwargs: dict) -> "CachedTeacher":
        """Open and check ``teacher_cache`` (a folder or a ``CausalTeacherCache``) for this trainer; sets
        ``trainer_kwargs['train_dataset']`` to the cache's dataset and ``data_collator`` to stacking when
        not given."""
        for name, value in (("teacher", teacher), ("teacher_topk", teacher_topk), ("strategy", strategy)):
            if value is not None:
                got = "a model" if name == "teacher" else repr(value)
                raise ValueError(f"{name}: expected None with teacher_cache (the cache replaces the teacher: its "
                                 f"targets are fixed when it is built), got {got}")
        tokenizer = trainer_kwargs.get("processing_class")
        tokenizer = tokenizer if callable(getattr(tokenizer, "get_vocab", None)) else None
        if isinstance(teacher_cache, CausalTeacherCache):
            cache = teacher_cache
            cache.check(tokenizer=tokenizer)
        else:
            cache = CausalTeacherCache(teacher_cache, tokenizer=tokenizer)
        vocab = check_model(student, "student").vocab_size
        if not is_causal_lm(student):
            raise ValueError(f"model: expected a causal LM student for a causal teacher cache, got "
                             f"{type(student).__name__}")
        if vocab != cache.vocab:
            raise ValueError(f"teacher_cache: expected targets over the student's vocabulary V={vocab}, got a cache "
                             f"over V={cache.vocab} ({cache.directory})")
        if float(temperature) != float(cache.temperature):
            raise ValueError(f"temperature: expected the cache's T={cache.temperature:g} (its targets are "
                             f"softmax(teacher_logits / T)), got {temperature:g}; rebuild with --temperature")
        dataset = trainer_kwargs.setdefault("train_dataset", cache.dataset())
        trainer_kwargs.setdefault("data_collator", default_data_collator)   # full sequences: stacked, never padded
        cls._check_dataset(dataset, cache)
        return cls(cache)

    @staticmethod
    def _check_dataset(dataset, cache: CausalTeacherCache) -> None:
        """Refuse a dataset the cache cannot serve: more sequences than it holds, or another length."""
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        if len(dataset) > len(cache):
            raise ValueError(f"teacher_cache: expected targets for all {len(dataset)} sequences of train_dataset, got "
                             f"a cache of {len(cache)} sequences ({cache.directory}); build it from the same data "
                             f"(or train on its own dataset: leave train_dataset out)")
        first = dataset[0] if len(dataset) else None
        if isinstance(first, Mapping) and isinstance(first.get("input_ids"), torch.Tensor):
            cache.check(seq_len=first["input_ids"].shape[-1])

    def split(self, inputs: dict) -> "tuple[dict, tuple[torch.Tensor, torch.Tensor]]":
        """(the model's inputs, (ids, weights) [B, L-1, K]) of a batch with ``sequence_index`` [B], after
        checking its ``input_ids`` are the cached sequences'."""
        index = inputs.get(INDEX_KEY)
        if not isinstance(index, torch.Tensor):
            raise ValueError(f"inputs: expected '{INDEX_KEY}' [B] (yielded by the cache's dataset) to find the "
                             f"teacher targets, got keys {sorted(inputs)}")
        input_ids = inputs["input_ids"]
        self.cache.check(seq_len=input_ids.shape[1])
        cached = torch.stack([self.cache.input_ids(int(i)) for i in index.reshape(-1).tolist()])
        if not torch.equal(cached, input_ids.cpu().long()):
            row = int((cached != input_ids.cpu().long()).any(1).nonzero()[0])
            raise ValueError(f"input_ids: expected the tokens the cache was built from for sequence "
                             f"{int(index.reshape(-1)[row])}, got others (a dataset from other data, packing or "
                             f"tokenizer than {self.cache.directory}'s)")
        model_inputs = {k: v for k, v in inputs.items() if k != INDEX_KEY}
        return model_inputs, self.cache.targets(index)
