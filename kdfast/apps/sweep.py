"""``kdfast sweep``: the equal-compute comparison repeated across budgets.

1. Read the budgets (``--budgets 15s,45s,135s`` or ``sweep.budgets``, a list or a geometric series
   ``{start: 15s, factor: 3, count: 3}``) and refuse bad ones before any training: mixed units, budgets
   that do not strictly increase, a cell whose budget cannot buy one step.
2. ``compare.prepare`` once: tokenizer, packed data, the (kept) teacher and the evaluation suite.
3. Every strategy is trained independently at every budget, in ``OUT/cells/<budget>/<strategy>``, so its
   LR schedule spans its own budget; with ``train.replicates: R`` each cell is trained R times (replicate
   r >= 1 in ``rep<r>`` under the cell, seeds as in compare). Finished cells are reused; ``--resume``
   continues interrupted ones.
   ``--snapshots`` is the cheap approximation: one run per strategy at the largest budget, its models
   saved where the smaller budgets would have stopped (their LR schedule is the long run's), labelled so.
4. ``compare.evaluate_rows`` on every cell and the teacher, then ``sweep.json``, ``sweep.md`` and plots
   with trends and crossovers (``kdfast.eval.sweep_report``). The teacher's charge
   (``--charge-teacher``) does not change training: the report shifts the KD cells by it.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import List

from kdfast.apps import compare
from kdfast.budget.units import Budget, charge_fraction, parse_budget
from kdfast.runtime.distributed import Context
from kdfast.runtime.io import write_json
from kdfast.train import pretrain

RECIPE = "recipe.json"
APPROXIMATION = ("snapshots: each smaller budget is a checkpoint of the run at the largest budget, so its LR "
                 "schedule is the long run's (not decayed to zero at its own budget); an approximation of a sweep")


def parse_budgets(spec) -> List[Budget]:
    """``'15s,45s'``, ``['15s', '45s']`` or ``{start: 15s, factor: 3, count: 3}`` -> Budgets, checked:
    one unit, at least two, strictly increasing."""
    if isinstance(spec, dict):
        if set(spec) != {"start", "factor", "count"}:
            raise ValueError(f"sweep.budgets: expected the keys start, factor, count, got {sorted(spec)}")
        start, factor, count = parse_budget(str(spec["start"])), float(spec["factor"]), int(spec["count"])
        if factor <= 1 or count < 2:
            raise ValueError(f"sweep.budgets: expected factor > 1 and count >= 2, got factor {factor}, count {count}")
        budgets = [Budget(start.amount * factor ** i, start.unit) for i in range(count)]
    elif isinstance(spec, (str, list, tuple)):
        items = spec.split(",") if isinstance(spec, str) else spec
        budgets = [parse_budget(str(item).strip()) for item in items if str(item).strip()]
    else:
        raise ValueError(f"sweep.budgets: expected '15s,45s,135s', a list or {{start, factor, count}}, got {spec!r}")
    if len(budgets) < 2:
        raise ValueError(f"sweep.budgets: expected at least 2 budgets, got {len(budgets)}")
    units = {b.unit for b in budgets}
    if len(units) > 1:
        raise ValueError(f"sweep.budgets: expected one unit for every budget, got {', '.join(map(str, budgets))} "
                         f"(units {', '.join(sorted(units))})")
    for before, after in zip(budgets, budgets[1:]):
        if after.amount <= before.amount or after.tag == before.tag:
            raise ValueError(f"sweep.budgets: expected strictly increasing budgets, got {after} after {before}")
    return budgets


def cell_config(config: dict, budget: Budget) -> dict:
    """The compare config of one budget; the teacher charge is applied in the report, not in training."""
    return {**config, "train": {**config["train"], "budget": budget.tag},
            "teacher": {**config["teacher"], "charge": "none"}}


def step_costs(config: dict, strategy: str, world: int) -> tuple:
    """(tokens per step, FLOPs per token or None, device-seconds per step or None) of one cell, from the
    configs alone (the vocabulary is the teacher's, or ``teacher.build_tokenizer``)."""
    train, seq_len = config["train"], config["data"]["seq_len"]
    flop = None
    if parse_budget(str(train["budget"])).unit == "flop":
        from transformers import AutoConfig

        from kdfast.budget.flops import EncoderShape, analytic_step_flops

        teacher = config["teacher"]
        vocab = teacher["build_tokenizer"]
        teacher_config = AutoConfig.from_pretrained(teacher["path"]) if teacher["path"] else \
            pretrain.student_config(teacher, vocab, seq_len)
        student = EncoderShape.of(pretrain.student_config(config["student"], teacher_config.vocab_size, seq_len))
        flop = analytic_step_flops(strategy, student if strategy == "no-kd" else EncoderShape.of(teacher_config),
                                   student, train["batch_size"], seq_len)["total"] / (train["batch_size"] * seq_len)
    seconds = pretrain.calibrated_seconds(train["calibration"], strategy, world)
    return train["batch_size"] * seq_len, flop, seconds


def check(config: dict, budgets: List[Budget], world: int) -> None:
    """Everything compare checks, per budget, and that every (budget, strategy) cell buys a step."""
    for budget in budgets:
        compare.validate({**config, "train": {**config["train"], "budget": budget.tag}})
    for name in config["strategies"]:
        costs = step_costs(cell_config(config, budgets[0]), name, world)
        for budget in budgets:
            pretrain.check_affordable(budget, *costs, where=f" of cell {budget.tag}/{name}")


def recipe(config: dict) -> dict:
    """What every cell of a sweep folder shares (budgets, strategies, evaluation and charge may change)."""
    train = {k: v for k, v in config["train"].items() if k not in ("budget", "progress", "tensorboard", "snapshots")}
    return {"seed": config["seed"], "formulation": config["formulation"], "student": config["student"],
            "data": config["data"], "train": train, "snapshots": config["sweep"]["snapshots"],
            "teacher": {k: v for k, v in config["teacher"].items() if k != "charge"}}


def check_recipe(out: Path, config: dict, context: Context) -> None:
    """Refuse to add cells to a folder whose cells were trained with another recipe; record it otherwise."""
    from kdfast.eval.fingerprint import differences

    path, now = out / RECIPE, json.loads(json.dumps(recipe(config)))
    trained = any((out / folder).is_dir() for folder in ("cells", "long"))
    changed = differences(json.loads(path.read_text()), now) if path.is_file() and trained else []
    if changed:
        key, old, new = changed[0]
        raise ValueError(f"out: expected the recipe of the cells already in {str(out)!r}, got {key} = {new!r} "
                         f"where they have {old!r}; use another --out")
    if context.is_main:
        write_json(path, now)


def train_cells(config: dict, budgets: List[Budget], prepared, context: Context, resume: bool) -> List[dict]:
    """One row per (budget, strategy), budgets ascending, each with its ``replicates``; finished cells
    (every replicate's ``summary.json``) are reused."""
    out, rows = Path(config["out"]), []
    for budget in budgets:
        folder, cell = out / "cells" / budget.tag, cell_config(config, budget)
        todo = [s for s in config["strategies"] if compare.finished_row(cell, s, folder / s) is None]
        if todo:
            compare.train_arms({**cell, "strategies": todo}, prepared, context, folder, resume, reuse=True)
        for name in config["strategies"]:
            row = compare.finished_row(cell, name, folder / name)
            rows.append({**row, "cell": budget.tag, "cell_amount": budget.amount,
                         "arm": f"{name} {row['shape']} @ {budget.tag}"})
    return rows


def _snapshot(run_dir: Path, budget: Budget, longest: Budget) -> Path:
    """Where a long run in ``run_dir`` keeps its model and summary at ``budget``."""
    return run_dir if budget is longest else pretrain.snapshot_dir(run_dir, budget)


def snapshot_cells(config: dict, budgets: List[Budget], prepared, context: Context, resume: bool) -> List[dict]:
    """The ``--snapshots`` approximation: one run per strategy (and replicate) at the largest budget
    (``OUT/long``), its models at the smaller budgets read as those cells."""
    longest, folder = budgets[-1], Path(config["out"]) / "long"
    run = cell_config(config, longest)
    run["train"]["snapshots"] = [b.tag for b in budgets[:-1]]
    todo = [s for s in config["strategies"] if compare.finished_row(run, s, folder / s) is None]
    if todo:
        compare.train_arms({**run, "strategies": todo}, prepared, context, folder, resume, reuse=True)
    rows = []
    for budget in budgets:
        for name in config["strategies"]:
            row = compare.finished_row(run, name, folder / name, functools.partial(_snapshot, budget=budget,
                                                                                      longest=longest))
            rows.append({**row, "cell": budget.tag, "cell_amount": budget.amount, "approximation": "snapshot",
                         "arm": f"{name} {row['shape']} @ {budget.tag} (snapshot of {longest.tag})"})
    return rows


def teacher_charge(config: dict, teacher_row: dict, unit: str) -> dict:
    """The budget charged to each KD cell in the report: policy, fraction, amount (in ``unit``)."""
    policy = config["teacher"]["charge"]
    fraction = charge_fraction(policy)
    spent = teacher_row.get("budget_used")
    amount = fraction * spent if spent is not None and teacher_row.get("budget_unit", unit) == unit else 0.0
    return {"policy": policy, "fraction": fraction, "amount": amount, "unit": unit,
            "teacher_budget_used": spent}


def sweep(config: dict, context: Context, resume: bool = False) -> dict:
    from kdfast.eval import sweep_report

    out = Path(config["out"])
    budgets = parse_budgets(config["sweep"]["budgets"])
    check(config, budgets, context.world)
    check_recipe(out, config, context)
    prepared = compare.prepare(cell_config(config, budgets[0]), context, resume)
    start = time.perf_counter()
    cells = snapshot_cells if config["sweep"]["snapshots"] else train_cells
    rows = cells(config, budgets, prepared, context, resume)
    timings = {**prepared.timings, "cells (pretraining, budget-clocked; reused cells cost nothing)":
               time.perf_counter() - start}
    start = time.perf_counter()
    references = compare.reference_rows(config, prepared, context)
    analyses = {budget.tag: compare.evaluate_rows(config, prepared, [*(r for r in rows if r["cell"] == budget.tag),
                                                                     *references], context)
                for budget in budgets}   # paired tests against No-KD at each budget; references are stored
    timings["evaluation (stored evaluations cost nothing)"] = time.perf_counter() - start
    for analysis in analyses.values():
        timings.update({f"  evaluation of {arm}": s for arm, s in analysis.pop("seconds").items()})
    unit = budgets[0].unit
    charge = teacher_charge(config, prepared.teacher_row, unit)
    notes = list(prepared.suite.notes)
    if charge["policy"] != "none" and not charge["amount"]:
        notes.append(f"--charge-teacher {charge['policy']}: no teacher pretraining cost in {unit} is known "
                     f"(a given teacher, or another unit); nothing was charged.")
    result = {"kind": "sweep", "name": config["name"], "budget_unit": unit, "budgets": [b.tag for b in budgets],
              "strategies": list(config["strategies"]), "baseline": "no-kd",
              "approximation": APPROXIMATION if config["sweep"]["snapshots"] else None,
              "limited_data": config["data"]["unique_tokens"] is not None,
              "references": references, "teacher_charge": charge, "cells": rows,
              "metrics": next((a["metrics"] for a in analyses.values() if a.get("metrics")), []),
              "verdicts": {tag: a.get("verdicts", []) for tag, a in analyses.items()},
              "timings": timings, "notes": notes, "draws": config["sweep"]["draws"],
              **compare.described_inputs(config, prepared, prepared.teacher_row)}
    return compare.publish(result, out, sweep_report.write, context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    compare.add_arguments(parser)
    parser.add_argument("--budgets", default=None,
                        help="increasing budgets in one unit: 15s,45s,135s (default: the config's sweep.budgets)")
    parser.add_argument("--snapshots", action="store_true",
                        help="approximation: evaluate checkpoints of one run at the largest budget")


def run(args: argparse.Namespace) -> int:
    if args.budget is not None:
        raise ValueError(f"--budget: expected --budgets for kdfast sweep, got --budget {args.budget}")
    extra = [f"sweep.budgets={args.budgets}"] if args.budgets else []
    extra += ["sweep.snapshots=true"] if args.snapshots else []
    return compare.run_reported(compare.load_config(args, extra), sweep, args.resume, "sweep")
