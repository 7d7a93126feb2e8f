"""``kdfast bench budget``: measure each strategy's real step and turn a budget into steps and tokens.

For every strategy it builds the real step (:class:`kdfast.train.step.TrainStep`: data on the
device, teacher forward, student forward/backward with the fused KD loss, AdamW), warms it up
(including any ``torch.compile``), then times the strategies in interleaved rounds so that slow
drifts of the machine hit every arm alike: ms/step is the median of all untimed-phase steps, the
breakdown the per-phase median of one phase-timed step per round. FLOPs per step come from the
configs (analytic) and from FlopCounterMode (measured). See docs/budget.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kdfast.apps import calibration_report as reporting
from kdfast.budget import device as devices
from kdfast.budget.flops import (
    EncoderShape,
    analytic_step_flops,
    measure_flops,
    pretraining_flops,
    teacher_cache_flops,
)
from kdfast.budget.memory import check_fits
from kdfast.budget.units import Budget, Calibration, charge_fraction, parse_budget
from kdfast.runtime.environment import environment
from kdfast.strategies import CACHED
from kdfast.train.step import PHASES, Stopwatch, TrainStep

DEFAULT_STRATEGIES = "no-kd,vanilla,tinybert,minilm_v2"
MLM_PROBABILITY = 0.15
# Teachers built from a config with random weights (no download): for CPU runs, tests and timing
# the study's shapes on a GPU without network access.
CONFIG_TEACHERS = {
    "tiny-config": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                        vocab_size=2048),
    "bert-base-config": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                             intermediate_size=3072, vocab_size=30522),
    "bert-large-config": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                              intermediate_size=4096, vocab_size=30522),
}
FULL = dict(teacher="bert-base-uncased", student="6L-768", batch=256, seq=128, warmup=5, rounds=5,
            steps_per_round=4)
QUICK = dict(teacher="tiny-config", student="tiny", batch=8, seq=64, warmup=4, rounds=10, steps_per_round=6)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="hub name, local directory, or a random-weight config teacher: "
                        + ", ".join(CONFIG_TEACHERS) + f" (default {FULL['teacher']}; --quick: {QUICK['teacher']})")
    parser.add_argument("--student", help=f"student preset (default {FULL['student']}; --quick: {QUICK['student']})")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated strategy names")
    parser.add_argument("--budget", default="24h", help="24h, 90m, 86400s, 3e18flop or 4.6e9tok (default 24h)")
    parser.add_argument("--batch", type=int, help="sequences per step and rank (default 256; --quick: 8)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 128; --quick: 64)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="ranks of the training job the budget is for (default $WORLD_SIZE or 1)")
    parser.add_argument("--charge-teacher", default="none",
                        help="charge the teacher's pretraining FLOPs to KD arms: none, full or amortized:N")
    parser.add_argument("--teacher-pretraining-flops", type=float,
                        help="the teacher's pretraining FLOPs (default: analytic, BERT's 1M-step recipe)")
    parser.add_argument("--cache-k", type=int, default=32, help="K of the cached arms' sparse targets (timed "
                        "on a synthetic cache: random ids and weights, the real layout and lookup; default 32)")
    parser.add_argument("--cache-tokens", type=float, help="corpus tokens the teacher cache covers, for its "
                        "charge (default: the cached arm's own budget tokens, i.e. one pass, no reuse)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the tapped forwards (warm-up "
                        "includes compilation)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per strategy")
    parser.add_argument("--rounds", type=int, help="interleaved measurement rounds")
    parser.add_argument("--steps-per-round", type=int, help="timed steps per strategy and round")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; --quick on CPU: 1, "
                        "which keeps timings stable on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="budget-report", help="directory for budget.json, budget.md, budget.png")
    parser.add_argument("--json", help="path of the JSON report (default OUT/budget.json)")
    parser.add_argument("--quick", action="store_true", help="small teacher and student built on the fly, "
                        "short measurement (CPU: well under a minute)")


# --- validation of everything that can be checked before any model is built -----------------------

def parse_strategies(text: str) -> list[str]:
    from kdfast.strategies import NAMES
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"strategies: expected distinct comma-separated names among {', '.join(NAMES)}, "
                         f"got {text!r}")
    return names


def check_student(preset: str) -> str:
    from kdfast.models import PRESETS
    if preset not in PRESETS:
        raise ValueError(f"student: expected a preset among {', '.join(PRESETS)}, got {preset!r}")
    return preset


def _positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


@dataclass
class Options:
    teacher: str
    student: str
    strategies: list
    budget: Budget
    batch: int
    seq: int
    device: torch.device
    world_size: int
    charge: float
    charge_text: str
    teacher_pretraining_flops: Optional[float]
    compile: bool
    warmup: int
    rounds: int
    steps_per_round: int
    seed: int
    quick: bool
    threads: Optional[int]
    cache_k: int = 32
    cache_tokens: Optional[float] = None


def options_from(args: argparse.Namespace) -> Options:
    """Validated options; ValueError for the first bad one."""
    preset = QUICK if args.quick else FULL
    pick = lambda name: preset[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    device = devices.resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pretraining = args.teacher_pretraining_flops
    threads = 1 if args.threads is None and args.quick and device.type == "cpu" else args.threads
    if pretraining is not None and not (math.isfinite(pretraining) and pretraining > 0):
        raise ValueError(f"teacher_pretraining_flops: expected a FLOP count > 0, got {pretraining!r}")
    return Options(
        teacher=pick("teacher"), student=check_student(pick("student")),
        strategies=parse_strategies(args.strategies), budget=parse_budget(args.budget),
        batch=_positive_int("batch", pick("batch")), seq=_positive_int("seq", pick("seq")), device=device,
        world_size=_positive_int("world_size", args.world_size), charge=charge_fraction(args.charge_teacher),
        charge_text=args.charge_teacher, teacher_pretraining_flops=pretraining, compile=args.compile,
        warmup=_positive_int("warmup", pick("warmup")), rounds=_positive_int("rounds", pick("rounds")),
        steps_per_round=_positive_int("steps_per_round", pick("steps_per_round")), seed=args.seed,
        quick=args.quick, threads=threads if threads is None else _positive_int("threads", threads),
        cache_k=_positive_int("cache_k", args.cache_k),
        cache_tokens=None if args.cache_tokens is None else float(_positive_int("cache_tokens",
                                                                                int(args.cache_tokens))))


# --- models and batches ----------------------------------------------------------------------------

def teacher_config(name: str):
    """The teacher's transformers config, without loading (or downloading) its weights."""
    from transformers import AutoConfig, BertConfig
    if name in CONFIG_TEACHERS:
        return BertConfig(**CONFIG_TEACHERS[name])
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"teacher: expected a hub name, a local model directory or one of "
                         f"{', '.join(CONFIG_TEACHERS)}, got {name!r} ({error})") from None


def build_teacher(name: str, config, options: Options) -> torch.nn.Module:
    from transformers import BertForMaskedLM

    from kdfast.models import load_teacher
    torch.manual_seed(options.seed)
    source = BertForMaskedLM(config) if name in CONFIG_TEACHERS else name
    return load_teacher(source, device=options.device, compile=options.compile)


def synthetic_batches(batch: int, seq: int, vocab: int, device: torch.device, seed: int, count: int = 4) -> list:
    """``count`` MLM batches on the host, pinned for CUDA: random tokens, exactly round(0.15 x seq)
    labelled positions per sequence, so every step does the same work."""
    g = torch.Generator().manual_seed(seed)
    masked = max(1, round(MLM_PROBABILITY * seq))
    made = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, seq), generator=g)
        positions = torch.rand(batch, seq, generator=g).argsort(dim=1)[:, :masked]
        labels = torch.full_like(ids, -100).scatter_(1, positions, ids.gather(1, positions))
        made.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "token_type_ids": torch.zeros_like(ids), "labels": labels})
    if device.type == "cuda":
        made = [{k: v.pin_memory() for k, v in b.items()} for b in made]
    return made


@dataclass
class Arm:
    """One strategy under measurement."""

    name: str
    strategy: torch.nn.Module
    step: TrainStep
    timed_step: TrainStep
    ms: list = field(default_factory=list)
    phases: list = field(default_factory=list)


def build_arm(name: str, teacher, options: Options, scratch: Path) -> Arm:
    """The arm of strategy ``name``; a cached arm's batches come through a synthetic teacher cache in
    ``scratch`` (``kdfast.cache.synthetic``), so its data phase includes the cache lookup."""
    from kdfast.cache import synthetic
    from kdfast.models import build_student
    from kdfast.strategies import STRATEGIES, build
    torch.manual_seed(options.seed)
    student = build_student(options.student, teacher=teacher, device=options.device)
    student.kdfast_compile = options.compile
    strategy = build(name, teacher, student).to(options.device).train()
    optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=1e-4)
    vocab = teacher.config.vocab_size
    made = synthetic_batches(options.batch, options.seq, vocab, options.device, options.seed)
    batches = itertools.cycle(made).__next__
    if name in CACHED:
        cache = synthetic.build(scratch / name, made, STRATEGIES[name].sparse_kind, options.cache_k, vocab,
                                options.seed)
        batches = cache.attach(batches)
    make = lambda timing: TrainStep(strategy, optimizer, batches, options.device, timing=timing)  # noqa: E731
    return Arm(name, strategy, make(False), make(True))


def time_ms(fn, device: torch.device) -> float:
    """Wall milliseconds of ``fn()``: CUDA events on GPU, ``perf_counter`` on CPU."""
    watch = Stopwatch(device)
    start = watch.stamp()
    fn()
    end = watch.stamp()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return watch.elapsed_ms(start, end)


def measure(arms: list, options: Options) -> None:
    """Warm up every arm, then interleaved rounds: per arm ``steps_per_round`` plain steps (timed
    whole) and one phase-timed step."""
    for arm in arms:
        for _ in range(options.warmup):
            arm.step()
        arm.timed_step()
    for _ in range(options.rounds):
        for arm in arms:
            arm.ms += [time_ms(arm.step, options.device) for _ in range(options.steps_per_round)]
            arm.phases.append(arm.timed_step().phase_ms)


# --- the report ------------------------------------------------------------------------------------

def budget_for(calibration: Calibration, budget: Budget, charge_flops: float, name: str) -> tuple:
    """(whole steps, fractional steps, notes) within ``budget`` after charging ``charge_flops``."""
    try:
        calibration.whole_steps(budget)
    except ValueError as error:
        raise ValueError(f"{error} (strategy {name!r})") from None
    if not charge_flops:
        return calibration.whole_steps(budget), calibration.steps(budget), []
    charge = calibration.convert(Budget(charge_flops, "flop"), budget.unit)
    left = budget.amount - charge.amount
    note = f"teacher charge {charge_flops:.3g} FLOPs = {charge.describe()}"
    if left < calibration.per_step(budget.unit):
        return 0, 0.0, [note + ": exceeds the budget, no step left"]
    remaining = Budget(left, budget.unit)
    return calibration.whole_steps(remaining), calibration.steps(remaining), [note]


def cache_charge(calibration: Calibration, options: Options, teacher_shape: EncoderShape) -> tuple:
    """(cache tokens, build FLOPs) of a cached arm's teacher cache: over ``--cache-tokens``, else over
    the tokens the arm's own budget buys (one pass)."""
    tokens = options.cache_tokens or calibration.steps(options.budget) * options.batch * options.seq * \
        options.world_size
    return tokens, teacher_cache_flops(teacher_shape, tokens, options.seq, MLM_PROBABILITY)


def arm_report(arm: Arm, options: Options, shapes: tuple, peak: float, teacher_charge: float) -> dict:
    teacher_shape, student_shape = shapes
    ms = statistics.median(arm.ms)
    tokens = options.batch * options.seq
    mlm_weight = getattr(arm.strategy, "mlm_weight", None)  # attention strategies: MLM only when > 0
    analytic = analytic_step_flops(arm.name, teacher_shape, student_shape, options.batch, options.seq,
                                   MLM_PROBABILITY, getattr(arm.strategy, "num_relation_heads", 12),
                                   student_mlm=None if mlm_weight is None else mlm_weight > 0)
    measured = measure_flops(arm.step)
    calibration = Calibration(ms, tokens, analytic["total"], options.world_size)
    charge = teacher_charge if arm.strategy.teacher is not None else 0.0
    cache = None
    if arm.name in CACHED:
        cache_tokens, flops = cache_charge(calibration, options, teacher_shape)
        charge = teacher_charge + options.charge * flops
        cache = {"tokens": cache_tokens, "build_flops": flops, "charged_flops": options.charge * flops,
                 "k": options.cache_k, "synthetic": True}
    steps, fractional_steps, notes = budget_for(calibration, options.budget, charge, arm.name)
    disagreement = measured["total"] / analytic["total"] - 1
    if abs(disagreement) > reporting.DISAGREEMENT:
        notes.append(f"measured FLOPs differ from analytic by {100 * disagreement:+.0f}% (docs/budget.md)")
    return {
        "strategy": arm.name,
        "label": reporting.label(arm.name, student_shape.layers),
        "ms_per_step": ms,
        "ms_per_step_quartiles": statistics.quantiles(arm.ms, n=4) if len(arm.ms) > 1 else [ms] * 3,
        "timed_steps": len(arm.ms),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens * options.world_size / (ms / 1e3),
        "budget_steps": steps,
        "budget_tokens": steps * tokens * options.world_size,
        "budget_tokens_exact": fractional_steps * tokens * options.world_size,
        "wall_seconds": fractional_steps * ms / 1e3,
        "breakdown_ms": {p: statistics.median(ph[p] for ph in arm.phases) for p in PHASES},
        "flops_per_step_analytic": analytic["total"],
        "flops_analytic_parts": {k: v for k, v in analytic.items() if k != "total"},
        "flops_per_step_measured": measured["total"],
        "flops_measured_by_op": measured["by_op"],
        "flops_measured_vs_analytic": disagreement,
        "mfu": analytic["total"] / (ms / 1e3) / peak,
        "teacher_charge_flops": charge,
        "teacher_cache": cache,
        "notes": notes,
    }


def add_ratios(arms: list) -> None:
    """``tokens_vs_nokd`` (measured time) and ``tokens_vs_nokd_flops`` (analytic FLOPs) per arm."""
    base = next((a for a in arms if a["strategy"] == "no-kd"), None)
    for a in arms:
        if base is None or not base["budget_tokens_exact"]:
            a["tokens_vs_nokd"] = a["tokens_vs_nokd_flops"] = None
            continue
        a["tokens_vs_nokd"] = a["budget_tokens_exact"] / base["budget_tokens_exact"]
        a["tokens_vs_nokd_flops"] = base["flops_per_step_analytic"] / a["flops_per_step_analytic"]


def selftest(device: torch.device) -> Optional[dict]:
    """``kdfast.selftest.check(device)`` when that module exists: a summary, or ValueError when a
    backend disagrees with the reference (timing a wrong kernel would be pointless)."""
    if importlib.util.find_spec("kdfast.selftest") is None:
        return None
    from kdfast import selftest as module
    results = module.check(device)
    failed = [f"{r.op}/{r.backend}/{r.dtype}: {r.detail or 'error above tolerance'}" for r in results if r.failed]
    if failed:
        raise ValueError(f"selftest: expected every kdfast backend to match the reference on {device}, got "
                         f"{len(failed)} failure(s): " + "; ".join(failed) + " (run `kdfast selftest`)")
    return {"ok": sum(r.status == "ok" for r in results), "skipped": sum(r.status == "skipped" for r in results),
            "results": [dataclasses.asdict(r) for r in results]}


def calibrate(options: Options) -> dict:
    """Measure every strategy and return the report (the JSON document)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads or threads)
    try:
        return _calibrate(options)
    finally:
        torch.set_num_threads(threads)


def _calibrate(options: Options) -> dict:
    checked = selftest(options.device)
    config = teacher_config(options.teacher)
    from kdfast.models import PRESETS
    layers, hidden, heads, intermediate = PRESETS[options.student]
    teacher_shape = EncoderShape.of(config)
    student_shape = EncoderShape(layers, hidden, heads, intermediate, config.vocab_size,
                                 config.max_position_embeddings)
    teacher_bytes = 2 if options.device.type == "cuda" else 4
    memory = check_fits(teacher_shape, student_shape, options.batch, options.seq, options.device, teacher_bytes,
                        strategies=len(options.strategies))
    if options.seq > config.max_position_embeddings:
        raise ValueError(f"seq: expected at most the teacher's {config.max_position_embeddings} positions, "
                         f"got {options.seq}")
    teacher = build_teacher(options.teacher, config, options)
    with tempfile.TemporaryDirectory(prefix="kdfast-bench-cache-") as scratch:
        arms = [build_arm(name, teacher, options, Path(scratch)) for name in options.strategies]
        measure(arms, options)
        peak, peak_source = devices.peak_flops(options.device, options.quick)
        pretraining = options.teacher_pretraining_flops or pretraining_flops(teacher_shape)
        per_arm = [arm_report(arm, options, (teacher_shape, student_shape), peak, options.charge * pretraining)
                   for arm in arms]
    add_ratios(per_arm)
    return {
        "environment": environment(options.device),
        "selftest": checked,
        "dtype": "bf16 autocast, teacher bf16" if options.device.type == "cuda" else "fp32",
        "shapes": {"batch": options.batch, "seq": options.seq, "mlm_probability": MLM_PROBABILITY,
                   "teacher": options.teacher, "teacher_config": vars(teacher_shape),
                   "student": options.student, "student_config": vars(student_shape)},
        "seed": options.seed,
        "world_size": options.world_size,
        "budget": {"text": str(options.budget), "amount": options.budget.amount, "unit": options.budget.unit,
                   "description": options.budget.describe()},
        "charge_teacher": options.charge_text,
        "teacher_pretraining_flops": pretraining,
        "measurement": {"warmup": options.warmup, "rounds": options.rounds,
                        "steps_per_round": options.steps_per_round, "compile": options.compile,
                        "quick": options.quick},
        "memory_estimate_bytes": memory,
        "peak": {"flops_per_s": peak, "source": peak_source},
        "strategies": per_arm,
    }


def write(report: dict, out: Path, json_path: Optional[Path]) -> dict:
    """budget.json, budget.md and budget.png; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": json_path or out / "budget.json", "markdown": out / "budget.md", "png": out / "budget.png"}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(reporting.markdown(report))
    reporting.chart(report, paths["png"])
    return paths


def run(args: argparse.Namespace) -> int:
    report = calibrate(options_from(args))  # bad input: ValueError, printed by kdfast.cli.main
    paths = write(report, Path(args.out), Path(args.json) if args.json else None)
    print(reporting.markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
