"""Sentence and sentence-pair tasks for fine-tuning: the nine GLUE tasks and custom ones.

A task names its text columns (one or two), its label count (1 = regression) and its metrics (the
first is the main one, used to pick grid points and to average). Rows come from a local directory
``{task}/{train,validation}.jsonl`` (HF column names plus ``label``) or, for the GLUE names, from
the HF ``glue`` dataset. Custom tasks are given as a mapping (YAML/JSON), e.g.
``{imdb: {columns: [text], num_labels: 2, metrics: [accuracy, f1]}}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from kdfast.eval.metrics import CLASSIFICATION, REGRESSION


@dataclass(frozen=True)
class Task:
    name: str
    columns: tuple          # one or two text columns
    num_labels: int         # 1 = regression (STS-B)
    metrics: tuple = ("accuracy",)
    validation_split: str = "validation"

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("cola", ("sentence",), 2, ("mcc",)),
    Task("sst2", ("sentence",), 2),
    Task("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    Task("qqp", ("question1", "question2"), 2, ("f1", "accuracy")),
    Task("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    Task("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    Task("qnli", ("question", "sentence"), 2),
    Task("rte", ("sentence1", "sentence2"), 2),
    Task("wnli", ("sentence1", "sentence2"), 2),
)}
SPLITS = ("train", "validation")
SPEC_KEYS = ("columns", "num_labels", "metrics")


def task_from_spec(name: str, spec) -> Task:
    """A custom task from ``{columns: [..], num_labels: N, metrics: [..]}``; refuses bad specs."""
    where = f"task spec {name!r}"
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{where}: expected keys among {', '.join(SPEC_KEYS)}, got {unknown}")
    columns = spec.get("columns")
    if isinstance(columns, str):
        columns = [columns]
    if not isinstance(columns, (list, tuple)) or not 1 <= len(columns) <= 2 or \
            not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"{where}: columns: expected one or two text column names, got {columns!r}")
    labels = spec.get("num_labels")
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 1:
        raise ValueError(f"{where}: num_labels: expected an int >= 1 (1 = regression), got {labels!r}")
    allowed = REGRESSION if labels == 1 else CLASSIFICATION
    chosen = spec.get("metrics", [allowed[0]])
    chosen = [chosen] if isinstance(chosen, str) else chosen
    if not chosen or not all(m in allowed for m in chosen):
        raise ValueError(f"{where}: metrics: expected names among {', '.join(allowed)} for "
                         f"{'regression' if labels == 1 else 'classification'}, got {chosen!r}")
    return Task(name, tuple(columns), labels, tuple(chosen))


def parse_tasks(text, custom: Optional[Mapping] = None) -> List[Task]:
    """``'cola,sst2'`` or a list of names -> tasks; names are GLUE's or keys of ``custom`` specs."""
    known = {**TASKS, **{name: task_from_spec(name, spec) for name, spec in (custom or {}).items()}}
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"tasks: expected a comma-separated list of {', '.join(known)}, got {text!r}")
    for name in names:
        if name not in known and name.lower() not in TASKS:
            raise ValueError(f"tasks: expected names among {', '.join(known)} (or a custom task spec), got {name!r}")
    return [known.get(n) or TASKS[n.lower()] for n in names]


def read_spec_file(path: Optional[str]) -> Dict:
    """Custom task specs from a YAML or JSON file (a mapping of task name to spec); {} for None."""
    if not path:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"task_spec: expected a YAML/JSON file of task specs, got {path!r} (not found)")
    specs = yaml.safe_load(file.read_text())
    if not isinstance(specs, Mapping):
        raise ValueError(f"task_spec: expected a mapping of task name to spec in {path!r}, got {type(specs).__name__}")
    return dict(specs)


def check_dir(data_dir: str, tasks: Sequence[Task]) -> None:
    """Every task needs both splits in ``data_dir``, whose first row has the task's columns and a
    label; refuse before any training starts."""
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
            load_rows(task, split, data_dir, limit=1)


def load_rows(task: Task, split: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> List[dict]:
    """Rows with the task's columns and ``label``; from ``data_dir`` when given, else HF ``glue``."""
    if data_dir is not None:
        rows = []
        path = Path(data_dir) / task.name / f"{split}.jsonl"
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"glue_dir: expected one JSON object per line in {path}, got line {number}: "
                                     f"{error.msg}") from None
                missing = [c for c in (*task.columns, "label") if c not in row]
                if missing:
                    raise ValueError(f"glue_dir: expected columns {(*task.columns, 'label')} in {path}, got "
                                     f"line {number} without {missing} (it has {sorted(row)})")
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
        return rows
    if task.name not in TASKS:
        raise ValueError(f"glue_dir: expected a local folder for the custom task {task.name!r}, got none")
    import datasets

    hf_split = task.validation_split if split == "validation" else split
    data = datasets.load_dataset("glue", task.name, split=hf_split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return [dict(row) for row in data]
