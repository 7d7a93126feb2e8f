"""The cost of a `DistillationTrainer` step from a causal teacher cache, against a cross-entropy-only step
of the same student and a live-teacher KD step, in one run (issue #21, "Cost").

Student Llama 4L/512, teacher Llama 8L/1024, V = 32,000, batch 4 x 256, fp32 on CPU, random weights and
tokens (timing does not depend on them). Arms, each a real HF `Trainer` with its own copy of the student:
- `cache`: `DistillationTrainer(teacher_cache=DIR)` (topk:32, KD + CE, no teacher in memory);
- `ce`: `transformers.Trainer` on the student's own loss (HF's logits + cross-entropy);
- `cache_kd0`: the cache arm with kd_weight = 0 (kdfast's fused CE alone: separates the KD rows' cost);
- `live`: `DistillationTrainer(teacher=...)` (teacher forward + fused KD + CE).
Step time = the interval between consecutive `on_step_end` callbacks (data, forward, backward, optimizer),
the first step of each round dropped. Rounds rotate the arms' order, so load drifts bias none of them;
the median over rounds is reported, with `uptime` before and after each round.

    python benchmarks/causal_cache_step.py --json benchmarks/results/causal_cache_step_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from kdfast.apps import causal_teacher_cache_build as causal_build
from kdfast.cache import sparse
from kdfast.cache.causal import CausalTeacherCache
from kdfast.integrations.transformers import DistillationTrainer

VOCAB, SEQ_LEN, BATCH, K = 32_000, 256, 4, 32


def llama(layers: int, hidden: int, intermediate: int, heads: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=SEQ_LEN,
                                        tie_word_embeddings=False))


class StepClock(TrainerCallback):
    """Seconds between consecutive step ends (the first step of each train() call has no predecessor)."""

    def __init__(self):
        self.times: list[float] = []
        self._last = None

    def on_train_begin(self, *_, **__):
        self._last = None

    def on_step_end(self, *_, **__):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def ratio_interval(arm: list, base: list, level: float = 0.95) -> list:
    """Bootstrap interval (scipy, percentile, 10,000 resamples of each arm) of median(arm) / median(base)."""
    from scipy.stats import bootstrap

    def ratio(a, b, axis=-1):
        return np.median(a, axis=axis) / np.median(b, axis=axis)

    result = bootstrap((np.asarray(arm), np.asarray(base)), ratio, n_resamples=10_000, confidence_level=level,
                       method="percentile", random_state=0)
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per arm per round (the first is not timed)")
    parser.add_argument("--sequences", type=int, default=8, help="cached sequences (the arms cycle over them)")
    parser.add_argument("--json", default="benchmarks/results/causal_cache_step_cpu.json")
    opts = parser.parse_args()
    torch.manual_seed(0)
    teacher = llama(8, 1024, 2816, 16).eval()
    student = llama(4, 512, 1408, 8)
    sequences = torch.randint(0, VOCAB, (opts.sequences, SEQ_LEN))
    folder = Path(tempfile.mkdtemp(prefix="kdfast-causal-bench-"))
    start = time.perf_counter()
    causal_build.build(teacher, sequences, folder, sparse.SparseSpec.parse(f"topk:{K}"), 1.0, {"seq_len": SEQ_LEN},
                       batch_size=BATCH)
    build_seconds = time.perf_counter() - start
    cache = CausalTeacherCache(folder)
    dataset = cache.dataset()
    out = Path(tempfile.mkdtemp(prefix="kdfast-causal-bench-out-"))

    def args(name: str) -> TrainingArguments:
        return TrainingArguments(output_dir=str(out / name), per_device_train_batch_size=BATCH, max_steps=opts.steps,
                                 learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, dataloader_drop_last=True)

    from transformers import default_data_collator

    arms = {
        "cache": lambda clock: DistillationTrainer(copy.deepcopy(student), args("cache"), teacher_cache=cache,
                                                   callbacks=[clock]),
        "ce": lambda clock: Trainer(copy.deepcopy(student), args("ce"), train_dataset=dataset,
                                    data_collator=default_data_collator, callbacks=[clock]),
        "cache_kd0": lambda clock: DistillationTrainer(copy.deepcopy(student), args("cache_kd0"), teacher_cache=cache,
                                                       kd_weight=0.0, callbacks=[clock]),
        "live": lambda clock: DistillationTrainer(copy.deepcopy(student), args("live"), teacher=teacher,
                                                  train_dataset=dataset, data_collator=default_data_collator,
                                                  callbacks=[clock]),
    }
    clocks = {name: StepClock() for name in arms}
    trainers = {name: make(clocks[name]) for name, make in arms.items()}
    loads, names = [], list(arms)
    for round_ in range(opts.rounds):
        before = load()
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            trainers[name].train()
        loads.append({"round": round_, "order": order, "before": before, "after": load()})
        print(f"round {round_}: " + ", ".join(f"{n} {statistics.median(c.times):.3f} s" for n, c in clocks.items()),
              flush=True)
    medians = {name: statistics.median(clock.times) for name, clock in clocks.items()}
    result = {
        "benchmark": "causal_cache_step", "device": "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "shape": {"student": "Llama 4L/512 (intermediate 1408, 8 heads)",
                  "teacher": "Llama 8L/1024 (intermediate 2816, 16 heads)", "vocab": VOCAB, "batch": BATCH,
                  "seq_len": SEQ_LEN, "cache": f"topk:{K}", "dtype": "float32"},
        "cache_bytes_per_target_token": cache.index["bytes_per_target_token"], "cache_build_seconds": build_seconds,
        "rounds": opts.rounds, "timed_steps_per_round": opts.steps - 1,
        "step_seconds": {name: clock.times for name, clock in clocks.items()},
        "median_step_seconds": medians,
        "ratio_vs_ce": {name: medians[name] / medians["ce"] for name in medians},
        "ratio_vs_ce_95ci": {name: ratio_interval(clocks[name].times, clocks["ce"].times) for name in medians
                             if name != "ce"},
        "load": loads,
    }
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_step_seconds": medians, "ratio_vs_ce": result["ratio_vs_ce"]}, indent=1))


if __name__ == "__main__":
    main()
