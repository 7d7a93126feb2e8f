"""The comparison report: every row's metrics with intervals, verdicts against No-KD, the known-effect
checks (teacher above random-init; each arm against random-init), ``results.json``, ``results.md``
and PNG plots (metrics with error bars; held-out MLM loss against budget spent).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from kdfast.eval import stats
from kdfast.runtime.io import atomic_open

BASELINE, FLOOR, CEILING = "no-kd", "random-init", "teacher"


def _main_metrics(names) -> List[str]:
    """Metrics shown in tables and checked: probes, MLM-head probe, each GLUE task's main metric."""
    return [n for n in names if n.count("/") <= 1]


def analyse(rows: List[dict], evaluations: Dict[str, "object"], higher_is_better, level: float) -> dict:
    """Adds ``metrics`` (estimates) to each row and returns the verdicts and known-effect checks.

    ``rows`` carry ``arm`` and ``strategy``; ``evaluations`` maps arm -> ``suite.Evaluation``."""
    for row in rows:
        evaluation = evaluations.get(row["arm"])
        row["metrics"] = {} if evaluation is None else {
            name: stats.estimate(s, level, higher_is_better(name)) for name, s in evaluation.scores.items()}
    by_strategy = {row["strategy"]: row for row in rows}
    names = _main_metrics(next((list(e.scores) for e in evaluations.values()), []))

    def compare(a: dict, b: dict, metric: str) -> Optional[dict]:
        sa, sb = evaluations[a["arm"]].scores.get(metric), evaluations[b["arm"]].scores.get(metric)
        if sa is None or sb is None:
            return None
        return {"arm": a["arm"], "against": b["arm"], "metric": metric, **stats.paired_comparison(sa, sb, level)}

    family = []
    baseline = by_strategy.get(BASELINE)
    for row in rows:
        if baseline is None or row["strategy"] in (BASELINE, FLOOR, CEILING):
            continue
        family += [c for c in (compare(row, baseline, m) for m in names) if c is not None]
    verdicts = stats.verdicts(family, [higher_is_better(c["metric"]) for c in family], level)
    checks = []
    floor = by_strategy.get(FLOOR)
    for row in rows:
        if floor is None or row is floor:
            continue
        for metric in names:
            comparison = compare(row, floor, metric)
            if comparison is None:
                continue
            a, b = row["metrics"][metric], floor["metrics"][metric]
            above = (a["mean"] > b["mean"]) == higher_is_better(metric)
            comparison.update(separated=stats.separated(a, b), holds=stats.separated(a, b) and above)
            checks.append(comparison)
    checks = stats.verdicts(checks, [higher_is_better(c["metric"]) for c in checks], level)
    return {"metrics": names, "verdicts": verdicts, "checks": checks}


def _cell(estimate: Optional[dict], digits: int = 3) -> str:
    if not estimate:
        return "–"
    return f"{estimate['mean']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _power_notes(report: dict) -> List[str]:
    """Per metric: whether the teacher separates from random-init (else no power), and which arms don't."""
    notes, weak = [], {}
    for check in report["analysis"]["checks"]:
        if check["holds"]:
            continue
        if check["arm"] == CEILING:
            notes.append(f"{check['metric']}: the teacher's interval is not separated from random-init's, so this "
                         f"evaluation has no power at this budget on {check['metric']} (it cannot show the known "
                         f"effect, so it cannot show anything smaller).")
        else:
            weak.setdefault(check["metric"], []).append(check["arm"])
    notes += [f"{metric}: not separated from random-init: {', '.join(arms)}." for metric, arms in weak.items()]
    return notes


def markdown(report: dict) -> str:
    rows, analysis = report["rows"], report["analysis"]
    metrics = analysis["metrics"]
    unit = next((r["budget_unit"] for r in rows if r.get("budget_unit")), "")
    head = ["arm", "strategy", "layers/width", f"budget used ({unit})", "steps", "tokens", "epochs",
            "held-out MLM loss", *metrics]
    level = round(100 * report["evaluation"]["level"])
    lines = [f"# {report['name']}: equal-compute comparison", "",
             f"Budget per arm: {report['budget']}. Corpus: {report['corpus']}. "
             f"Teacher: {report['teacher']['description']}.", "",
             f"Each metric: mean over seeds [{level}% interval]. Held-out MLM loss only for arms that train their "
             "MLM head; `mlm_probe` (lower is better) compares every arm.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["arm"], row["strategy"], row.get("shape", "–"),
                 _number(row.get("budget_used"), 2 if unit == "s" else 0), str(row.get("steps", "–")),
                 f"{row['tokens']:,}" if row.get("tokens") is not None else "–", _number(row.get("epochs")),
                 _number(row.get("final_mlm_loss") if row.get("trains_mlm_head", True) else None, 4)]
        cells += [_cell(row["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    test = analysis["verdicts"][0]["test"] if analysis["verdicts"] else "no comparisons"
    lines += ["", f"## Verdicts: each strategy against No-KD ({test})",
              "", f"| arm | metric | difference [{level}% interval] | p | p (BH) | verdict | smallest detectable |",
              "|---|---|---|---|---|---|---|"]
    for v in analysis["verdicts"]:
        lines.append(f"| {v['arm']} | {v['metric']} | {v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}] | "
                     f"{v['p_value']:.3f} | {v['p_adjusted']:.3f} | **{v['verdict']}** | {v['min_detectable']:.3f} |")
    lines += ["", "## Known effects: every row against random-init (same shape as the students, zero budget)", "",
              f"| row | metric | difference [{level}% interval] | intervals separated | p (BH) | verdict |",
              "|---|---|---|---|---|---|"]
    for c in analysis["checks"]:
        lines.append(f"| {c['arm']} | {c['metric']} | {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | "
                     f"{'yes' if c['separated'] else 'no'} | {c['p_adjusted']:.3f} | {c['verdict']} |")
    power = _power_notes(report)
    if power:
        lines += ["", "Power:"] + [f"- {note}" for note in power]
    lines += ["", "## Method", ""] + [f"- {key}: {json.dumps(value) if not isinstance(value, str) else value}"
                                      for key, value in report["evaluation"].items()]
    lines.append("- pretraining seed: one pretraining run per arm; the intervals cover fine-tuning/probe seeds and "
                 "evaluation examples, not the variance between pretraining runs.")
    if report.get("timings"):
        lines += ["", "## Time per phase (wall seconds)", ""]
        lines += [f"- {k}: {v:.0f}" for k, v in report["timings"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plots(report: dict, out_dir: Path) -> List[str]:
    """``metrics.png`` (one panel per metric, error bars = intervals) and ``mlm_loss.png``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metrics = report["analysis"]["metrics"]
    rows = [r for r in report["rows"] if r["metrics"]]
    if metrics and rows:
        columns = min(3, len(metrics))
        lines = -(-len(metrics) // columns)
        fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 0.45 * len(rows) * lines + 1.2 * lines),
                                 squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            shown = [r for r in rows if metric in r["metrics"]]
            means = [r["metrics"][metric]["mean"] for r in shown]
            errors = [[m - r["metrics"][metric]["low"] for m, r in zip(means, shown)],
                      [r["metrics"][metric]["high"] - m for m, r in zip(means, shown)]]
            ax.errorbar(means, range(len(shown)), xerr=errors, fmt="o", capsize=3)
            ax.set_yticks(range(len(shown)), [r["arm"] for r in shown], fontsize="small")
            ax.set_title(metric + (" (lower is better)" if not shown or not shown[0]["metrics"][metric]
                                   ["higher_is_better"] else ""), fontsize="medium")
            ax.invert_yaxis()
        for ax in list(axes.flat)[len(metrics):]:
            ax.set_visible(False)
        fig.suptitle(f"Mean over seeds, {round(100 * report['evaluation']['level'])}% bootstrap intervals")
        fig.tight_layout()
        paths.append(str(out_dir / "metrics.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    curves = [r for r in report["rows"] if r.get("curve") and r.get("trains_mlm_head", True)]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row in curves:
            ax.plot([p["spent"] for p in row["curve"]], [p["heldout_mlm_loss"] for p in row["curve"]], marker=".",
                    label=row["arm"])
        unit = curves[0].get("budget_unit", "")
        ax.set_xlabel({"s": "budget spent (device-seconds)", "tok": "budget spent (tokens)",
                       "flop": "budget spent (FLOPs)"}.get(unit, "budget spent"))
        ax.set_ylabel("held-out MLM loss")
        ax.set_title("Held-out MLM loss vs budget spent (arms that train their MLM head)")
        ax.legend()
        fig.tight_layout()
        paths.append(str(out_dir / "mlm_loss.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write(report: dict, out_dir: Path) -> dict:
    """Add plots to ``report`` and write results.json / results.md in ``out_dir``."""
    out_dir = Path(out_dir)
    report["plots"] = plots(report, out_dir)
    write_files(out_dir, "results", report, markdown(report))
    return report


def write_files(out_dir: Path, stem: str, result: dict, text: str) -> None:
    """``stem.json`` (``result``) and ``stem.md`` (``text``) in ``out_dir``, each written atomically."""
    with atomic_open(Path(out_dir) / f"{stem}.json") as f:
        f.write(json.dumps(result, indent=1).encode())
    with atomic_open(Path(out_dir) / f"{stem}.md") as f:
        f.write(text.encode())
