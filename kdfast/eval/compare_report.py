"""The comparison report: every row's metrics with intervals, verdicts against No-KD, the known-effect
checks (teacher above random-init; each arm against random-init), ``results.json``, ``results.md``
and PNG plots (metrics with error bars; held-out MLM loss against budget spent).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from kdfast.eval import nested, stats
from kdfast.runtime.io import atomic_open

BASELINE, FLOOR, CEILING = "no-kd", "random-init", "teacher"


def _main_metrics(names) -> List[str]:
    """Metrics shown in tables and checked: probes, MLM-head probe, each GLUE task's main metric."""
    return [n for n in names if n.count("/") <= 1]


def analyse(rows: List[dict], evaluations: Dict[str, list], higher_is_better, level: float) -> dict:
    """Adds ``metrics`` (estimates over replicates, ``kdfast.eval.nested``) to each row and returns the
    verdicts against No-KD and the known-effect checks against random-init.

    ``rows`` carry ``arm`` and ``strategy``; ``evaluations`` maps arm -> [``suite.Evaluation``], one per
    pretraining replicate (one for the teacher, held fixed)."""
    for row in rows:
        runs = evaluations.get(row["arm"])
        row["metrics"] = {} if not runs else {
            name: nested.estimate([run.scores[name] for run in runs], level, higher_is_better(name))
            for name in runs[0].scores}
    by_strategy = {row["strategy"]: row for row in rows}
    names = _main_metrics(next((list(runs[0].scores) for runs in evaluations.values() if runs), []))

    def compare(a: dict, b: dict, metric: str) -> Optional[dict]:
        runs_a, runs_b = evaluations[a["arm"]], evaluations[b["arm"]]
        if any(metric not in run.scores for run in [*runs_a, *runs_b]):
            return None
        return {"arm": a["arm"], "against": b["arm"], "metric": metric,
                **nested.compare([r.scores[metric] for r in runs_a], [r.scores[metric] for r in runs_b], level)}

    family = []
    baseline = by_strategy.get(BASELINE)
    for row in rows:
        if baseline is None or row["strategy"] in (BASELINE, FLOOR, CEILING):
            continue
        family += [c for c in (compare(row, baseline, m) for m in names) if c is not None]
    verdicts = nested.verdicts(family, [higher_is_better(c["metric"]) for c in family], level)
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
    checks = nested.verdicts(checks, [higher_is_better(c["metric"]) for c in checks], level)
    replicates = max((len(runs) for runs in evaluations.values()), default=1)
    return {"metrics": names, "verdicts": verdicts, "checks": checks, "replicates": replicates,
            "components": components_by_metric(rows, names)}


def components_by_metric(rows: List[dict], names: List[str]) -> Dict[str, dict]:
    """Per metric, the variance components averaged over the trained arms (``nested.components``), as SDs,
    and their shares of the variance of an arm's mean."""
    out = {}
    for metric in names:
        entries = [r["metrics"][metric] for r in rows
                   if metric in r["metrics"] and r["strategy"] not in (FLOOR, CEILING)]
        if not entries:
            continue
        mean = {}
        for key in ("components", "shares"):
            mean[key] = {part: (None if any(e[key][part] is None for e in entries)
                                else sum(e[key][part] for e in entries) / len(entries)) for part in nested.COMPONENTS}
        out[metric] = {"sd": {k: None if v is None else v ** 0.5 for k, v in mean["components"].items()},
                       "shares": mean["shares"], "replicates": entries[0]["replicates"], "seeds": entries[0]["seeds"],
                       "n": entries[0]["n"]}
    return out


def _cell(estimate: Optional[dict], digits: int = 3) -> str:
    if not estimate:
        return "–"
    return f"{estimate['mean']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _steps(row: dict) -> str:
    """Every replicate's steps ('415/409/420'): a time budget buys each run its own number."""
    runs = [r for r in row.get("replicates") or [row] if r.get("steps") is not None]
    return "/".join(str(r["steps"]) for r in runs) if runs else str(row.get("steps", "–"))


def _replicate_mean(row: dict, key: str):
    values = [r[key] for r in row.get("replicates") or [row] if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _replicates_text(replicates: int) -> str:
    if replicates == 1:
        return ("one pretraining run per arm (train.replicates=1): the intervals cover probe/fine-tuning seeds and "
                "evaluation examples, not the variance between pretraining runs.")
    return (f"{replicates} pretraining runs per arm and of the random-init floor (train.replicates), replicate r with "
            "its own seed for initial weights, data order and masks, shared by every arm (paired); the teacher is "
            "pretrained once and held fixed (its row is one model, compared as a constant).")


def _verdicts_section(analysis: dict, level: int) -> List[str]:
    """Each strategy against No-KD: difference, nested bootstrap and t intervals, tests, verdict."""
    found = analysis["verdicts"]
    tests = sorted({v["test"] for v in found if v.get("test")})
    lines = [f"## Verdicts: each strategy against No-KD ({'; '.join(tests) or 'no replicate-level test'}, "
             f"Benjamini-Hochberg across the {len(found)} comparisons)", ""]
    fewest = min((min(v["replicates"]) for v in found), default=1)
    if fewest < nested.MIN_REPLICATES:
        lines += [f"**No better/worse calls with R = {fewest}.** {nested.replicates_needed_text(level / 100)}", ""]
    lines += [f"| arm | metric | difference | nested bootstrap {level}% | t-test {level}% | p | p (BH) | verdict | "
              "smallest detectable |", "|---|---|---|---|---|---|---|---|---|"]
    for v in found:
        t = "–" if v.get("t_low") is None else f"[{v['t_low']:+.3f}, {v['t_high']:+.3f}]"
        lines.append(f"| {v['arm']} | {v['metric']} | {v['difference']:+.3f} | [{v['low']:+.3f}, {v['high']:+.3f}] | "
                     f"{t} | {number(v.get('p_value'), 3)} | {number(v.get('p_adjusted'), 3)} | **{v['verdict']}** "
                     f"| "
                     f"{number(v.get('min_detectable'), 3)} |")
    return lines + ["", "A call needs the Benjamini-Hochberg-adjusted p of the replicate-level test below "
                    f"{1 - level / 100:.2g} and R >= {nested.MIN_REPLICATES} replicates per arm. The nested bootstrap "
                    "interval resamples replicates, then seeds, then examples; with few replicates it is narrower than "
                    "the t-test's, which is the one the call rests on. Smallest detectable: the difference the t-test "
                    "finds with power 0.8 after the adjustment (at the Bonferroni level), from the measured SD of a "
                    "replicate's difference (replicate and seed components)."]


def _components_section(analysis: dict) -> List[str]:
    """Per metric: SDs between replicates, between seeds and from the examples, and their shares."""
    found = analysis.get("components") or {}
    if not found:
        return []

    def sd(value):
        return "–" if value is None else f"{value:.4f}"

    def share(value):
        return "–" if value is None else f"{100 * value:.0f}%"

    first = next(iter(found.values()))
    lines = ["## Where the variance comes from", "",
             f"Per metric, averaged over the trained arms ({first['replicates']} replicates x {first['seeds']} seeds x "
             f"{first['n']} examples for the first metric): the SD between pretraining replicates (of a replicate's "
             "mean), between probe/fine-tuning seeds within a replicate (of one seed's score), and of a mean over the "
             "evaluation examples (bootstrap), then each one's share of the variance of an arm's mean "
             "(replicate²/R + seed²/(R·S) + examples²). Balanced nested ANOVA, method of moments; '–': one level "
             "only.",
             "", "| metric | SD replicates | SD seeds | SD examples | share replicates | share seeds | share "
             "examples |", "|---|---|---|---|---|---|---|"]
    for metric, entry in found.items():
        lines.append(f"| {metric} | {sd(entry['sd']['replicate'])} | {sd(entry['sd']['seed'])} | "
                     f"{sd(entry['sd']['examples'])} | {share(entry['shares']['replicate'])} | "
                     f"{share(entry['shares']['seed'])} | {share(entry['shares']['examples'])} |")
    return lines


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
             f"Each metric: mean over replicates and seeds [{level}% nested bootstrap interval]; replicates per arm: "
             f"{analysis.get('replicates', 1)} (steps: each replicate's). Held-out MLM loss (replicate mean) only for "
             "arms that train their MLM head; `mlm_probe` (lower is better) compares every arm.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["arm"], row["strategy"], row.get("shape", "–"),
                 number(row.get("budget_used"), 2 if unit == "s" else 0), _steps(row),
                 f"{row['tokens']:,}" if row.get("tokens") is not None else "–", number(row.get("epochs")),
                 number(_replicate_mean(row, "final_mlm_loss") if row.get("trains_mlm_head", True) else None, 4)]
        cells += [_cell(row["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_verdicts_section(analysis, level)]
    lines += ["", "## Known effects: every row against random-init (same shape as the students, zero budget)", "",
              f"| row | metric | difference [{level}% interval] | intervals separated | p (BH) | verdict |",
              "|---|---|---|---|---|---|"]
    for c in analysis["checks"]:
        lines.append(f"| {c['arm']} | {c['metric']} | {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | "
                     f"{'yes' if c['separated'] else 'no'} | {number(c['p_adjusted'], 3)} | {c['verdict']} |")
    power = _power_notes(report)
    if power:
        lines += ["", "Power:"] + [f"- {note}" for note in power]
    components = _components_section(analysis)
    if components:
        lines += ["", *components]
    lines += ["", "## Method", ""] + [f"- {key}: {json.dumps(value) if not isinstance(value, str) else value}"
                                      for key, value in report["evaluation"].items()]
    lines.append(f"- pretraining replicates: {_replicates_text(analysis.get('replicates', 1))}")
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
        level = round(100 * report["evaluation"]["level"])
        fig.suptitle(f"Mean over replicates and seeds, {level}% nested bootstrap intervals")
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
