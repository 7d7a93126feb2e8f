"""GLUE tasks: their text columns, label kind, and where their rows come from (a local directory of
``{task}/{train,validation}.jsonl`` with HF column names, or the HF ``glue`` dataset)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Task:
    name: str
    columns: tuple          # one or two text columns
    num_labels: int         # 1 = regression (STS-B)
    validation_split: str = "validation"


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("cola", ("sentence",), 2),
    Task("sst2", ("sentence",), 2),
    Task("mrpc", ("sentence1", "sentence2"), 2),
    Task("qqp", ("question1", "question2"), 2),
    Task("stsb", ("sentence1", "sentence2"), 1),
    Task("mnli", ("premise", "hypothesis"), 3, "validation_matched"),
    Task("qnli", ("question", "sentence"), 2),
    Task("rte", ("sentence1", "sentence2"), 2),
    Task("wnli", ("sentence1", "sentence2"), 2),
)}
SPLITS = ("train", "validation")


def parse_tasks(text) -> List[Task]:
    """``'cola,sst2'`` or a list of names -> tasks; unknown names are refused."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"tasks: expected a comma-separated list of {', '.join(TASKS)}, got {text!r}")
    for name in names:
        if name not in TASKS:
            raise ValueError(f"tasks: expected names among {', '.join(TASKS)}, got {name!r}")
    return [TASKS[n] for n in names]


def check_dir(data_dir: str, tasks: Sequence[Task]) -> None:
    """Every task needs both splits in ``data_dir``; refuse before any training starts."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"glue_dir: expected a directory of {{task}}/{{train,validation}}.jsonl, got "
                         f"{data_dir!r} (not found)")
    for task in tasks:
        for split in SPLITS:
            path = root / task.name / f"{split}.jsonl"
            if not path.is_file() or path.stat().st_size == 0:
                raise ValueError(f"glue_dir: expected {task.name}/{split}.jsonl in {data_dir!r}, got "
                                 f"{'an empty file' if path.is_file() else 'no such file'}")


def load_rows(task: Task, split: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> List[dict]:
    """Rows with the task's columns and ``label``; from ``data_dir`` when given, else HF ``glue``."""
    if data_dir is not None:
        rows = []
        path = Path(data_dir) / task.name / f"{split}.jsonl"
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [c for c in (*task.columns, "label") if c not in row]
                if missing:
                    raise ValueError(f"glue_dir: expected columns {(*task.columns, 'label')} in {path}, got "
                                     f"line {number} without {missing}")
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
        return rows
    import datasets

    hf_split = task.validation_split if split == "validation" else split
    data = datasets.load_dataset("glue", task.name, split=hf_split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return [dict(row) for row in data]
