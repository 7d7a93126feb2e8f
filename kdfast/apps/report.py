"""``kdfast report DIR [DIR ...]``: one report across budgets from existing output folders.

Each folder holds ``sweep.json`` (``kdfast sweep``) and/or ``results.json`` (``kdfast compare``, one budget);
their cells are pooled and reported as a sweep (``kdfast.eval.sweep_report``) in ``--out``. Refused, with
the field and both values: folders whose corpus, tokenizer or teacher differ (their fingerprints), another
budget unit, another student shape for a strategy, or the same (budget, strategy) cell twice.
A compare arm trained with a charged teacher counts at the budget its student really spent.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Tuple

from kdfast.budget.units import Budget
from kdfast.eval import fingerprint, sweep_report
from kdfast.eval.compare_report import CEILING, FLOOR


def load(folder: Path) -> List[Tuple[str, dict]]:
    """(file, result in the sweep form) for each of the folder's ``sweep.json`` and ``results.json`` (a
    sweep run with ``out`` = a compare folder holds both)."""
    found = [(str(Path(folder) / name), reader(Path(folder) / name))
             for name, reader in (("sweep.json", _sweep_json), ("results.json", _compare_json))
             if (Path(folder) / name).is_file()]
    if not found:
        raise ValueError(f"report: expected sweep.json or results.json in {str(folder)!r}, got neither")
    return found


def _sweep_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _compare_json(path: Path) -> dict:
    """A compare result as one budget's cells (``cells`` with ``cell``/``cell_amount``)."""
    result = json.loads(path.read_text())
    references = [r for r in result["rows"] if r["strategy"] in (CEILING, FLOOR)]
    cells = []
    for arm in (r for r in result["rows"] if r not in references):
        spent = arm["budget_amount"] - arm.get("teacher_charge", 0.0)  # what the student itself was given
        cells.append({**arm, "cell": Budget(spent, arm["budget_unit"]).tag, "cell_amount": spent})
    return {"kind": "compare", "name": result["name"], "budget_unit": cells[0]["budget_unit"], "cells": cells,
            "strategies": [c["strategy"] for c in cells], "corpus": result["corpus"],
            "limited_data": result["config"]["data"]["unique_tokens"] is not None,
            "unique_tokens": result.get("unique_tokens"), "fingerprint": result.get("fingerprint"),
            "teacher": result["teacher"], "references": references, "approximation": None,
            "metrics": result["analysis"]["metrics"], "verdicts": {cells[0]["cell"]: result["analysis"]["verdicts"]},
            "evaluation": result.get("evaluation")}


def merge(named: List[Tuple[str, dict]], charge: str = "none", draws: int = 1000) -> dict:
    """One sweep-form result from (folder name, result) pairs, checked as the module says."""
    from kdfast.budget.units import charge_fraction

    fingerprint.check_same([(name, result.get("fingerprint")) for name, result in named])
    first_name, first = named[0]
    cells, seen, shapes = [], {}, {}
    for name, result in named:
        if result["budget_unit"] != first["budget_unit"]:
            raise ValueError(f"{name}: expected the budget unit of {first_name}, {first['budget_unit']}, got "
                             f"{result['budget_unit']}")
        for cell in result["cells"]:
            key = (cell["cell"], cell["strategy"])
            if key in seen:
                raise ValueError(f"{name}: expected cells not already in {seen[key]}, got {'/'.join(key)} in both")
            if shapes.setdefault(cell["strategy"], (name, cell["shape"]))[1] != cell["shape"]:
                other, shape = shapes[cell["strategy"]]
                raise ValueError(f"{name}: expected {cell['strategy']} students of {other}'s shape {shape}, got "
                                 f"{cell['shape']}")
            seen[key] = name
            cells.append({**cell, "source": name})
    strategies, metrics, verdicts = [], [], {}
    for _, result in named:
        strategies += [s for s in result["strategies"] if s not in strategies]
        metrics += [m for m in result.get("metrics") or [] if m not in metrics]
        verdicts.update(result.get("verdicts") or {})
    approximated = [name for name, result in named if result.get("approximation")]
    teacher = first["teacher"]
    spent = teacher.get("budget_used") if teacher.get("budget_unit", first["budget_unit"]) == first["budget_unit"] \
        else None
    fraction = charge_fraction(charge)
    return {"kind": "report", "name": "report", "sources": [name for name, _ in named],
            "budget_unit": first["budget_unit"],
            "budgets": sorted({c["cell"] for c in cells}, key=lambda tag: next(c["cell_amount"] for c in cells
                                                                               if c["cell"] == tag)),
            "strategies": strategies, "baseline": "no-kd",
            "approximation": (f"cells from {', '.join(approximated)} are snapshots of one long run (their LR "
                              "schedule is the long run's)") if approximated else None,
            "corpus": first["corpus"], "limited_data": first.get("limited_data"),
            "unique_tokens": first.get("unique_tokens"), "fingerprint": first["fingerprint"],
            "teacher": teacher, "references": first.get("references", [teacher]), "cells": cells, "draws": draws,
            "metrics": metrics, "verdicts": verdicts, "evaluation": first.get("evaluation"),
            "teacher_charge": {"policy": charge, "fraction": fraction, "amount": fraction * (spent or 0.0),
                               "unit": first["budget_unit"], "teacher_budget_used": spent},
            "notes": [f"Merged from {len(named)} results: {', '.join(name for name, _ in named)}.",
                      *_evaluation_notes(named)]}


def _evaluation_notes(named: List[Tuple[str, dict]]) -> List[str]:
    """A note per result evaluated with other settings than the first (the means stay comparable; the
    intervals reflect each result's own seeds and sample sizes)."""
    first_name, first = named[0]
    notes = []
    for name, result in named[1:]:
        changed = fingerprint.differences(first.get("evaluation") or {}, result.get("evaluation") or {})
        if changed:
            notes.append(f"{name} was evaluated with other settings than {first_name}: " + "; ".join(
                f"{key} {old!r} there, {new!r} here" for key, old, new in changed[:4]))
    return notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="output folders of kdfast compare or kdfast sweep")
    parser.add_argument("--out", default="runs/report", help="folder for sweep.json, sweep.md and the plots")
    parser.add_argument("--charge-teacher", default="none", help="none | full | amortized:N (shift the KD cells)")
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap draws per crossover interval")


def run(args: argparse.Namespace) -> int:
    merged = merge([found for d in args.dirs for found in load(Path(d))], args.charge_teacher, args.draws)
    sweep_report.write(merged, Path(args.out))
    print((Path(args.out) / "sweep.md").read_text())
    print(f"report: {Path(args.out) / 'sweep.md'}, {Path(args.out) / 'sweep.json'}, " + ", ".join(merged["plots"]))
    return 0
