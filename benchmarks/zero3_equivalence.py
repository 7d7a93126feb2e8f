"""DeepSpeed ZeRO-3 on 2 CPU ranks against one process (the runs of tests/test_zero3_distillation.py): per
case, the norm of the one-process update after 3 SGD steps, the largest parameter difference and their ratio
(the test's bound: 1e-5), and the largest relative difference of the per-step losses. Needs deepspeed:

    PYTHONPATH=. python benchmarks/zero3_equivalence.py --out benchmarks/results/zero3_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zero3_worker  # noqa: E402
from test_parallel_distillation import one_process_parameters  # noqa: E402
from test_zero3_distillation import run_zero3_worker  # noqa: E402


def compare(start: dict, expected: dict, got: dict) -> dict:
    moved = sum(float((expected[n] - start[n]).pow(2).sum()) for n in expected) ** 0.5
    worst = max(float((got[n] - expected[n]).norm()) for n in expected)
    return {"update_norm": moved, "max_parameter_difference": worst, "difference_over_update": worst / moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        began = time.time()
        parameters, report = run_zero3_worker(Path(folder))
        seconds = time.time() - began
        cases = {}
        for name in zero3_worker.CASES:
            start, expected, losses = zero3_worker.one_process(name)
            got = report[name]["losses"]
            cases[f"loop-{name}"] = {**compare(start, expected, parameters[name]), **report[name],
                                     "loss_relative_difference": max(abs(a - b) / abs(b) for a, b in zip(got, losses))}
        for name in zero3_worker.TRAINER_ZERO3:
            start, expected = one_process_parameters(name, Path(folder) / f"one-{name}")
            cases[f"trainer-{name}"] = {**compare(start, expected, parameters[f"trainer-{name}"]),
                                        **report[f"trainer-{name}"]}
    result = {"command": "PYTHONPATH=. python benchmarks/zero3_equivalence.py --out " + args.out,
              "versions": {p: version(p) for p in ("deepspeed", "torch", "transformers", "accelerate")},
              "ranks": 2, "steps": zero3_worker.STEPS, "two_rank_run_seconds": round(seconds, 1), "cases": cases,
              "unhooked_error": report["unhooked"]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, case in cases.items():
        print(f"{name:32s} update {case['update_norm']:.4f}  max diff {case['max_parameter_difference']:.3g}  "
              f"ratio {case['difference_over_update']:.3g}")


if __name__ == "__main__":
    main()
