"""``kdfast glue``: fine-tune a pretrained model on GLUE-style tasks, several seeds, with intervals.

A grid point (learning rate, batch size) is chosen per task, in one of two ways:
- ``select="validation"`` (the study's, and GLUE papers'): every grid point is fine-tuned once per
  seed and the best mean main metric over seeds on validation is kept (optimistic for all rows alike);
- ``select="dev"``: a dev split (10% of train, at most 1000 rows) is held out of train, each grid
  point is fine-tuned once (first seed) on at most ``select_examples`` of the rest, the best on dev
  is kept, then every seed is fine-tuned at that point on the whole train split. Validation is never
  seen by the choice, and a grid costs little more than one point.
With ``lr_reference_width`` W, every learning rate of the grid is scaled by W / the model's hidden size
(Adam's learning rate for hidden matrices scales as 1/width: muTransfer, Yang et al. 2022), so one grid
suits the 4L/256 teacher and the 2L/96 students alike (measured on SST-2, one epoch: the teacher at
3e-4 and the students at 8e-4-1e-3 reach 72-77%; the teacher at 1e-3 61.7%, a student at 3e-4 63%).
The kept point's validation predictions [seeds, n] become ``Scores``: the mean over seeds with a
bootstrap interval over seeds and validation examples (``kdfast.eval.stats``). Training batches are
drawn from length-sorted windows of the shuffled data (less padding), in shuffled order.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from kdfast.eval import glue_tasks, stats
from kdfast.eval.glue_tasks import Task

GRID_KEYS = ("lrs", "lr_reference_width", "batch_sizes", "epochs", "seq_len", "seeds", "select")
SELECT = ("validation", "dev")
DEV_FRACTION, DEV_MAX = 0.1, 1000
_SORT_WINDOW = 50  # batches per length-sorted window


@dataclass
class TaskResult:
    """The kept grid point of one task: ``scores`` per metric ([seeds, n] validation predictions)."""

    task: Task
    scores: Dict[str, stats.Scores]
    lr: float
    batch_size: int
    grid: List[dict]
    train_examples: int

    def summary(self, level: float = 0.95) -> dict:
        """JSON-ready: each metric's estimate with its interval, and the grid."""
        return {"main_metric": self.task.main_metric, "lr": self.lr, "batch_size": self.batch_size,
                "train_examples": self.train_examples,
                "validation_examples": self.scores[self.task.main_metric].examples,
                "metrics": {m: stats.estimate(s, level) for m, s in self.scores.items()}, "grid": self.grid}


def tokenize_rows(tokenizer, task: Task, rows: List[dict], seq_len: int) -> List[dict]:
    """Token ids (truncated to ``seq_len``) and the label of each row."""
    texts = [[row[c] for row in rows] for c in task.columns]
    encoded = tokenizer(*texts, truncation=True, max_length=seq_len)
    dtype = float if task.num_labels == 1 else int
    return [{"input_ids": ids, "token_type_ids": types, "label": dtype(row["label"])}
            for ids, types, row in zip(encoded["input_ids"], encoded["token_type_ids"], rows)]


def collate(examples: List[dict], pad_id: int, device: torch.device) -> Dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        types[row, :len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
    labels = torch.tensor([e["label"] for e in examples])
    batch = {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "token_type_ids": types, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def batches(train: List[dict], batch_size: int, order: random.Random) -> List[List[int]]:
    """One epoch's batches of indices: shuffled, sorted by length within windows, batch order shuffled."""
    indices = list(range(len(train)))
    order.shuffle(indices)
    window = batch_size * _SORT_WINDOW
    out = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start:start + window], key=lambda i: len(train[i]["input_ids"]))
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order.shuffle(out)
    return out


def finetune(model_path: str, tokenizer, task: Task, train: List[dict], validation: List[dict], lr: float,
             batch_size: int, epochs: int, seed: int, device: torch.device, warmup: float = 0.1,
             weight_decay: float = 0.01, bar: Optional[str] = None) -> np.ndarray:
    """Fine-tune a fresh copy of ``model_path`` on encoded ``train`` rows; validation predictions [n].
    ``bar``: show a progress bar (steps, loss) on stderr with this label."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=task.num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device=device, dtype=torch.float32).train()
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                  fused=device.type == "cuda")
    total = math.ceil(len(train) / batch_size) * epochs
    warm = max(1, int(total * warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    order = random.Random(seed)
    bf16 = device.type == "cuda"
    pad_id = tokenizer.pad_token_id
    progress = _progress_bar(bar, total)
    for _ in range(epochs):
        for chosen in batches(train, batch_size, order):
            batch = collate([train[i] for i in chosen], pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if progress is not None:
                progress.set_postfix_str(f"loss {float(loss):.3f}", refresh=False)
                progress.update()
    if progress is not None:
        progress.close()
    return predict(model, task, validation, pad_id, device)


def _progress_bar(label: Optional[str], total: int):
    """A tqdm bar of ``total`` fine-tuning steps on stderr (as the comparison's), or None without a label."""
    if label is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}% |{bar}| {n_fmt}/{total_fmt} steps, {postfix}")


@torch.inference_mode()
def predict(model, task: Task, rows: List[dict], pad_id: int, device: torch.device,
            batch_size: int = 128) -> np.ndarray:
    """Predicted classes (or regression scores) [n] of ``rows`` in their order."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out = np.empty(len(rows), dtype=np.float64 if task.num_labels == 1 else np.int64)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = collate([rows[i] for i in chosen], pad_id, device)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        out[chosen] = (logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)).cpu().numpy()
    return out


def check_reference_width(reference_width: Optional[int]) -> Optional[int]:
    if reference_width is not None and (isinstance(reference_width, bool) or not isinstance(reference_width, int)
                                        or reference_width <= 0):
        raise ValueError(f"lr_reference_width: expected a positive hidden size or None, got {reference_width!r}")
    return reference_width


def width_scaled(model_path: str, lrs: Sequence[float], reference_width: Optional[int]) -> List[float]:
    """``lrs`` times ``reference_width`` / the hidden size in ``model_path``'s config (unchanged if None)."""
    if check_reference_width(reference_width) is None:
        return list(lrs)
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(model_path).hidden_size
    return [lr * reference_width / hidden for lr in lrs]


def _finetune_seeds(model_path: str, tokenizer, task: Task, rows: List[dict], held: List[dict], lr: float,
                    batch_size: int, epochs: int, seeds: Sequence[int], device: torch.device, warmup: float,
                    weight_decay: float, bars: bool = False, bar_label: str = "") -> Dict[str, stats.Scores]:
    """Scores per metric of ``seeds`` fine-tunes on ``rows``, predicting ``held`` ([seeds, n]); ``bars``: a
    progress bar per fine-tune, its label starting with ``bar_label``."""
    def bar(seed: int) -> Optional[str]:
        return f"{bar_label}{task.name} lr={lr:g} batch={batch_size} seed={seed}" if bars else None

    predictions = np.stack([finetune(model_path, tokenizer, task, rows, held, lr, batch_size, epochs, seed, device,
                                     warmup, weight_decay, bar(seed))
                            for seed in seeds])
    truth = np.array([r["label"] for r in held])
    return {m: stats.Scores(predictions, truth, m) for m in task.metrics}


def _grid_entry(task: Task, lr: float, batch_size: int, on: str, scores: Dict[str, stats.Scores], progress) -> dict:
    means = {m: float(s.value()) for m, s in scores.items()}
    if progress:
        progress(f"{task.name} lr={lr:g} batch={batch_size} on {on}: " +
                 ", ".join(f"{m}={v:.4f}" for m, v in means.items()))
    return {"lr": lr, "batch_size": batch_size, "on": on, "mean": means}


def evaluate_model(model_path: str, tasks: Sequence[Task], data_dir: Optional[str], seeds: Sequence[int],
                   lrs: Sequence[float], batch_sizes: Sequence[int], epochs: int, seq_len: int,
                   device: torch.device, tokenizer_path: Optional[str] = None, warmup: float = 0.1,
                   weight_decay: float = 0.01, max_train_examples: Optional[int] = None,
                   max_eval_examples: Optional[int] = None, select: str = "validation",
                   select_examples: Optional[int] = None, lr_reference_width: Optional[int] = None,
                   progress=None, bars: bool = False, bar_label: str = "") -> Dict[str, TaskResult]:
    """Per task: the grid point chosen by ``select`` (see the module doc), with every seed's predictions;
    ``progress``: called with a line per grid point; ``bars``: a progress bar per fine-tune on stderr, its
    label starting with ``bar_label``."""
    from kdfast.data.tokenizer import load as load_tokenizer

    if len(seeds) < 1:
        raise ValueError(f"seeds: expected at least one fine-tuning seed, got {list(seeds)!r}")
    if select not in SELECT:
        raise ValueError(f"select: expected one of {', '.join(SELECT)}, got {select!r}")
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    grid_points = list(itertools.product(width_scaled(model_path, lrs, lr_reference_width), batch_sizes))
    results = {}
    for task in tasks:
        train_rows = glue_tasks.load_rows(task, "train", data_dir)
        random.Random(0).shuffle(train_rows)
        train = tokenize_rows(tokenizer, task, train_rows[:max_train_examples], seq_len)
        validation = tokenize_rows(tokenizer, task,
                                   glue_tasks.load_rows(task, "validation", data_dir, max_eval_examples), seq_len)
        gold = np.array([r["label"] for r in validation])

        def finetune_seeds(lr, batch_size, rows, held, chosen_seeds, task=task):
            return _finetune_seeds(model_path, tokenizer, task, rows, held, lr, batch_size, epochs, chosen_seeds,
                                   device, warmup, weight_decay, bars, bar_label)

        def report(lr, batch_size, on, scores, task=task):
            return _grid_entry(task, lr, batch_size, on, scores, progress)

        grid = []
        if select == "dev" and len(grid_points) > 1:
            cut = min(DEV_MAX, max(1, int(len(train) * DEV_FRACTION)))
            dev, rest = train[:cut], train[cut:][:select_examples]
            for lr, batch_size in grid_points:
                grid.append(report(lr, batch_size, f"dev ({len(dev)} held out of train, seed {seeds[0]})",
                                   finetune_seeds(lr, batch_size, rest, dev, seeds[:1])))
            best = max(grid, key=lambda g: g["mean"][task.main_metric])
            lr, batch_size = best["lr"], best["batch_size"]
            scores = finetune_seeds(lr, batch_size, train, validation, seeds)
            report(lr, batch_size, "validation", scores)
        else:
            kept = None
            for lr, batch_size in grid_points:
                scores = finetune_seeds(lr, batch_size, train, validation, seeds)
                grid.append(report(lr, batch_size, "validation", scores))
                if kept is None or grid[-1]["mean"][task.main_metric] > kept[0]:
                    kept = (grid[-1]["mean"][task.main_metric], scores, lr, batch_size)
            _, scores, lr, batch_size = kept
        assert all(np.array_equal(s.gold, gold) for s in scores.values())
        results[task.name] = TaskResult(task, scores, lr, batch_size, grid, len(train))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="directory of a pretrained (MLM) model saved with its tokenizer")
    parser.add_argument("--tasks", default="cola,sst2,stsb", help="comma-separated task names (GLUE or --task-spec)")
    parser.add_argument("--task-spec", default=None,
                        help="YAML/JSON of custom tasks: {name: {columns: [a, b], num_labels: N, metrics: [..]}}")
    parser.add_argument("--data-dir", default=None,
                        help="local {task}/{train,validation}.jsonl folder (default: the HF glue dataset)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--preset", default=None,
                        help="take the grid from kdfast/configs/glue-NAME.yaml; study: lr {1e-5,3e-5,5e-5,8e-5} x "
                             "batch {16,32}, 5 epochs, seq 128, seeds 0-4")
    parser.add_argument("--lrs", default="1e-4", help="comma-separated learning rates")
    parser.add_argument("--lr-reference-width", type=int, default=None,
                        help="scale every lr by this / the model's hidden size (one grid for every width)")
    parser.add_argument("--batch-sizes", default="32", help="comma-separated batch sizes")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--level", type=float, default=0.95, help="interval level in (0, 1)")
    parser.add_argument("--select", default="validation", choices=SELECT,
                        help="grid point choice: best mean on validation (the study's) or on a dev split of train")
    parser.add_argument("--select-examples", type=int, default=None, help="select=dev: train rows per grid point")
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar per fine-tune (stderr)")


def _numbers(text: str, kind=float) -> List:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from kdfast.runtime.distributed import pick_device

    stats.check_level(args.level)
    tasks = glue_tasks.parse_tasks(args.tasks, glue_tasks.read_spec_file(args.task_spec))
    if args.data_dir is not None:
        glue_tasks.check_dir(args.data_dir, tasks)
    if not Path(args.model).is_dir():
        raise ValueError(f"model: expected a directory saved with save_pretrained, got {args.model!r}")
    if args.preset:
        from kdfast.train.config import load as load_config

        section = load_config(preset=f"glue-{args.preset}")["glue"]
        grid = {key: section[key] for key in GRID_KEYS}
    else:
        grid = {"lrs": _numbers(args.lrs), "lr_reference_width": args.lr_reference_width,
                "batch_sizes": _numbers(args.batch_sizes, int), "epochs": args.epochs,
                "seq_len": args.seq_len, "seeds": _numbers(args.seeds, int), "select": args.select}
    results = evaluate_model(args.model, tasks, args.data_dir, device=pick_device(args.device),
                             tokenizer_path=args.tokenizer, max_train_examples=args.max_train_examples,
                             select_examples=args.select_examples,
                             max_eval_examples=args.max_eval_examples, progress=lambda m: print(m, file=sys.stderr),
                             bars=not args.no_progress, **grid)
    summaries = {name: result.summary(args.level) for name, result in results.items()}
    for name, summary in summaries.items():
        shown = ", ".join(f"{m}={e['mean']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"
                          for m, e in summary["metrics"].items())
        print(f"{name:<6} {shown}  (lr={summary['lr']:g}, batch={summary['batch_size']}, "
              f"{len(grid['seeds'])} seeds; {round(100 * args.level)}% bootstrap over seeds and examples)")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1))
    return 0
