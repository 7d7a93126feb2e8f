"""The ``kdfast`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "info": ("kdfast.info", "versions, built extensions and the backend each op takes"),
    "selftest": ("kdfast.selftest", "check every available backend against the reference on fresh inputs"),
    "bench kernels": ("kdfast.bench.kernels", "time fused losses against eager, compile, peers and the floor"),
    "bench budget": ("kdfast.budget.calibrate", "calibrate each strategy's step cost and convert a budget to tokens"),
    "compare": ("kdfast.train.compare", "the equal-compute comparison: pretrain every arm, GLUE, report"),
    "sweep": ("kdfast.train.sweep", "the comparison across budgets: every arm at every budget, trends, crossovers"),
    "report": ("kdfast.eval.merge", "merge compare/sweep output folders into one report across budgets"),
    "pretrain": ("kdfast.train.pretrain", "pretrain one student under a budget"),
    "glue": ("kdfast.eval.glue", "fine-tune and evaluate a model on GLUE tasks"),
    "teacher-cache build": ("kdfast.cache.cli", "cache a teacher's sparse targets (top-K or sampled) for KD"),
}
TWO_WORDS = ("bench", "teacher-cache")


def _usage() -> str:
    lines = ["usage: kdfast <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = " ".join(argv[:2]) if argv[:1] and argv[0] in TWO_WORDS else " ".join(argv[:1])
    if name not in COMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"kdfast {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[len(name.split()):])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
