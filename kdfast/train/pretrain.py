"""``kdfast pretrain``: pretrain one student (one arm of the comparison) under a budget.

``train_arm`` is the loop the comparison runs per strategy: seed, build the student, build the
strategy, then take ``kdfast.train.step.TrainStep`` steps until the budget clock says stop, with the
LR on the fraction of budget spent, held-out MLM evaluations and atomic checkpoints (both outside the
clock), and JSON-lines logs. Under torchrun the student is wrapped in DDP and every rank stops on the
same step.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from kdfast.budget.flops import CACHED_KD as CACHED
from kdfast.budget.units import Budget, parse_budget
from kdfast.data.dataset import PretrainData
from kdfast.data.stream import BatchStream, heldout_batches
from kdfast.train import checkpoint, distributed
from kdfast.train.checkpoint import atomic_open
from kdfast.train.clock import BudgetClock, lr_factor
from kdfast.train.distributed import Context
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


def write_json(path: Path, value) -> None:
    with atomic_open(Path(path)) as f:
        f.write(json.dumps(value, indent=1).encode())


def _cached_strategy_options(strategy_name: str, cache, formulation: str) -> dict:
    """Options of a cached arm: the cache's kind must be the strategy's, and its KD temperature the one
    the strategy trains with (the cache's for canonical, 1 for paper)."""
    from kdfast import strategies

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


def train_arm(config: dict, strategy_name: str, run_dir: Path, context: Context, data: PretrainData, tokenizer,
              teacher=None, model_section: Optional[dict] = None, resume: bool = False, offset: float = 0.0,
              label: Optional[str] = None, teacher_cache=None) -> dict:
    """Pretrain one student with ``strategy_name`` under ``config['train']['budget']``; returns the
    summary also written to ``run_dir/summary.json`` (and the model to ``run_dir/model``).
    A cached arm (``vanilla-cached-*``) reads its targets from ``teacher_cache``
    (``kdfast.cache.serve.TeacherCache``) by the batches' sequence indices; it runs no teacher."""
    from kdfast import strategies
    from kdfast.models import build_student

    train, run_dir = config["train"], Path(run_dir)
    device = context.device
    budget = parse_budget(str(train["budget"]))
    seq_len = data.train.shape[1]
    if train["batch_size"] % (train["accumulation"] * context.world):
        raise ValueError(f"train.batch_size: expected a multiple of accumulation x world size = "
                         f"{train['accumulation'] * context.world}, got {train['batch_size']}")
    if not resume and checkpoint.load_latest(run_dir) is not None:
        raise ValueError(f"out: expected a fresh run folder or --resume, got {str(run_dir)!r} which holds checkpoints")

    torch.manual_seed(config["seed"])  # every arm starts from the same student weights
    spec = model_section or config["student"]
    student = build_student(student_config(spec, len(tokenizer), seq_len, teacher), teacher=teacher,
                            tokenizer=tokenizer if teacher is not None else None, init=spec.get("init", "random"),
                            device=device)
    if train["compile"]:
        student.kdfast_compile = True
    cached = strategy_name in strategies.CACHED
    options = _cached_strategy_options(strategy_name, teacher_cache, config["formulation"]) if cached else {}
    strategy = strategies.build(strategy_name, teacher, student, formulation=config["formulation"],
                                **options).to(device)
    per_token_flop = flop_per_token(strategy_name, teacher, student, train["batch_size"], seq_len) \
        if budget.unit == "flop" else None
    tokens_per_step = train["batch_size"] * seq_len
    check_affordable(budget, tokens_per_step, per_token_flop,
                     calibrated_seconds(train["calibration"], strategy_name, context.world), offset)
    pending = [b for b in parse_snapshots(train, budget) if not (snapshot_dir(run_dir, b) / SUMMARY).is_file()]
    optimizer = build_optimizer(strategy.trainable_parameters(), train["optimizer"], train["lr"],
                                train["weight_decay"], train["betas"], train["eps"], device)
    stream = BatchStream(data.train, train["batch_size"] // train["accumulation"], data.masking, config["seed"],
                         context.rank, context.world)
    clock = BudgetClock(budget, context, per_token_flop, offset)
    bf16 = {"auto": None, "fp32": False, "bf16": True}[train["precision"]]
    stepper = DataParallelStrategy(strategy, context) if context.distributed else strategy
    batches = teacher_cache.attach(stream.next) if cached else stream.next
    step = TrainStep(stepper, optimizer, batches, device, grad_clip=train["grad_clip"] or None,
                     accumulation=train["accumulation"], bf16=bf16)
    eval_bf16 = step.bf16
    curve, next_eval, trains_mlm_head = [], 0, None
    state = checkpoint.load_latest(run_dir) if resume else None
    if state is not None:
        strategy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        clock.load_state_dict(state["clock"])
        curve, next_eval = state["curve"], state["next_eval"]
        _set_rng_state(state["rng"])
    log = RunLog(run_dir, label or strategy_name, enabled=context.is_main, progress=train["progress"],
                 tensorboard=train["tensorboard"], resume_step=clock.steps if state is not None else None)

    def measure() -> None:
        with clock.paused():
            loss = heldout_mlm_loss(student, data.heldout, data, train["batch_size"], train["eval_batches"], device,
                                    eval_bf16)
            curve.append({"step": clock.steps, "spent": clock.spent, "fraction": clock.fraction,
                          "tokens": clock.tokens, "heldout_mlm_loss": loss})
            log.record(event="eval", **curve[-1])

    def evaluate() -> None:
        nonlocal next_eval
        measure()
        next_eval += 1

    def summarize(folder: Path) -> dict:
        """The run so far, with the model saved in ``folder/model`` (main rank)."""
        summary = {"strategy": strategy_name, "shape": shape_name(student), "budget": str(budget),
                   "budget_unit": budget.unit, "budget_amount": budget.amount, "budget_used": clock.spent,
                   "teacher_charge": offset, "steps": clock.steps, "tokens": clock.tokens,
                   "seconds": clock.state_dict()["seconds"], "epochs": stream.epochs,
                   "unique_tokens": data.unique_tokens, "final_mlm_loss": curve[-1]["heldout_mlm_loss"],
                   "trains_mlm_head": trains_mlm_head if trains_mlm_head is not None else strategy_name == "no-kd",
                   "curve": list(curve), "model": str(folder / "model")}
        if cached:
            summary["teacher_cache"] = teacher_cache.summary()
        if context.is_main:
            student.save_pretrained(str(folder / "model"))
            tokenizer.save_pretrained(str(folder / "model"))
            write_json(folder / SUMMARY, summary)
        return summary

    def snapshot(at: Budget) -> None:
        """Save the model where a run of budget ``at`` would have stopped (its LR schedule is this run's)."""
        measure()
        with clock.paused():
            summarize(snapshot_dir(run_dir, at))
            distributed.barrier(context)

    def save() -> None:
        with clock.paused():
            if context.is_main:
                checkpoint.save(run_dir, {"format": 1, "strategy": strategy_name, "model": strategy.state_dict(),
                                          "optimizer": optimizer.state_dict(), "stream": stream.state_dict(),
                                          "clock": clock.state_dict(), "curve": curve, "next_eval": next_eval,
                                          "rng": _rng_state()}, clock.steps, train["keep_checkpoints"])
            distributed.barrier(context)

    strategy.train()
    if next_eval == 0:
        evaluate()
    clock.start()
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while not clock.done():
            set_lr(optimizer, train["lr"] * lr_factor(clock.fraction, train["warmup"]))
            result = step()
            trains_mlm_head = result.mlm_loss is not None
            clock.record_step(result.tokens * context.world)
            window_tokens += result.tokens * context.world
            while pending and clock.reached(pending[0].amount):
                snapshot(pending.pop(0))
            if clock.steps % train["log_steps"] == 0 or clock.done():
                loss = float(result.loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {clock.steps}; lower train.lr")
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                log.record(event="train", step=clock.steps, spent=clock.spent, fraction=clock.fraction,
                           tokens=clock.tokens, loss=loss, lr=optimizer.param_groups[0]["lr"], tokens_per_s=rate,
                           epochs=stream.epochs,
                           mlm_loss=None if result.mlm_loss is None else float(result.mlm_loss),
                           **{k: float(v) for k, v in result.parts.items()})
                log.progress(clock.fraction, **{"tok/s": f"{rate:,.0f}", "loss": f"{loss:.3f}"})
                window_start, window_tokens = time.perf_counter(), 0
            if next_eval < train["eval_points"] and clock.fraction >= next_eval / train["eval_points"]:
                evaluate()
            if clock.steps % train["checkpoint_steps"] == 0:
                save()
        if not curve or curve[-1]["step"] != clock.steps:
            evaluate()
    finally:
        log.close()
    if context.distributed:  # each rank's own view of where it stopped
        write_json(run_dir / f"rank-{context.rank}.json", {"steps": clock.steps, "spent": clock.spent})
    summary = summarize(run_dir)
    distributed.barrier(context)
    return summary


# ---------------------------------------------------------------------------------------------- CLI

def check_strategy(name: str) -> None:
    from kdfast import strategies

    if name not in strategies.NAMES:
        raise ValueError(f"strategy: expected one of {', '.join(strategies.NAMES)}, got {name!r}")


def check_cache_masking(names, config: dict) -> None:
    """Cached arms need static masks: refuse dynamic masking before anything is built."""
    if config["data"]["masking"] != "static" and any(name in CACHED for name in names):
        from kdfast.cache.build import DYNAMIC_REFUSAL

        raise ValueError(DYNAMIC_REFUSAL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kdfast.train.setup import add_common_arguments

    parser.add_argument("--strategy", required=True, help="no-kd, vanilla, distilbert, tinybert, minilm, minilm_v2, "
                        "vanilla-cached-topk, vanilla-cached-sample")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from kdfast.train import setup

    config = setup.resolve_auto(setup.load_config(args))
    context = distributed.init(config["device"], config["dist_timeout"])
    run_dir = Path(config["out"])
    try:
        check_strategy(args.strategy)
        check_cache_masking([args.strategy], config)
        parse_budget(str(config["train"]["budget"]))
        tokenizer = setup.tokenizer_for(config, run_dir / "tokenizer", context)
        data = setup.load_data(config, tokenizer)
        teacher, cache = None, None
        if args.strategy != "no-kd":
            if not config["teacher"]["path"]:
                raise ValueError(f"teacher: expected --teacher PATH for strategy {args.strategy!r}, got none "
                                 f"(kdfast compare pretrains a small teacher for the tiny preset)")
            teacher = setup.load_teacher_checked(config["teacher"]["path"], tokenizer, context.device)
        if args.strategy in CACHED:
            from kdfast.cache.cli import for_strategy

            cache = for_strategy(config, args.strategy, teacher, tokenizer, data, context, run_dir / "teacher-cache")
        summary = train_arm(config, args.strategy, run_dir, context, data, tokenizer, teacher, resume=args.resume,
                            teacher_cache=cache)
    except Exception as error:
        if context.is_main:
            checkpoint.write_crash(run_dir, error)
        raise
    if context.is_main:
        print(f"{summary['strategy']}: {summary['steps']} steps, {summary['tokens']:,} tokens, budget used "
              f"{summary['budget_used']:.4g} {summary['budget_unit']}, held-out MLM loss "
              f"{summary['final_mlm_loss']:.4f}; model in {summary['model']}")
    return 0
