"""``kdfast glue``: fine-tune a pretrained model on GLUE tasks and report the median over seeds.

For each task, every (learning rate, batch size) of the grid is fine-tuned once per seed; the setting
with the best median main metric on validation is reported with its median metrics and its seed spread
(max - min of the main metric), which the report uses to call ties.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from kdfast.eval import glue_tasks, metrics
from kdfast.eval.glue_tasks import Task

GRID_KEYS = ("lrs", "batch_sizes", "epochs", "seq_len", "seeds")


def encode(tokenizer, task: Task, rows: List[dict], seq_len: int) -> List[dict]:
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


def finetune(model_path: str, tokenizer, task: Task, train: List[dict], validation: List[dict], lr: float,
             batch_size: int, epochs: int, seed: int, device: torch.device, warmup: float = 0.1,
             weight_decay: float = 0.01) -> Dict[str, float]:
    """Fine-tune a fresh copy of ``model_path`` on encoded ``train`` rows; metrics on ``validation``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=task.num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device).train()
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                  fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    warm = max(1, int(total * warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    order = random.Random(seed)
    bf16 = device.type == "cuda"
    pad_id = tokenizer.pad_token_id
    for _ in range(epochs):
        indices = list(range(len(train)))
        order.shuffle(indices)
        for start in range(0, len(indices), batch_size):
            batch = collate([train[i] for i in indices[start:start + batch_size]], pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    return evaluate(model, task, validation, pad_id, device)


@torch.no_grad()
def evaluate(model, task: Task, rows: List[dict], pad_id: int, device: torch.device,
             batch_size: int = 128) -> Dict[str, float]:
    model.eval()
    outputs = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id, device)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        outputs.append(logits[:, 0] if task.num_labels == 1 else logits.argmax(-1))
    pred = torch.cat(outputs).cpu().numpy()
    gold = np.array([r["label"] for r in rows])
    return metrics.score(task.name, pred, gold)


def evaluate_model(model_path: str, tasks: Sequence[Task], data_dir: Optional[str], seeds: Sequence[int],
                   lrs: Sequence[float], batch_sizes: Sequence[int], epochs: int, seq_len: int,
                   device: torch.device, tokenizer_path: Optional[str] = None, warmup: float = 0.1,
                   weight_decay: float = 0.01, max_train_examples: Optional[int] = None,
                   max_eval_examples: Optional[int] = None, progress=None) -> dict:
    """Per task: the best grid point by median main metric, its median metrics and seed spread."""
    from kdfast.data.tokenizer import load as load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path or model_path)
    results = {}
    for task in tasks:
        train_rows = glue_tasks.load_rows(task, "train", data_dir)
        random.Random(0).shuffle(train_rows)
        train = encode(tokenizer, task, train_rows[:max_train_examples], seq_len)
        validation = encode(tokenizer, task, glue_tasks.load_rows(task, "validation", data_dir, max_eval_examples),
                            seq_len)
        _, main = metrics.metric_names(task.name)
        grid = []
        for lr, batch_size in itertools.product(lrs, batch_sizes):
            runs = [finetune(model_path, tokenizer, task, train, validation, lr, batch_size, epochs, seed, device,
                             warmup, weight_decay) for seed in seeds]
            grid.append({"lr": lr, "batch_size": batch_size, "runs": runs,
                         "median": {m: statistics.median(r[m] for r in runs) for m in runs[0]}})
            if progress:
                progress(f"{task.name} lr={lr:g} batch={batch_size}: " +
                         ", ".join(f"{m}={v:.4f}" for m, v in grid[-1]["median"].items()))
        best = max(grid, key=lambda g: g["median"][main])
        main_values = [r[main] for r in best["runs"]]
        results[task.name] = {"main_metric": main, "metrics": best["median"], "lr": best["lr"],
                              "batch_size": best["batch_size"], "seeds": list(seeds),
                              "spread": max(main_values) - min(main_values), "grid": grid,
                              "train_examples": len(train), "validation_examples": len(validation)}
    return results


def average(results: dict) -> float:
    """Mean over tasks of each task's main metric."""
    return statistics.mean(r["metrics"][r["main_metric"]] for r in results.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="directory of a pretrained (MLM) model saved with its tokenizer")
    parser.add_argument("--tasks", default="cola,sst2,stsb", help="comma-separated GLUE task names")
    parser.add_argument("--data-dir", default=None,
                        help="local {task}/{train,validation}.jsonl (HF column names); default: HF `glue`")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--preset", default=None,
                        help="take the grid from kdfast/configs/glue-NAME.yaml; study: lr {1e-5,3e-5,5e-5,8e-5} x "
                             "batch {16,32}, 5 epochs, seq 128, median of seeds 0-4")
    parser.add_argument("--lrs", default="1e-4", help="comma-separated learning rates")
    parser.add_argument("--batch-sizes", default="32", help="comma-separated batch sizes")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (the median is reported)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def _numbers(text: str, kind=float) -> List:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from kdfast.train.distributed import pick_device

    tasks = glue_tasks.parse_tasks(args.tasks)
    if args.data_dir is not None:
        glue_tasks.check_dir(args.data_dir, tasks)
    if not Path(args.model).is_dir():
        raise ValueError(f"model: expected a directory saved with save_pretrained, got {args.model!r}")
    if args.preset:
        from kdfast.train.config import load as load_config

        section = load_config(preset=f"glue-{args.preset}")["glue"]
        grid = {key: section[key] for key in GRID_KEYS}
    else:
        grid = {"lrs": _numbers(args.lrs), "batch_sizes": _numbers(args.batch_sizes, int), "epochs": args.epochs,
                "seq_len": args.seq_len, "seeds": _numbers(args.seeds, int)}
    results = evaluate_model(args.model, tasks, args.data_dir, device=pick_device(args.device),
                             tokenizer_path=args.tokenizer, max_train_examples=args.max_train_examples,
                             max_eval_examples=args.max_eval_examples, progress=lambda m: print(m, file=sys.stderr),
                             **grid)
    for name, result in results.items():
        shown = ", ".join(f"{m}={v:.4f}" for m, v in result["metrics"].items())
        print(f"{name:<6} {shown}  (lr={result['lr']:g}, batch={result['batch_size']}, "
              f"seed spread {result['spread']:.4f})")
    print(f"average {average(results):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
