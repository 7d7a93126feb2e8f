"""What a run tells the user: JSON-lines records, a progress bar (budget spent, tokens/s, loss) and,
optionally, TensorBoard scalars. Only rank 0 writes."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from kdfast.runtime.io import atomic_open


class RunLog:
    """``log.jsonl`` in ``run_dir``; ``resume_step`` drops records after that step (they are redone)."""

    def __init__(self, run_dir: Path, label: str, enabled: bool = True, progress: bool = True,
                 tensorboard: bool = False, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._bar = None
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_open(self.path) as f:
                f.write("".join(line + "\n" for line in kept).encode())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=1000, desc=label, unit="‰", file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}% of budget |{bar}| {postfix}")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def record(self, **fields) -> None:
        """One JSON line; numeric fields also go to TensorBoard at ``step``."""
        if not self.enabled:
            return
        self._file.write(json.dumps(fields) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = fields.get("event", "train")
            for key, value in fields.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, fields.get("step", 0))

    def progress(self, fraction: float, **postfix) -> None:
        if self._bar is None:
            return
        self._bar.n = int(round(min(fraction, 1.0) * 1000))
        self._bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in postfix.items()), refresh=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def check_tensorboard(requested: bool) -> None:
    """Refuse train.tensorboard=true up front when the package is missing."""
    import importlib.util

    if requested and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("train.tensorboard: expected the tensorboard package for TensorBoard logs, got it missing; "
                         "pip install tensorboard or set train.tensorboard=false")
