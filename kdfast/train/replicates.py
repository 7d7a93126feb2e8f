"""Pretraining replicates (``train.replicates: R``): each arm is pretrained R times.

Replicate r runs with seed ``seed_of(config seed, r)`` for its initial weights, data order and masks.
Replicate 0 keeps the config's seed and the run folder of a single run (``arms/<strategy>``), so a folder
from before replicates is replicate 0 and resumes as before; replicate r >= 1 lives in
``<run folder>/rep<r>``. Replicate r of every arm (and of the random-init floor) shares its seed, so the
arms are paired within a replicate: same initial weights, same batches, same masks. The seeds of
replicates r >= 1 come from ``numpy.random.SeedSequence([seed, r])``, so the replicates of a run with
``seed=0`` and one with ``seed=1`` do not overlap (``seed + r`` would share all but one).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np


def check_replicates(replicates, cap: Optional[int] = None, where: str = "train.replicates") -> int:
    """A replicate count: an integer >= 1 and, with a ``cap``, at most the cap."""
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < 1:
        raise ValueError(f"{where}: expected an integer >= 1 (pretraining runs per arm), got {replicates!r}")
    if cap is not None and replicates > cap:
        raise ValueError(f"{where}: expected at most {cap} (train.max_replicates of this config), got {replicates}")
    return int(replicates)


def seed_of(seed: int, replicate: int) -> int:
    """The seed of ``replicate`` (0: ``seed`` itself)."""
    if replicate == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(replicate)]).generate_state(1)[0])


def run_dir(base: Path, replicate: int) -> Path:
    """Replicate 0 in ``base`` (the single-run layout), replicate r in ``base/rep<r>``."""
    return Path(base) if replicate == 0 else Path(base) / f"rep{replicate}"


def count(config: dict) -> int:
    """``train.replicates``, checked against ``train.max_replicates`` (a preset's cap)."""
    return check_replicates(config["train"]["replicates"], config["train"]["max_replicates"])


def configs(config: dict) -> List[dict]:
    """The config of each replicate: the same but for ``seed``."""
    return [{**config, "seed": seed_of(config["seed"], r)} for r in range(count(config))]
