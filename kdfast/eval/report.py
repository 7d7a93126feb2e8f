"""The comparison report: ``results.json``, ``results.md`` and PNG plots (held-out MLM loss against
budget spent, one line per arm; GLUE scores per task and arm).

Ties: two arms whose difference on a GLUE metric is smaller than the larger of their seed spreads
(max - min over seeds) are marked as tied with "≈" in the markdown table and listed in ``ties``.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import List, Optional

from kdfast.train.checkpoint import atomic_open


def _glue_main(row: dict, task: str) -> Optional[float]:
    result = (row.get("glue") or {}).get(task)
    return None if result is None else result["metrics"][result["main_metric"]]


def ties(rows: List[dict], tasks: List[str]) -> List[dict]:
    """Pairs of arms whose GLUE difference on a task is within the seed spread."""
    found = []
    for task in tasks:
        for a, b in itertools.combinations(rows, 2):
            va, vb = _glue_main(a, task), _glue_main(b, task)
            if va is None or vb is None:
                continue
            spread = max(a["glue"][task]["spread"], b["glue"][task]["spread"])
            if abs(va - vb) <= spread:
                found.append({"task": task, "arms": [a["strategy"], b["strategy"]], "difference": abs(va - vb),
                              "seed_spread": spread})
    return found


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def markdown(report: dict) -> str:
    tasks, rows = report["tasks"], report["arms"]
    tied = {(t["task"], arm) for t in report["ties"] for arm in t["arms"]}
    unit = rows[0]["budget_unit"] if rows else ""
    head = ["arm", "strategy", "layers/width", f"budget used ({unit})", "steps", "tokens", "epochs",
            "held-out MLM loss", *tasks, "GLUE avg"]
    lines = [f"# {report['name']}: equal-compute comparison", "",
             f"Budget per arm: {report['budget']}. Corpus: {report['corpus']}. "
             f"Teacher: {report['teacher']['description']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in [*rows, report["teacher"]]:
        if row.get("strategy") is None:
            continue
        cells = [row["arm"], row["strategy"], row["shape"], _fmt(row.get("budget_used"), 1, 4 if unit == "s" else 0),
                 str(row.get("steps", "–")), f"{row['tokens']:,}" if row.get("tokens") is not None else "–",
                 _fmt(row.get("epochs")), _fmt(row.get("final_mlm_loss"), 1, 4)]
        for task in tasks:
            mark = " ≈" if (task, row["strategy"]) in tied and row is not report["teacher"] else ""
            cells.append(_fmt(_glue_main(row, task), 100) + mark)
        cells.append(_fmt(row.get("glue_average"), 100))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "GLUE columns: CoLA MCC, STS-B Pearson, MRPC/QQP F1, accuracy elsewhere (×100, median over seeds "
              f"{report['glue_seeds']}). ≈: within the seed spread of another arm on that task (a tie)."]
    if report["ties"]:
        lines += ["", "Ties:"] + [f"- {t['task']}: {t['arms'][0]} vs {t['arms'][1]} differ by "
                                  f"{100 * t['difference']:.2f}, seed spread {100 * t['seed_spread']:.2f}"
                                  for t in report["ties"]]
    if report.get("notes"):
        lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plots(report: dict, out_dir: Path) -> List[str]:
    """The two PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in report["arms"]:
        curve = row["curve"]
        ax.plot([p["spent"] for p in curve], [p["heldout_mlm_loss"] for p in curve], marker=".", label=row["arm"])
    teacher_loss = report["teacher"].get("final_mlm_loss")
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="grey", linestyle="--", label="teacher")
    unit = report["arms"][0]["budget_unit"] if report["arms"] else ""
    ax.set_xlabel({"s": "budget spent (device-seconds)", "tok": "budget spent (tokens)",
                   "flop": "budget spent (FLOPs)"}.get(unit, "budget spent"))
    ax.set_ylabel("held-out MLM loss")
    ax.set_title("Held-out MLM loss vs budget spent")
    ax.legend()
    fig.tight_layout()
    paths.append(str(out_dir / "mlm_loss.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if report["tasks"]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        rows = [r for r in [*report["arms"], report["teacher"]] if r.get("glue")]
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            values = [100 * (_glue_main(row, t) or 0.0) for t in report["tasks"]]
            errors = [100 * row["glue"][t]["spread"] / 2 if t in row["glue"] else 0 for t in report["tasks"]]
            ax.bar([j + i * width for j in range(len(report["tasks"]))], values, width, yerr=errors, label=row["arm"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(report["tasks"]))], report["tasks"])
        ax.set_ylabel("score ×100 (error bar: half the seed spread)")
        ax.set_title("GLUE-style scores per arm")
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(str(out_dir / "glue.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write(report: dict, out_dir: Path) -> dict:
    """Add ties and plots to ``report`` and write results.json / results.md in ``out_dir``."""
    out_dir = Path(out_dir)
    report["ties"] = ties(report["arms"], report["tasks"])
    report["plots"] = plots(report, out_dir)
    with atomic_open(out_dir / "results.json") as f:
        f.write(json.dumps(report, indent=1).encode())
    with atomic_open(out_dir / "results.md") as f:
        f.write(markdown(report).encode())
    return report
