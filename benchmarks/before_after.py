"""Each kernel benchmark at two commits, side by side in one run: is a change free of slowdowns?

Exports both commits (``git archive``) to a temporary folder, builds each one's CPU extension, then times
``kdfast bench kernels --op OP --impl kdfast`` of every (op, shape) below, alternating the two trees
round by round (before, after, after, before, ...) so that a drift of the machine's load hits both alike.
Each tree is imported from its own folder (``PYTHONPATH``), in its own process.

Reported per (op, shape): the medians of each tree's per-round medians (ms), the ratio after / before,
and its 95% bootstrap interval over the paired rounds (``scipy.stats.bootstrap`` of the mean log ratio);
``vs_floor`` is the same ratio against each run's own floor (the bare matmuls; vocab_kd only), which
cancels most of the machine's load.

    python benchmarks/before_after.py --before 00a1665 --after HEAD --rounds 4 \
        --json benchmarks/results/before_after_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
# (op, shape filters): the vocabulary row at the BERT acceptance shape, the others at L = 512.
CASES = (
    ("vocab_kd", ("rows=2048", "Hs=384")),
    ("attention_kl", ("L=512",)),
    ("relation_kl", ("L=512",)),
    ("attention_mse", ("L=512",)),
    ("hidden_mse", ("L=512",)),
)


def export(ref: str, into: Path) -> Path:
    """Write commit ``ref``'s tree into ``into`` and build its CPU extension there; returns the folder."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    env = dict(os.environ, KDFAST_BUILD_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-t", str(into / "build")],
                   cwd=into, env=env, check=True, capture_output=True)
    return into


def time_case(tree: Path, op: str, filters: "tuple[str, ...]", repeats: int, out: Path) -> "list[dict]":
    """One ``kdfast bench kernels`` run of ``op`` at ``filters`` from ``tree``; its result rows."""
    command = [sys.executable, "-m", "kdfast", "bench", "kernels", "--op", op, "--device", "cpu",
               "--impl", "kdfast", "--repeats", str(repeats), "--json", str(out)]
    for each in filters:
        command += ["--shape", each]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tree)
    subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())["results"]


def key(row: dict) -> str:
    return row["op"] + " " + ",".join(f"{k}={v}" for k, v in sorted(row["shape"].items()))


def paired_ratio(before: "list[float]", after: "list[float]") -> dict:
    """after / before: the ratio of medians and a 95% bootstrap interval of the paired mean log ratio."""
    logs = np.log(np.asarray(after) / np.asarray(before))
    out = {"ratio": float(np.median(after) / np.median(before))}
    if len(logs) >= 3 and np.ptp(logs) > 0:
        ci = stats.bootstrap((logs,), np.mean, confidence_level=0.95, random_state=0).confidence_interval
        out["interval_95"] = [math.exp(ci.low), math.exp(ci.high)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="00a1665", help="the older commit (default: before issue #20)")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--op", action="append", default=None, help="only these ops (repeatable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="kdfast-before-after-") as tmp:
        trees = {name: export(ref, Path(tmp) / name) for name, ref in (("before", args.before),
                                                                       ("after", args.after))}
        print(f"built both trees in {time.time() - start:.0f} s", flush=True)
        times: dict = {}
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for op, filters in (case for case in CASES if args.op is None or case[0] in args.op):
                for name in order:
                    rows = time_case(trees[name], op, filters, args.repeats, Path(tmp) / "out.json")
                    for row in rows:
                        cell = times.setdefault(key(row), {"before": {}, "after": {}})[name]
                        cell.setdefault(row["impl"], []).append(row["median_ms"])
            print(f"round {round_ + 1}/{args.rounds} done at {time.time() - start:.0f} s", flush=True)

    report = []
    for case, cell in times.items():
        entry = {"case": case, "before_ms": float(np.median(cell["before"]["kdfast"])),
                 "after_ms": float(np.median(cell["after"]["kdfast"])),
                 "time": paired_ratio(cell["before"]["kdfast"], cell["after"]["kdfast"]),
                 "rounds_ms": cell}
        if "floor" in cell["before"] and "floor" in cell["after"]:
            vs = {name: [k / f for k, f in zip(cell[name]["kdfast"], cell[name]["floor"])]
                  for name in ("before", "after")}
            entry["vs_floor"] = {"before": float(np.median(vs["before"])), "after": float(np.median(vs["after"])),
                                 **paired_ratio(vs["before"], vs["after"])}
        report.append(entry)
        interval = entry["time"].get("interval_95")
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "(no interval)"
        print(f"{case}: before {entry['before_ms']:.1f} ms, after {entry['after_ms']:.1f} ms, "
              f"after/before {entry['time']['ratio']:.3f} {shown}", flush=True)
    result = {"before": args.before, "after": args.after, "rounds": args.rounds, "repeats": args.repeats,
              "threads": os.cpu_count(), "seconds": round(time.time() - start), "cases": report}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
