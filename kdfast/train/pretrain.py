"""Pretrain one student (one arm of the comparison) under a budget (``kdfast pretrain``: kdfast.apps.pretrain).

``train_arm`` (an :class:`ArmTrainer`) is the loop the comparison runs per strategy: seed, build the student,
build the strategy, then take ``kdfast.train.step.TrainStep`` steps until the budget clock says stop, with the
LR on the fraction of budget spent, held-out MLM evaluations and atomic checkpoints (both outside the
clock), and JSON-lines logs. Under torchrun the student is wrapped in DDP and every rank stops on the
same step.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from kdfast import strategies
from kdfast.budget.units import Budget, parse_budget
from kdfast.data.dataset import PretrainData
from kdfast.data.stream import BatchStream, heldout_batches
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context
from kdfast.runtime.io import write_json
from kdfast.train import checkpoint
from kdfast.train.clock import BudgetClock, lr_factor
from kdfast.train.optim import build as build_optimizer
from kdfast.train.optim import set_lr
from kdfast.train.runlog import RunLog
from kdfast.train.step import TrainStep, to_device

SUMMARY = "summary.json"


def snapshot_dir(run_dir: Path, budget: Budget) -> Path:
    """Where ``train.snapshots`` keeps the model (``model/``) and ``summary.json`` at ``budget``."""
    return Path(run_dir) / "snapshots" / budget.tag


def parse_snapshots(train: dict, budget: Budget) -> list:
    """``train.snapshots`` as Budgets in ascending order, each in ``budget``'s unit and below it."""
    snapshots = sorted((parse_budget(str(b)) for b in train["snapshots"]), key=lambda b: b.amount)
    for snap in snapshots:
        if snap.unit != budget.unit or snap.amount >= budget.amount:
            raise ValueError(f"train.snapshots: expected budgets in {budget.unit} below the run's {budget}, got {snap}")
    return snapshots


# ---------------------------------------------------------------------------------------------- models

def student_config(spec: dict, vocab_size: int, seq_len: int, teacher=None):
    """A BertConfig from a ``student``/``teacher`` section (preset or layers/hidden/heads/intermediate);
    vocabulary and positions come from the teacher when there is one."""
    from transformers import BertConfig

    from kdfast.models import PRESETS, base_model

    if spec.get("preset"):
        if spec["preset"] not in PRESETS:
            raise ValueError(f"student.preset: expected one of {', '.join(PRESETS)}, got {spec['preset']!r}")
        layers, hidden, heads, intermediate = PRESETS[spec["preset"]]
    else:
        layers, hidden, heads, intermediate = spec["layers"], spec["hidden"], spec["heads"], spec["intermediate"]
    if hidden % heads:
        raise ValueError(f"student.hidden: expected a multiple of heads={heads}, got {hidden}")
    inherited = {}
    if teacher is not None:
        from kdfast.models.loading import INHERITED

        teacher_config = base_model(teacher).config
        inherited = {k: getattr(teacher_config, k) for k in INHERITED if hasattr(teacher_config, k)}
    inherited.setdefault("vocab_size", vocab_size)
    inherited.setdefault("max_position_embeddings", max(512, seq_len))
    inherited["attention_probs_dropout_prob"] = spec.get("attention_dropout", 0.1)
    return BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      intermediate_size=intermediate, **inherited)


def shape_name(model) -> str:
    """'6L/768' for a model's encoder."""
    config = model.config
    return f"{config.num_hidden_layers}L/{config.hidden_size}"


@torch.no_grad()
def heldout_mlm_loss(model, sequences: torch.Tensor, data: PretrainData, batch_size: int, batches: int,
                     device: torch.device, bf16: bool) -> float:
    """Mean MLM cross-entropy over the masked tokens of the first ``batches`` fixed held-out batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, batch in enumerate(heldout_batches(sequences, batch_size, data.masking)):
        if index >= batches:
            break
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
        rows = batch["labels"] != -100
        total += float(torch.nn.functional.cross_entropy(logits[rows].float(), batch["labels"][rows],
                                                         reduction="sum"))
        count += int(rows.sum())
    model.train(was_training)
    return total / max(count, 1)


class _StudentPass(torch.nn.Module):
    """The strategy's student pass as a module, so DDP can wrap it (the teacher is not a submodule)."""

    def __init__(self, strategy: torch.nn.Module):
        super().__init__()
        self.strategy = strategy

    def forward(self, batch, taps):
        return self.strategy.student_pass(batch, taps)


class DataParallelStrategy(torch.nn.Module):
    """A strategy whose student pass runs through DDP (gradients all-reduced during backward)."""

    def __init__(self, strategy: torch.nn.Module, context: Context):
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        self.strategy = strategy
        ids = [context.device.index] if context.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(_StudentPass(strategy), device_ids=ids)

    def teacher_pass(self, batch):
        return self.strategy.teacher_pass(batch)

    def student_pass(self, batch, taps):
        return self.ddp(batch, taps)

    def trainable_parameters(self):
        return self.strategy.trainable_parameters()


# ---------------------------------------------------------------------------------------------- budget

def flop_per_token(strategy: str, teacher, student, batch: int, seq_len: int) -> float:
    """Analytic FLOPs per student token of one step (kdfast.budget.flops)."""
    from kdfast.budget.flops import EncoderShape, analytic_step_flops

    student_shape = EncoderShape.of(student.config)
    teacher_shape = EncoderShape.of(teacher.config) if teacher is not None else student_shape
    return analytic_step_flops(strategy, teacher_shape, student_shape, batch, seq_len)["total"] / (batch * seq_len)


def check_affordable(budget: Budget, tokens_per_step: int, per_token_flop: Optional[float],
                     seconds_per_step: Optional[float], offset: float = 0.0, where: str = "") -> None:
    """Refuse a budget that cannot buy one optimizer step (time: only with a calibration);
    ``where`` names the run in the message (" of cell 10s/no-kd")."""
    cost = {"tok": float(tokens_per_step),
            "flop": tokens_per_step * per_token_flop if per_token_flop else None,
            "s": seconds_per_step}[budget.unit]
    if cost is not None and budget.amount - offset < cost:
        left = f" ({offset:.4g} of it already charged to the teacher)" if offset else ""
        raise ValueError(f"budget{where}: expected at least one step's cost, {Budget(cost, budget.unit).describe()} "
                         f"({tokens_per_step} tokens per step), got {budget.describe()}{left}, which buys "
                         f"{max(budget.amount - offset, 0.0) / cost:.3g} steps")


def calibrated_seconds(path: Optional[str], strategy: str, world: int) -> Optional[float]:
    """Device-seconds of one step of ``strategy`` from a ``kdfast bench budget --json`` file."""
    if not path:
        return None
    report = json.loads(Path(path).read_text())
    rows = report.get("strategies", report.get("results", report))
    rows = rows.values() if isinstance(rows, dict) else rows
    for row in rows:
        if row.get("strategy") == strategy and "ms_per_step" in row:
            return float(row["ms_per_step"]) / 1e3 * world
    raise ValueError(f"train.calibration: expected a row for strategy {strategy!r} with ms_per_step in {path}, "
                     f"got none")


# ---------------------------------------------------------------------------------------------- the arm

def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cached_strategy_options(strategy_name: str, cache, formulation: str) -> dict:
    """Options of a cached arm: the cache's kind must be the strategy's, and its KD temperature the one
    the strategy trains with (the cache's for canonical, 1 for paper)."""
    if cache is None:
        raise ValueError(f"teacher_cache: expected a TeacherCache for strategy {strategy_name!r}, got None")
    kind = strategies.STRATEGIES[strategy_name].sparse_kind
    if cache.kind != kind:
        raise ValueError(f"teacher_cache: expected a {kind} cache for strategy {strategy_name!r}, got a "
                         f"{cache.kind} cache in {cache.directory}")
    if formulation == "paper" and cache.temperature != 1.0:
        raise ValueError(f"teacher_cache: expected targets at temperature 1 for formulation 'paper', got "
                         f"{cache.temperature} in {cache.directory}")
    return {"temperature": cache.temperature} if formulation == "canonical" else {}


class ArmTrainer:
    """One arm's pretraining: ``__init__`` builds the student, strategy, optimizer, data stream and budget
    clock (restoring them from the last checkpoint on ``resume``); ``run()`` steps until the clock says
    stop and returns the summary also written to ``run_dir/summary.json`` (the model to ``run_dir/model``).
    A cached arm (``vanilla-cached-*``) reads its targets from ``teacher_cache``
    (``kdfast.cache.serve.TeacherCache``) by the batches' sequence indices; it runs no teacher."""

    def __init__(self, config: dict, strategy_name: str, run_dir: Path, context: Context, data: PretrainData,
                 tokenizer, teacher=None, model_section: Optional[dict] = None, resume: bool = False,
                 offset: float = 0.0, label: Optional[str] = None, teacher_cache=None):
        self.config, self.train, self.run_dir = config, config["train"], Path(run_dir)
        self.strategy_name, self.context, self.data, self.tokenizer = strategy_name, context, data, tokenizer
        self.offset, self.teacher_cache = offset, teacher_cache
        self.budget = parse_budget(str(self.train["budget"]))
        self._check_fresh_or_resume(resume)
        self._build(teacher, model_section or config["student"])
        self.curve, self.next_eval, self.trains_mlm_head = [], 0, None
        state = checkpoint.load_latest(self.run_dir) if resume else None
        if state is not None:
            self._restore(state)
        self.log = RunLog(self.run_dir, label or strategy_name, enabled=context.is_main,
                          progress=self.train["progress"], tensorboard=self.train["tensorboard"],
                          resume_step=self.clock.steps if state is not None else None)

    def _check_fresh_or_resume(self, resume: bool) -> None:
        world = self.context.world
        if self.train["batch_size"] % (self.train["accumulation"] * world):
            raise ValueError(f"train.batch_size: expected a multiple of accumulation x world size = "
                             f"{self.train['accumulation'] * world}, got {self.train['batch_size']}")
        if not resume and checkpoint.load_latest(self.run_dir) is not None:
            raise ValueError(f"out: expected a fresh run folder or --resume, got {str(self.run_dir)!r} which holds "
                             f"checkpoints")

    def _build(self, teacher, spec: dict) -> None:
        """Student (same seed, so the same weights, in every arm), strategy, optimizer, stream, clock, step."""
        from kdfast.models import build_student

        train, context, device = self.train, self.context, self.context.device
        seq_len = self.data.train.shape[1]
        torch.manual_seed(self.config["seed"])  # every arm starts from the same student weights
        self.student = build_student(student_config(spec, len(self.tokenizer), seq_len, teacher), teacher=teacher,
                                     tokenizer=self.tokenizer if teacher is not None else None,
                                     init=spec.get("init", "random"), device=device)
        if train["compile"]:
            self.student.kdfast_compile = True
        self.cached = self.strategy_name in strategies.CACHED
        options = _cached_strategy_options(self.strategy_name, self.teacher_cache, self.config["formulation"]) \
            if self.cached else {}
        self.strategy = strategies.build(self.strategy_name, teacher, self.student,
                                         formulation=self.config["formulation"], **options).to(device)
        per_token_flop = flop_per_token(self.strategy_name, teacher, self.student, train["batch_size"], seq_len) \
            if self.budget.unit == "flop" else None
        check_affordable(self.budget, train["batch_size"] * seq_len, per_token_flop,
                         calibrated_seconds(train["calibration"], self.strategy_name, context.world), self.offset)
        self.pending = [b for b in parse_snapshots(train, self.budget)
                        if not (snapshot_dir(self.run_dir, b) / SUMMARY).is_file()]
        self.optimizer = build_optimizer(self.strategy.trainable_parameters(), train["optimizer"], train["lr"],
                                         train["weight_decay"], train["betas"], train["eps"], device)
        self.stream = BatchStream(self.data.train, train["batch_size"] // train["accumulation"], self.data.masking,
                                  self.config["seed"], context.rank, context.world)
        self.clock = BudgetClock(self.budget, context, per_token_flop, self.offset)
        bf16 = {"auto": None, "fp32": False, "bf16": True}[train["precision"]]
        stepper = DataParallelStrategy(self.strategy, context) if context.distributed else self.strategy
        batches = self.teacher_cache.attach(self.stream.next) if self.cached else self.stream.next
        self.step = TrainStep(stepper, self.optimizer, batches, device, grad_clip=train["grad_clip"] or None,
                              accumulation=train["accumulation"], bf16=bf16)

    def _restore(self, state: dict) -> None:
        self.strategy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.clock.load_state_dict(state["clock"])
        self.curve, self.next_eval = state["curve"], state["next_eval"]
        _set_rng_state(state["rng"])

    # -------------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train until the budget is spent; the summary of the finished run."""
        train, clock = self.train, self.clock
        self.strategy.train()
        if self.next_eval == 0:
            self.evaluate()
        clock.start()
        self.window_start, self.window_tokens = time.perf_counter(), 0
        try:
            while not clock.done():
                result = self.take_step()
                while self.pending and clock.reached(self.pending[0].amount):
                    self.snapshot(self.pending.pop(0))
                if clock.steps % train["log_steps"] == 0 or clock.done():
                    self.log_step(result)
                if self.next_eval < train["eval_points"] and clock.fraction >= self.next_eval / train["eval_points"]:
                    self.evaluate()
                if clock.steps % train["checkpoint_steps"] == 0:
                    self.save()
            if not self.curve or self.curve[-1]["step"] != clock.steps:
                self.evaluate()
        finally:
            self.log.close()
        if self.context.distributed:  # each rank's own view of where it stopped
            write_json(self.run_dir / f"rank-{self.context.rank}.json", {"steps": clock.steps, "spent": clock.spent})
        summary = self.summarize(self.run_dir)
        distributed.barrier(self.context)
        return summary

    def take_step(self):
        """One optimizer step at the learning rate of the budget fraction spent; the step's result."""
        set_lr(self.optimizer, self.train["lr"] * lr_factor(self.clock.fraction, self.train["warmup"]))
        result = self.step()
        self.trains_mlm_head = result.mlm_loss is not None
        self.clock.record_step(result.tokens * self.context.world)
        self.window_tokens += result.tokens * self.context.world
        return result

    def log_step(self, result) -> None:
        """Log the step's loss, parts and throughput since the last log line; refuse a non-finite loss."""
        clock = self.clock
        loss = float(result.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {clock.steps}; lower train.lr")
        rate = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        self.log.record(event="train", step=clock.steps, spent=clock.spent, fraction=clock.fraction,
                        tokens=clock.tokens, loss=loss, lr=self.optimizer.param_groups[0]["lr"], tokens_per_s=rate,
                        epochs=self.stream.epochs,
                        mlm_loss=None if result.mlm_loss is None else float(result.mlm_loss),
                        **{k: float(v) for k, v in result.parts.items()})
        self.log.progress(clock.fraction, **{"tok/s": f"{rate:,.0f}", "loss": f"{loss:.3f}"})
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def measure(self) -> None:
        """Held-out MLM loss now, outside the clock, appended to the curve and logged."""
        clock = self.clock
        with clock.paused():
            loss = heldout_mlm_loss(self.student, self.data.heldout, self.data, self.train["batch_size"],
                                    self.train["eval_batches"], self.context.device, self.step.bf16)
            self.curve.append({"step": clock.steps, "spent": clock.spent, "fraction": clock.fraction,
                               "tokens": clock.tokens, "heldout_mlm_loss": loss})
            self.log.record(event="eval", **self.curve[-1])

    def evaluate(self) -> None:
        """One of the ``train.eval_points`` scheduled evaluations."""
        self.measure()
        self.next_eval += 1

    def summarize(self, folder: Path) -> dict:
        """The run so far, with the model saved in ``folder/model`` (main rank)."""
        clock, name = self.clock, self.strategy_name
        summary = {"strategy": name, "shape": shape_name(self.student), "budget": str(self.budget),
                   "budget_unit": self.budget.unit, "budget_amount": self.budget.amount, "budget_used": clock.spent,
                   "teacher_charge": self.offset, "steps": clock.steps, "tokens": clock.tokens,
                   "seconds": clock.state_dict()["seconds"], "epochs": self.stream.epochs,
                   "unique_tokens": self.data.unique_tokens, "final_mlm_loss": self.curve[-1]["heldout_mlm_loss"],
                   "trains_mlm_head": self.trains_mlm_head if self.trains_mlm_head is not None else name == "no-kd",
                   "curve": list(self.curve), "model": str(folder / "model")}
        if self.cached:
            summary["teacher_cache"] = self.teacher_cache.summary()
        if self.context.is_main:
            self.student.save_pretrained(str(folder / "model"))
            self.tokenizer.save_pretrained(str(folder / "model"))
            write_json(folder / SUMMARY, summary)
        return summary

    def snapshot(self, at: Budget) -> None:
        """Save the model where a run of budget ``at`` would have stopped (its LR schedule is this run's)."""
        self.measure()
        with self.clock.paused():
            self.summarize(snapshot_dir(self.run_dir, at))
            distributed.barrier(self.context)

    def save(self) -> None:
        """An atomic checkpoint of everything ``--resume`` needs, outside the clock."""
        with self.clock.paused():
            if self.context.is_main:
                state = {"format": 1, "strategy": self.strategy_name, "model": self.strategy.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "stream": self.stream.state_dict(),
                         "clock": self.clock.state_dict(), "curve": self.curve, "next_eval": self.next_eval,
                         "rng": _rng_state()}
                checkpoint.save(self.run_dir, state, self.clock.steps, self.train["keep_checkpoints"])
            distributed.barrier(self.context)


def train_arm(config: dict, strategy_name: str, run_dir: Path, context: Context, data: PretrainData, tokenizer,
              teacher=None, model_section: Optional[dict] = None, resume: bool = False, offset: float = 0.0,
              label: Optional[str] = None, teacher_cache=None) -> dict:
    """Pretrain one student with ``strategy_name`` under ``config['train']['budget']`` (:class:`ArmTrainer`);
    returns the summary also written to ``run_dir/summary.json``."""
    return ArmTrainer(config, strategy_name, run_dir, context, data, tokenizer, teacher, model_section, resume,
                      offset, label, teacher_cache).run()


# ---------------------------------------------------------------------------------------------- checks

def check_strategy(name: str) -> None:
    if name not in strategies.NAMES:
        raise ValueError(f"strategy: expected one of {', '.join(strategies.NAMES)}, got {name!r}")


def check_cache_masking(names, config: dict) -> None:
    """Cached arms need static masks: refuse dynamic masking before anything is built."""
    if config["data"]["masking"] != "static" and any(name in strategies.CACHED for name in names):
        from kdfast.cache.serve import DYNAMIC_REFUSAL

        raise ValueError(DYNAMIC_REFUSAL)
