"""The sweep report: ``sweep.json``, ``sweep.md`` and one PNG per metric (metric against budget, log x).

Input: a sweep result with ``cells`` (one row per (budget, strategy): ``cell`` tag, ``cell_amount`` in
``budget_unit``, steps, tokens, epochs and ``metrics[name] = {mean, low, high, se, level,
higher_is_better, method, ...}``), ``metrics`` (the names to report), ``references`` (teacher and
random-init rows, drawn as horizontal lines), ``verdicts`` (per budget tag, the paired tests of
``kdfast.eval.compare_report.analyse``), ``teacher_charge`` (``amount`` in the budget's unit) and ``baseline``
(no-kd). Added: ``trends`` (per metric and strategy, the fit of
``kdfast.eval.trends``) and ``crossovers`` (each KD strategy against the baseline, without and, when a
charge is set, with the teacher's cost added to the KD cells' budget).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from kdfast.budget.units import Budget
from kdfast.eval import compare_report as report
from kdfast.eval import nested, trends


def metric_names(result: dict) -> List[str]:
    """The metrics to report: ``result['metrics']``, else every metric a cell has (first seen first)."""
    names = list(result.get("metrics") or [])
    for cell in [] if names else result["cells"]:
        names += [m for m in cell.get("metrics") or {} if m not in names]
    return names


def _se(entry: dict) -> float:
    """The cell's standard error, or its interval's half-width over the normal quantile of its level."""
    if entry.get("se") is not None:
        return float(entry["se"])
    from scipy.stats import norm

    return (entry["high"] - entry["low"]) / (2 * norm.ppf(0.5 + entry.get("level", 0.95) / 2))


def series(cells: List[dict], strategy: str, metric: str, shift: float = 0.0) -> Optional[trends.Series]:
    """The strategy's cells that have ``metric``, budgets shifted by ``shift``; None below 2 budgets."""
    rows = [c for c in cells if c["strategy"] == strategy and (c.get("metrics") or {}).get(metric)]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda c: c["cell_amount"])
    entries = [c["metrics"][metric] for c in rows]
    counts = {len(e.get("per_replicate") or []) for e in entries}
    replicates = [e["per_replicate"] for e in entries] if len(counts) == 1 and counts.pop() >= 2 else None
    return trends.Series.of([c["cell_amount"] + shift for c in rows], [e["mean"] for e in entries],
                            [_se(e) for e in entries], replicates)


def higher_is_better(cells: List[dict], metric: str) -> bool:
    return next(c["metrics"][metric].get("higher_is_better", True) for c in cells if metric in (c.get("metrics") or {}))


def _reading(found: dict, strategy: str, baseline: str, better_high: bool, unit: str) -> str:
    """``found`` in words: who is ahead below and above the crossing."""
    if found["other_minus_base"] is None:
        return found["verdict"]
    ahead_low = (found["other_minus_base"][0] > 0) == better_high
    first, second = (strategy, baseline) if ahead_low else (baseline, strategy)
    if found["verdict"] == "crossover not resolved":
        return "the curves are within their noise at an end of the range: no resolved crossing"
    if found["verdict"] != "crossover":
        if found["estimate"] is not None:
            return "the fitted trends cross, but fewer than half the bootstrap draws do: not resolved"
        resolved = all(a * b > 0 for a, b in zip(found["ends_low"], found["ends_high"]))
        return f"{first} ahead across the range" + ("" if resolved else " (fitted; within the noise at an end)")
    return f"{first} ahead below ≈{_budget(found['estimate'], unit)}, {second} above"


def analyse(result: dict) -> None:
    """Fill ``result['trends']`` and ``result['crossovers']``."""
    cells, baseline, unit = result["cells"], result["baseline"], result["budget_unit"]
    charge = result["teacher_charge"]["amount"]
    result["trends"], result["crossovers"] = {}, []
    strategies = result["strategies"]
    for metric in metric_names(result):
        fits = {}
        for name in strategies:
            cell_series = series(cells, name, metric)
            if cell_series is not None:
                fitted = trends.choose(cell_series)
                fits[name] = {"form": fitted.form, "params": fitted.params, "x0": fitted.x0,
                              "describe": fitted.describe()}
        result["trends"][metric] = fits
        base = series(cells, baseline, metric)
        if base is None:
            continue
        for name in strategies:
            for shift in ([0.0, charge] if charge else [0.0]):
                other = series(cells, name, metric, shift)
                if name == baseline or other is None:
                    continue
                found = trends.crossover(base, other, draws=result.get("draws", 1000))
                result["crossovers"].append({"metric": metric, "strategy": name, "baseline": baseline,
                                             "teacher_charge": shift, **found,
                                             "reading": _reading(found, name, baseline,
                                                                 higher_is_better(cells, metric), unit)})


def _interval(entry: Optional[dict]) -> str:
    if not entry:
        return "–"
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _budget(value: Optional[float], unit: str) -> str:
    """A budget to 3 significant digits: '412s', '1.2h', '3.07e+06tok'."""
    return "–" if value is None else str(Budget(float(f"{value:.3g}"), unit))


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _cells_section(result: dict, metrics: List[str], level: int) -> List[str]:
    """Every cell (budgets ascending), then the reference rows, each metric as mean [low, high]."""
    unit, order = result["budget_unit"], result["strategies"]
    rows = []
    for row in [*sorted(result["cells"], key=lambda c: (c["cell_amount"], order.index(c["strategy"]))),
                *result.get("references", [])]:
        used = row.get("budget_used")
        rows.append([row.get("cell", "–"), row["strategy"], row.get("shape", "?"), str(row.get("steps", "–")),
                     f"{row['tokens']:,}" if row.get("tokens") is not None else "–",
                     "–" if row.get("epochs") is None else f"{row['epochs']:.2f}",
                     "–" if used is None else f"{used:.4g}",
                     *(_interval((row.get("metrics") or {}).get(m)) for m in metrics)])
    head = ["budget", "strategy", "layers/width", "steps", "tokens", "epochs", f"budget used ({unit})", *metrics]
    return ["## Cells", "", *_table(head, rows), "",
            f"Each metric: mean [{level}% interval] (kdfast.eval.stats; method in sweep.json `evaluation`). Rows "
            "without a budget are references: the teacher and a random-init student."]


def _trends_section(result: dict) -> List[str]:
    lines = ["## Trends", ""]
    for metric, fits in result["trends"].items():
        lines.append(f"- {metric}: " + "; ".join(f"{name}: {fit['describe']}" for name, fit in fits.items()))
    return lines + ["", f"Fitted by weighted least squares (weights 1/cell SE), x = budget in {result['budget_unit']}: "
                    f"log-linear, or the saturating power law where there are {trends.POWER_FROM}+ budgets and it "
                    "has the lower AIC."]


def _crossovers_section(result: dict) -> List[str]:
    unit, policy = result["budget_unit"], result["teacher_charge"]["policy"]
    rows = []
    for c in result["crossovers"]:
        charged = f"{policy} (+{_budget(c['teacher_charge'], unit)})" if c["teacher_charge"] else "none"
        interval = f"{_budget(c['low'], unit)} – {_budget(c['high'], unit)}" if c["low"] is not None else "–"
        rows.append([c["metric"], c["strategy"], charged, c["verdict"], _budget(c["estimate"], unit), interval,
                     f"{100 * c['crossing_fraction']:.0f}%", c["reading"]])
    head = ["metric", "strategy", "teacher charge", "verdict", "estimate", "95% interval", "draws crossing", "reading"]
    return [f"## Crossovers with {result['baseline']}", "", *_table(head, rows), "",
            "Crossing: the first sign change of the difference of the two fitted trends (fitted through the "
            "replicate means), within the budgets both cover; interval: bootstrap with "
            f"{result.get('draws', 1000)} draws, 2.5/97.5 percentiles of the crossings. With 2 or more pretraining "
            "replicates per cell each draw resamples the replicates (the same indices for every cell of both "
            "strategies, paired by seed); with one, each cell is redrawn independently from N(mean, SE) although "
            "every cell is scored on the same evaluation examples (conservative for differences). 'crossover' also "
            "needs the difference resolved from zero, with opposite signs, at both ends of the range; 'no crossover "
            "in range': fewer than half the draws change sign there."]


def _verdicts_section(result: dict, level: int) -> List[str]:
    """The paired tests against the baseline at each budget (``kdfast.eval.compare_report.analyse``)."""
    found = [(tag, v) for tag, verdicts in (result.get("verdicts") or {}).items() for v in verdicts]
    if not found:
        return []
    rows = [[tag, v["arm"], v["metric"], f"{v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]",
             report.number(v.get("p_adjusted"), 3), v["verdict"], report.number(v.get("min_detectable"), 3)]
            for tag, v in found]
    head = ["budget", "arm", "metric", f"difference [{level}% nested bootstrap interval]", "p (BH)", "verdict",
            "smallest detectable"]
    tests = sorted({v["test"] for _, v in found if v.get("test")})
    tested = "; ".join(tests) or "no replicate-level test"
    lines = [f"## Verdicts at each budget against {result['baseline']} ({tested})", ""]
    fewest = min(min(v["replicates"]) for _, v in found) if all("replicates" in v for _, v in found) else 1
    if fewest < nested.MIN_REPLICATES:
        lines += [f"**No better/worse calls with R = {fewest}.** {nested.replicates_needed_text(level / 100)}", ""]
    return lines + _table(head, rows)


def _notes(result: dict) -> List[str]:
    notes, charge = list(result.get("notes") or []), result["teacher_charge"]
    if result.get("limited_data"):
        notes.append(f"Limited data: {result['unique_tokens']:,} unique training tokens, repeated (epochs per cell "
                     "in the table).")
    if charge["amount"]:
        notes.append(f"Teacher charge {charge['policy']}: {charge['amount']:.4g} {result['budget_unit']} added to "
                     "each KD cell's budget in the charged crossovers and the shifted curves (training is the same).")
    return ["## Notes", ""] + [f"- {n}" for n in notes] if notes else []


def markdown(result: dict) -> str:
    level = round(100 * (result.get("evaluation") or {}).get("level", 0.95))
    fp = result.get("fingerprint") or {}
    sections = [[f"# {result['name']}: comparison across budgets"],
                [f"> **Approximation.** {result['approximation']}"] if result.get("approximation") else [],
                [f"Budgets: {', '.join(result['budgets'])} per cell. Corpus: {result['corpus']}. "
                 f"Teacher: {result['teacher'].get('description', '?')}.",
                 "Fingerprint: " + ", ".join(f"{k} {v['sha256']}" for k, v in fp.items()) + "."],
                _cells_section(result, metric_names(result), level), _trends_section(result),
                _crossovers_section(result) if result["crossovers"] else [], _verdicts_section(result, level),
                ["## Time per phase (wall seconds)", ""] + [f"- {k}: {v:.0f}" for k, v in result["timings"].items()]
                if result.get("timings") else [], _notes(result)]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def plots(result: dict, out_dir: Path) -> List[str]:
    """``sweep_<metric>.png`` per metric: cell means with their interval bands, fitted trends (dashed) and,
    with a teacher charge, the KD cells shifted right by it (dotted); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells, unit, charge = result["cells"], result["budget_unit"], result["teacher_charge"]
    paths = []
    for metric in metric_names(result):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row, style in zip(result.get("references", []), ("--", ":")):
            entry = (row.get("metrics") or {}).get(metric)
            if entry:
                ax.axhline(entry["mean"], color="grey", linestyle=style, linewidth=1, label=row["strategy"])
        for index, name in enumerate(result["strategies"]):
            rows = sorted((c for c in cells if c["strategy"] == name and metric in (c.get("metrics") or {})),
                          key=lambda c: c["cell_amount"])
            if not rows:
                continue
            color = f"C{index}"
            shifts = [0.0, charge["amount"]] if charge["amount"] and name != result["baseline"] else [0.0]
            for shift in shifts:
                x = np.array([c["cell_amount"] + shift for c in rows])
                entries = [c["metrics"][metric] for c in rows]
                style = ":" if shift else "-"
                label = f"{name} + teacher ({charge['policy']})" if shift else name
                ax.fill_between(x, [e["low"] for e in entries], [e["high"] for e in entries], color=color,
                                alpha=0.1 if shift else 0.2, linewidth=0)
                ax.plot(x, [e["mean"] for e in entries], style, marker="s" if shift else "o", color=color,
                        markerfacecolor="none" if shift else color, label=label)
            fit = result["trends"].get(metric, {}).get(name)
            if fit:
                grid = np.geomspace(rows[0]["cell_amount"], rows[-1]["cell_amount"], 64)
                ax.plot(grid, trends.Fit(fit["form"], fit["params"], fit["x0"])(grid), "--", color=color,
                        linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel({"s": "budget (device-seconds)", "tok": "budget (tokens)", "flop": "budget (FLOPs)"}[unit])
        ax.set_ylabel(metric)
        title = f"{metric} vs budget (bands: cell intervals; dashed: fitted trend)"
        ax.set_title(title + ("\nAPPROXIMATION: snapshots of one long run" if result.get("approximation") else ""),
                     fontsize="medium")
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(str(Path(out_dir) / f"sweep_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write(result: dict, out_dir: Path) -> dict:
    """Analyse ``result``, draw the plots and write ``sweep.json`` and ``sweep.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analyse(result)
    result["plots"] = plots(result, out_dir)
    report.write_files(out_dir, "sweep", result, markdown(result))
    return result
