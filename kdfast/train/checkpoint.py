"""Atomic checkpoints and crash reports in a run folder.

A checkpoint is written to a temporary name, flushed and fsynced, then renamed to
``checkpoints/step-NNNNNNNNN.pt`` (rename is atomic on POSIX), and the folder is fsynced. Only names of
that form are ever loaded, so a half-written file is never read; a final file that still fails to load
is skipped in favour of the one before it.
"""
from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from kdfast.runtime.io import atomic_open

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def save(run_dir: Path, state: dict, step: int, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep only the newest ``keep`` checkpoints."""
    folder = Path(run_dir) / "checkpoints"
    path = folder / f"step-{step:09d}.pt"
    with atomic_open(path) as f:
        torch.save(state, f)
    for old in _checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def _checkpoints(folder: Path) -> list:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_latest(run_dir: Path) -> Optional[dict]:
    """The newest checkpoint that loads, or None when there is none."""
    for path in reversed(_checkpoints(Path(run_dir) / "checkpoints")):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a damaged file: fall back to the previous checkpoint
            print(f"kdfast: skipping unreadable checkpoint {path}: {err}", file=sys.stderr)
    return None


def write_crash(run_dir: Path, error: BaseException) -> Path:
    """Record why a run stopped in ``run_dir/crash.json``; nothing else in the folder is touched."""
    report = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "error": type(error).__name__,
              "message": str(error),
              "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))}
    path = Path(run_dir) / "crash.json"
    with atomic_open(path) as f:
        f.write(json.dumps(report, indent=1).encode())
    return path
