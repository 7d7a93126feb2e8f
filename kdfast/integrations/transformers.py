"""Knowledge distillation in the Hugging Face ``Trainer``: ``DistillationTrainer`` and, for custom
loops, :func:`distillation_loss`.

Default: vocabulary KD (``kdfast.fused_linear_kd``: no logits) plus the student's CE for masked or
causal LMs. ``strategy=`` trains any :mod:`kdfast.strategies` strategy (BERT-style masked LMs).
The loss of a micro-batch is normalised by HF's ``num_items_in_batch`` (the label tokens of all
accumulated micro-batches, summed over ranks), so gradient accumulation and data parallelism give the
gradient of one large batch. Under DDP, FSDP2 and DeepSpeed ZeRO-3 the loss runs as the student's forward,
through the wrapper.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import Trainer

from kdfast import strategies
from kdfast.integrations.cached_teacher import CachedTeacher
from kdfast.integrations.loss import (
    IGNORE_INDEX,
    DistillationOutput,
    check_models,
    check_num_items,
    check_options,
    count_targets,
    distillation_loss,
)
from kdfast.integrations.wrapped import (
    check_fsdp_layout,
    check_one_unit,
    is_fsdp_module,
    is_sharded,
    is_zero3_partitioned,
    run_as_forward,
    unwrap,
)
from kdfast.strategies.base import StrategyOutput


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss distils ``teacher`` into ``model`` (the student).

    Options as in :func:`distillation_loss` (``temperature``, ``kd_weight``, ``ce_weight``,
    ``kind``, ``beta``, ``teacher_topk``, ``backend``), or ``strategy`` (a name of
    :data:`kdfast.strategies.NAMES`) with ``strategy_options`` for :func:`kdfast.strategies.build`.
    The teacher is never trained nor moved; it may sit on another device or dtype (the default path;
    strategies need it on the student's device), replicated or sharded by FSDP2. Runs in one process or
    under torchrun / accelerate launch with the Trainer's DDP or FSDP2 (``fsdp_config={"fsdp_version": 2}``), or
    DeepSpeed ZeRO-3 (``deepspeed=CONFIG``: the default vocabulary KD, with a replicated teacher);
    not under ``DataParallel`` (several GPUs in one process). With ``args.torch_compile`` the loss (the
    strategy's passes, or the default vocabulary KD) runs under ``torch.compile`` too, with
    ``args.torch_compile_backend`` and ``_mode``.

    ``teacher_cache`` (a folder built by ``kdfast teacher-cache build`` from a causal LM, or a
    :class:`kdfast.cache.causal.CausalTeacherCache`) replaces ``teacher``: no teacher model is loaded,
    each batch's targets are read from the cache by its ``sequence_index``. The training set defaults
    to the cache's own dataset (the packed ``input_ids`` it was built from); see
    :mod:`kdfast.integrations.cached_teacher` for the checks.
    """

    def __init__(self, model: nn.Module, args=None, *, teacher: Optional[nn.Module] = None,
                 teacher_cache=None, temperature: float = 1.0,
                 kd_weight: float = 1.0, ce_weight: float = 1.0, kind: str = "kl", beta: Optional[float] = None,
                 teacher_topk: Optional[int] = None, backend: str = "auto", strategy: Optional[str] = None,
                 strategy_options: Optional[dict] = None, **trainer_kwargs):
        check_options(temperature, kd_weight, ce_weight, kind, backend)
        self.cached_teacher = None
        if teacher_cache is not None:
            self.cached_teacher = CachedTeacher.for_trainer(teacher_cache, model, teacher, temperature, teacher_topk,
                                                            strategy, trainer_kwargs)
        else:
            check_models(model, teacher)
        if strategy is not None and strategy not in strategies.NAMES:
            raise ValueError(f"strategy: expected None or one of {', '.join(map(repr, strategies.NAMES))}, "
                             f"got {strategy!r}")
        super().__init__(model, args, **trainer_kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(f"args: expected one device per process, got n_gpu={self.args.n_gpu} (DataParallel); "
                             f"launch one process per GPU with torchrun or accelerate launch (DDP or FSDP2)")
        # The loss is normalised by num_items_in_batch: ask Trainer to count it and not to rescale.
        self.model_accepts_loss_kwargs = True
        self.teacher = teacher
        self.loss_options = dict(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, kind=kind,
                                 beta=beta, teacher_topk=teacher_topk, backend=backend)
        self.strategy = None
        if strategy is not None:
            self.strategy = self._build_strategy(strategy, strategy_options or {})
            self._check_strategy_parallel(strategy)
        self._loss_fn = distillation_loss
        self._passes = None if self.strategy is None else (self.strategy.teacher_pass, self.strategy.student_pass)
        if self.args.torch_compile:  # the loss path calls the student's modules directly: compile it too
            self._loss_fn = self._compiled(distillation_loss)
            self._passes = None if self._passes is None else tuple(map(self._compiled, self._passes))

    def _compiled(self, fn):
        """``fn`` under torch.compile with the Trainer's backend and mode (kdfast's ops trace as single
        nodes; a strategy step is one graph)."""
        return torch.compile(fn, backend=self.args.torch_compile_backend or "inductor",
                             mode=self.args.torch_compile_mode)

    def _check_strategy_parallel(self, name: str) -> None:
        """Parameters a strategy owns outside the student are not in the DDP/FSDP wrapper: refused across ranks."""
        own = {id(p) for p in self.model.parameters()}
        if self.args.world_size > 1 and any(id(p) not in own for p in self.strategy.trainable_parameters()):
            raise ValueError(f"strategy: expected one whose trainable parameters all belong to the student for "
                             f"world_size={self.args.world_size}, got {name!r}, which owns a projection that DDP/FSDP "
                             f"would not synchronise across ranks; run it in one process or pick another strategy")

    def _build_strategy(self, name: str, options: dict) -> strategies.Strategy:
        device_s = next(self.model.parameters()).device
        device_t = next(self.teacher.parameters()).device
        if device_t != device_s:
            raise ValueError(f"teacher: expected the student's device {device_s} for strategy {name!r}, got "
                             f"{device_t}; move the teacher there or use the default vocabulary KD (strategy=None)")
        sharded = next((n for n, p in self.teacher.named_parameters() if is_sharded(p)), None)
        if sharded is not None:
            raise ValueError(f"teacher: expected a replicated teacher for strategy {name!r}, got FSDP-sharded "
                             f"parameter {sharded!r}; strategies read the teacher's layers directly (the default "
                             f"vocabulary KD takes a sharded teacher)")
        return strategies.build(name, self.teacher, self.model, **options)

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer plus a group for parameters the strategy owns (TinyBERT's projection)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.strategy is not None:
            own = {id(p) for p in self.model.parameters()}
            extra = [p for p in self.strategy.trainable_parameters() if id(p) not in own]
            if extra:
                optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer's model-input columns, plus the ``sequence_index`` a teacher cache looks targets up by."""
        super()._set_signature_columns_if_needed()
        if self.cached_teacher is not None and "sequence_index" not in self._signature_columns:
            self._signature_columns.append("sequence_index")

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        if self.cached_teacher is not None:
            inputs, targets = self.cached_teacher.split(inputs)
            out = self._loss_fn(model, None, inputs, num_items_in_batch=num_items_in_batch,
                                teacher_targets=targets, **self.loss_options)
        elif self.strategy is None:
            out = self._loss_fn(model, self.teacher, inputs, num_items_in_batch=num_items_in_batch,
                                **self.loss_options)
        else:
            out = self._strategy_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP/FSDP average gradients over ranks: as
            # Trainer.compute_loss does, scale by the number of processes.
            scale = self.accelerator.num_processes
            out = DistillationOutput(out.loss * scale, out.kd * scale, out.ce * scale, out.num_items)
        return (out.loss, {"loss": out.loss, "kd": out.kd, "ce": out.ce}) if return_outputs else out.loss

    def _strategy_loss(self, model: nn.Module, inputs: dict, num_items_in_batch) -> DistillationOutput:
        """The strategy's loss (a mean over this micro-batch) weighted by its share of the label
        tokens: exact accumulation for the vocabulary terms, token-weighted for the others. The
        student's pass runs as its forward, through the DDP/FSDP wrapper ``model``."""
        count = check_num_items(num_items_in_batch)
        caller, student = unwrap(model)
        check_fsdp_layout(student, "model")
        partitioned = next((name for name, p in student.named_parameters() if is_zero3_partitioned(p)), None)
        if partitioned is not None:
            raise ValueError(f"model: expected no DeepSpeed ZeRO-3 partitioning with strategy={self.strategy.name!r} "
                             f"(strategies call the layers' projections outside the modules' hooks), got parameter "
                             f"{partitioned!r} partitioned; use the default vocabulary KD (strategy=None), or DDP / "
                             f"FSDP2")
        if is_fsdp_module(student):
            check_one_unit(student, "model", "strategies call the layers' projections, whose units would not gather")
        teacher_pass, student_pass_fn = self._passes
        taps = teacher_pass(inputs)

        def student_pass(**batch) -> tuple:
            result = student_pass_fn(batch, taps)
            return result.loss, result.mlm_loss, dict(result.parts)

        loss, mlm_loss, parts = run_as_forward(caller, student, student_pass, inputs)
        out = StrategyOutput(loss, parts, mlm_loss)
        labelled = int((inputs["labels"] != IGNORE_INDEX).sum())
        scale = 1.0 if count is None else labelled / count.to(out.loss.device)
        ce = out.mlm_loss if out.mlm_loss is not None else torch.zeros_like(out.loss)
        return DistillationOutput(out.loss * scale, (out.loss - out.parts.get("mlm", 0.0)) * scale, ce * scale,
                                  labelled if count is None else int(count))


__all__ = ["DistillationTrainer", "DistillationOutput", "count_targets", "distillation_loss"]
