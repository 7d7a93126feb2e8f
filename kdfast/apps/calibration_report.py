"""The calibration report as markdown (in the study's wording) and as a PNG chart."""
from __future__ import annotations

from pathlib import Path

from kdfast.train.step import PHASES

LABELS = {"no-kd": "No-KD", "vanilla": "VanillaKD", "distilbert": "DistilBERT", "tinybert": "TinyBERT",
          "minilm": "MiniLM", "minilm_v2": "MiniLMv2", "vanilla-cached-topk": "CachedKD-topK",
          "vanilla-cached-sample": "CachedKD-sample"}
DISAGREEMENT = 0.10  # analytic vs measured FLOPs beyond this are flagged (docs/budget.md explains them)


def label(strategy: str, student_layers: int) -> str:
    """``'tinybert', 6`` -> ``'TinyBERT6'``; ``'minilm_v2', 6`` -> ``'MiniLMv2-6'``."""
    name = LABELS.get(strategy, strategy)
    return f"{name}{'-' if name[-1].isdigit() else ''}{student_layers}"


def human(n: float) -> str:
    """1.23e9 -> '1.23B' (thousands K, millions M, billions B, trillions T)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    arms = report["strategies"]
    lines = [f"# Budget calibration: {report['budget']['text']} on {report['environment']['device_name']}", ""]
    sentence = "; ".join(f"{a['label']} processes {human(a['budget_tokens'])} tokens" for a in arms)
    lines += [f"Within the budget ({report['budget']['description']}"
              f"{', teacher charged: ' + report['charge_teacher'] if report['charge_teacher'] != 'none' else ''}): "
              f"{sentence}.", ""]
    lines += ["| strategy | ms/step | tokens/s | steps | tokens | vs No-KD (measured) | vs No-KD (FLOPs) "
              "| GFLOP/step analytic | GFLOP/step measured | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in arms:
        mfu = "n/a" if a["mfu"] is None else f"{100 * a['mfu']:.1f}%"
        lines.append(f"| {a['label']} | {a['ms_per_step']:.1f} | {human(a['tokens_per_s'])} | {a['budget_steps']:,} "
                     f"| {human(a['budget_tokens'])} | {_ratio(a['tokens_vs_nokd'])} "
                     f"| {_ratio(a['tokens_vs_nokd_flops'])} | {a['flops_per_step_analytic'] / 1e9:.3g} "
                     f"| {a['flops_per_step_measured'] / 1e9:.3g} | {mfu} |")
    lines += ["", "Where each step's time goes (median ms per phase):", "",
              "| strategy | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for a in arms:
        lines.append(f"| {a['label']} | " + " | ".join(f"{a['breakdown_ms'][p]:.1f}" for p in PHASES) + " |")
    lines += _cache_rows(arms)
    notes = [f"- {a['label']}: {note}" for a in arms for note in a["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    peak = report["peak"]
    lines += ["", f"MFU = analytic FLOPs per second / {human(peak['flops_per_s'])}FLOP/s ({peak['source']}). "
              f"Shapes: batch {report['shapes']['batch']} x seq {report['shapes']['seq']}, dtype "
              f"{report['dtype']}, {report['world_size']} rank(s). See docs/budget.md for the clock and FLOP "
              f"accounting.", ""]
    return "\n".join(lines)


def _cache_rows(arms: list) -> list:
    """The teacher cache's own rows: what building it costs and what each cached arm was charged."""
    cached = [a for a in arms if a.get("teacher_cache")]
    if not cached:
        return []
    lines = ["", "Teacher cache (cached arms are timed on a synthetic cache: random ids/weights with the real K, "
                 "layout and lookup; building the real one is one teacher forward over its tokens):", "",
             "| cache for | K | tokens covered | build GFLOP | charged GFLOP |", "|---|---:|---:|---:|---:|"]
    for a in cached:
        c = a["teacher_cache"]
        lines.append(f"| {a['label']} | {c['k']} | {human(c['tokens'])} | {c['build_flops'] / 1e9:.4g} "
                     f"| {c['charged_flops'] / 1e9:.4g} |")
    return lines


def chart(report: dict, path: Path) -> None:
    """Two panels: tokens within the budget per strategy, and the stacked per-phase step time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["strategies"]
    names = [a["label"] for a in arms]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = left.bar(names, [a["budget_tokens"] for a in arms], color="tab:blue")
    left.bar_label(bars, labels=[human(a["budget_tokens"]) for a in arms])
    left.set_title(f"tokens within {report['budget']['text']}")
    left.set_ylabel("tokens")
    bottom = [0.0] * len(arms)
    for phase in PHASES:
        values = [a["breakdown_ms"][phase] for a in arms]
        right.bar(names, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_title("time per step")
    right.set_ylabel("ms")
    right.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{report['environment']['device_name']}, batch {report['shapes']['batch']} x seq "
                 f"{report['shapes']['seq']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
