"""The ``kdfast`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported.

Bad input (a ``ValueError``/``TypeError`` naming the argument, a missing or unreadable file, a loss that
diverged) prints ``kdfast: error: <message>`` alone and exits 2, as argparse does; ``--debug`` (anywhere on the
command line) or ``KDFAST_DEBUG=1`` lets the traceback through for bug reports.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

COMMANDS = {
    "info": ("kdfast.info", "versions, built extensions and the backend each op takes"),
    "selftest": ("kdfast.selftest", "check every available backend against the reference on fresh inputs"),
    "bench kernels": ("kdfast.bench.kernels", "time fused losses against eager, compile, peers and the floor"),
    "bench budget": ("kdfast.apps.calibrate", "calibrate each strategy's step cost and convert a budget to tokens"),
    "compare": ("kdfast.apps.compare", "the equal-compute comparison: pretrain every arm, GLUE, report"),
    "sweep": ("kdfast.apps.sweep", "the comparison across budgets: every arm at every budget, trends, crossovers"),
    "report": ("kdfast.apps.report", "merge compare/sweep output folders into one report across budgets"),
    "pretrain": ("kdfast.apps.pretrain", "pretrain one student under a budget"),
    "glue": ("kdfast.eval.glue", "fine-tune and evaluate a model on GLUE tasks"),
    "teacher-cache build": ("kdfast.apps.teacher_cache", "cache a teacher's sparse targets (top-K or sampled) for KD"),
    "device-check": ("kdfast.apps.device_check", "GPU check in 8 min: selftest, kernel benches, calibration"),
}
TWO_WORDS = ("bench", "teacher-cache")


def _usage() -> str:
    lines = ["usage: kdfast <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)
DEBUG_FLAG, DEBUG_ENV = "--debug", "KDFAST_DEBUG"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command line; bad input prints one line (no traceback unless debugging) and gives 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if debug:
        return run_command(argv)
    try:
        return run_command(argv)
    except USER_ERRORS as error:
        print(f"kdfast: error: {error}", file=sys.stderr)
        return 2


def run_command(argv: Sequence[str]) -> int:
    """Run a command line, letting every exception through (what ``main`` runs)."""
    argv = list(argv)
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
