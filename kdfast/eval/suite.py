"""The evaluation every row of a comparison gets: probing tasks, the MLM-head probe and (with data)
GLUE-style fine-tuning. ``build`` checks and prepares it before any training; ``evaluate`` runs it
on one saved model and caches the predictions beside the model, keyed by the suite's recipe.

Metric names: ``probe/<task>`` (accuracy), ``mlm_probe`` (held-out cross-entropy, lower is better),
``glue/<task>`` (the task's main metric) and ``glue/<task>/<metric>`` for its other metrics.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from kdfast.eval import glue_tasks, mlm_probe, probe_tasks, probes, stats
from kdfast.runtime.io import atomic_open

CACHE = "eval-{}.npz"


@dataclass
class Suite:
    """Everything needed to evaluate a model, identical for every row of a comparison."""

    config: dict                                    # the ``eval`` and ``glue`` sections
    probe_tasks: List[probe_tasks.ProbeTask]
    probe_source: str
    mlm_train: Optional[torch.Tensor]               # [N, L] token ids (MLM-head probe training)
    mlm_heldout: Optional[torch.Tensor]             # [M, L]
    mask_id: int
    special: tuple
    glue: List[glue_tasks.Task]
    notes: List[str] = field(default_factory=list)
    bars: bool = False                              # a progress bar per GLUE fine-tune (train.progress)

    @property
    def level(self) -> float:
        return self.config["eval"]["level"]

    def recipe(self) -> str:
        """A digest of what the evaluation does (changes of settings or data invalidate caches)."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode())
        for task in self.probe_tasks:
            digest.update(json.dumps([task.name, task.texts[:50], task.labels]).encode())
        for tensor in (self.mlm_train, self.mlm_heldout):
            if tensor is not None:
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]

    def higher_is_better(self, metric: str) -> bool:
        return metric != "mlm_probe"

    def describe(self) -> dict:
        """The methods, seeds and sample sizes, for the report."""
        section, glue = self.config["eval"], self.config["glue"]
        out = {"level": self.level, "statistics": (
            f"mean over pretraining replicates and seeds; {round(100 * self.level)}% nested percentile bootstrap "
            f"({stats.RESAMPLES} resamples) over replicates, then seeds, then evaluation examples "
            "(kdfast.eval.nested); "
            "arms compared at the replicate level by a paired t-test on replicate means (scipy.stats.ttest_rel; "
            "scipy.stats.ttest_1samp against the teacher, held fixed), Benjamini-Hochberg across the verdicts of the "
            "report (scipy.stats.false_discovery_control), calls only from 3 replicates; variance components by "
            "balanced nested ANOVA (method of moments); smallest detectable difference from the measured replicate "
            "and seed components with statsmodels.stats.power.TTestPower (power 0.8, Bonferroni level)")}
        if self.probe_tasks:
            out["probes"] = {"source": self.probe_source, "seeds": section["probe_seeds"], "method": probes.METHOD,
                             "tasks": [probe_tasks.describe(t) for t in self.probe_tasks]}
        if self.mlm_heldout is not None:
            out["mlm_probe"] = {"method": mlm_probe.describe(section["mlm_probe_steps"], section["mlm_probe_batch"]),
                                "train_sequences": int(self.mlm_train.shape[0]),
                                "heldout_sequences": int(self.mlm_heldout.shape[0])}
        if self.glue:
            out["glue"] = {"tasks": [t.name for t in self.glue], "seeds": glue["seeds"], "lrs": glue["lrs"],
                           "lr_reference_width": glue["lr_reference_width"],
                           "batch_sizes": glue["batch_sizes"], "epochs": glue["epochs"], "seq_len": glue["seq_len"],
                           "selection": glue_selection(glue["select"], glue["select_examples"])}
        return out


def glue_selection(select: str, examples: Optional[int]) -> str:
    if select == "validation":
        return "grid point with the best mean main metric over seeds on validation (the study's protocol)"
    return (f"grid point with the best main metric on a dev split held out of train (first seed, at most "
            f"{examples or 'all'} training rows per point), then every seed at that point on the whole train "
            "split")


def build(config: dict, data, tokenizer) -> Suite:
    """The suite of ``config`` (sections ``eval`` and ``glue``) on the comparison's data; every
    error (probe corpus too small, bad task spec, interval level) is raised here, before training."""
    from kdfast.data import corpus

    section = config["eval"]
    stats.check_level(section["level"])
    notes = []
    sources = section["probe_corpus"] or config["data"]["heldout"]
    if section["probe_tasks"] and not sources:
        sources = config["data"]["train"]
        notes.append("Probe sentences come from the training corpus (no held-out text was given).")
    tasks = []
    if section["probe_tasks"]:
        corpus.check_sources(sources)
        tasks = probe_tasks.build(corpus.documents(sources), section["probe_tasks"], section["probe_seed"],
                                  section["probe_test"], section["probe_pool"], source=", ".join(sources))
    train = heldout = None
    if section["mlm_probe_steps"] > 0:
        train, heldout = data.train[:section["mlm_probe_sequences"]], data.heldout
    from kdfast.eval.glue import check_reference_width

    check_reference_width(config["glue"]["lr_reference_width"])  # also when no GLUE data turned GLUE off
    glue = []
    if config["glue"]["tasks"]:
        glue = glue_tasks.parse_tasks(config["glue"]["tasks"], config["glue"]["custom"])
        if config["glue"]["data_dir"]:
            glue_tasks.check_dir(config["glue"]["data_dir"], glue)
    subset = {"eval": section, "glue": config["glue"] if glue else None}
    masking = data.masking
    return Suite(subset, tasks, ", ".join(sources), train, heldout, masking.mask_id, tuple(masking.special),
                 glue, notes, bars=bool(config.get("train", {}).get("progress", False)))


def _model_key(model_path: str, recipe: str) -> str:
    """The suite's recipe and the model's content: every file of its folder (weights, config, tokenizer),
    hashed, so a retrained model is evaluated again and a copied or moved one is not. A hub name keys by
    its name."""
    digest = hashlib.sha256(recipe.encode())
    folder = Path(model_path)
    if not folder.is_dir():
        digest.update(model_path.encode())
        return digest.hexdigest()[:16]
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class Evaluation:
    """One model's ``scores`` per metric name, and ``info`` (GLUE grid points kept, phase seconds)."""

    scores: Dict[str, stats.Scores]
    info: dict


def _load_cache(path: Path) -> Optional[Evaluation]:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        head = json.loads(str(saved["head"]))
        return Evaluation({name: stats.Scores(saved[f"{i}_pred"], saved[f"{i}_gold"] if f"{i}_gold" in saved
                                              else None, metric) for i, (name, metric) in enumerate(head["names"])},
                          head["info"])


def _save_cache(path: Path, evaluation: Evaluation) -> None:
    names = [(name, s.metric) for name, s in evaluation.scores.items()]
    arrays = {"head": np.array(json.dumps({"names": names, "info": evaluation.info}))}
    for i, s in enumerate(evaluation.scores.values()):
        arrays[f"{i}_pred"] = s.predictions
        if s.gold is not None:
            arrays[f"{i}_gold"] = s.gold
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def evaluate(suite: Suite, model_path: str, device: torch.device, cache_dir: Path, label: str = "") -> Evaluation:
    """Every metric of the model at ``model_path``; stored in ``cache_dir`` under the suite's recipe and
    the model's content (a retrained model is evaluated again; a copied run folder reuses its caches)."""
    cache = Path(cache_dir) / CACHE.format(_model_key(model_path, suite.recipe()))
    stored = _load_cache(cache)
    if stored is not None:
        return stored
    section = suite.config["eval"]
    out: Dict[str, stats.Scores] = {}
    info: dict = {"seconds": {}}

    def phase(name: str, start: float) -> None:
        info["seconds"][name] = time.perf_counter() - start
        print(f"  eval {label}: {name} {info['seconds'][name]:.0f} s", file=sys.stderr)

    start = time.perf_counter()
    if suite.probe_tasks:
        for task, scores in probes.evaluate(model_path, suite.probe_tasks, section["probe_seeds"], device,
                                            section["probe_max_length"]).items():
            out[f"probe/{task}"] = scores
        phase("probes", start)
    if suite.mlm_heldout is not None:
        start = time.perf_counter()
        out["mlm_probe"] = mlm_probe.evaluate(model_path, suite.mlm_train, suite.mlm_heldout, suite.mask_id,
                                              suite.special, device, section["mlm_probe_steps"],
                                              section["mlm_probe_batch"])
        phase("MLM-head probe", start)
    if suite.glue:
        start = time.perf_counter()
        results = _glue(suite, model_path, device, label)
        for name, result in results.items():
            for metric, scores in result.scores.items():
                key = f"glue/{name}" if metric == result.task.main_metric else f"glue/{name}/{metric}"
                out[key] = scores
        info["glue"] = {n: {"lr": r.lr, "batch_size": r.batch_size, "train_examples": r.train_examples,
                            "grid": r.grid} for n, r in results.items()}
        phase("GLUE", start)
    evaluation = Evaluation(out, info)
    _save_cache(cache, evaluation)
    return evaluation


def _glue(suite: Suite, model_path: str, device: torch.device, label: str):
    from kdfast.eval import glue

    section = suite.config["glue"]
    return glue.evaluate_model(model_path, suite.glue, section["data_dir"], section["seeds"], section["lrs"],
                               section["batch_sizes"], section["epochs"], section["seq_len"], device,
                               warmup=section["warmup"], weight_decay=section["weight_decay"],
                               max_train_examples=section["max_train_examples"],
                               max_eval_examples=section["max_eval_examples"], select=section["select"],
                               select_examples=section["select_examples"],
                               lr_reference_width=section["lr_reference_width"],
                               progress=lambda message: print(f"  glue {label}: {message}", file=sys.stderr),
                               bars=suite.bars, bar_label=f"glue {label}: ")
