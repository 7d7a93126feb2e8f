"""Run configuration: defaults, YAML presets in ``kdfast/configs/``, and ``key.sub=value`` overrides.

Every key a user gives must exist in ``DEFAULTS``; an unknown one is refused with its near matches.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped as package data

DEFAULTS: Dict[str, Any] = {
    "name": "compare",
    "out": "runs/compare",
    "seed": 0,
    "device": "auto",                     # auto | cpu | cuda
    "dist_timeout": 1800,                 # torchrun: seconds a collective waits for the other ranks, then fails
    "strategies": ["no-kd", "vanilla", "tinybert", "minilm"],
    "formulation": "canonical",           # canonical | paper
    "teacher": {
        "path": None,                     # HF name or directory of a BertForMaskedLM; None: pretrain one
        "tokenizer": None,                # defaults to the tokenizer saved with the teacher
        "build_tokenizer": 0,             # >0: train a WordPiece tokenizer of this size on the corpus first
        "layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024,   # the teacher pretrained when path is None
        "attention_dropout": 0.1,
        "budget": "240s",                 # its pretraining budget
        "lr": 1e-3,
        "charge": "none",                 # none | full | amortized:N  (teacher and teacher-cache cost to KD arms)
        "cache": None,                    # cached arms: the teacher cache folder (default: in the run folder)
        "cache_k": 32,                    # cached arms: K ids per masked position (topk:K / sample:K)
        "cache_proposal_temperature": None,   # vanilla-cached-sample: proposal softmax(t/tau); None: tau = T
    },
    "student": {"preset": None, "layers": 2, "hidden": 128, "heads": 2, "intermediate": 512, "init": "random",
                "attention_dropout": 0.1},  # 0 lets CPU attention use SDPA's flash kernel
    "data": {
        "train": [],                      # files, directories, hf:NAME[/CONFIG][:SPLIT] or builtin:python-docs
        "heldout": [],                    # empty: hold out the last heldout_fraction of train
        "heldout_fraction": 0.05,
        "heldout_sequences": 256,
        "seq_len": 128,
        "masking": "dynamic",             # dynamic | static (the study's)
        "mask_prob": 0.15,
        "max_predictions": 20,            # static masking: predictions per sequence at most
        "unique_tokens": None,            # limited-data mode: distinct training tokens
        "max_tokens": None,               # read at most this many tokens of a streamed corpus
    },
    "train": {
        "budget": "90s",                  # 4h, 14400s, 3e18flop, 4.6e9tok (kdfast.budget.units)
        "replicates": 1,                  # pretraining runs per arm (seeds: kdfast.train.replicates); calls need 3
        "max_replicates": None,           # a preset's cap on replicates (time), None: no cap
        "batch_size": 32,                 # global sequences per optimizer step
        "accumulation": 1,
        "lr": 1e-3,
        "warmup": 0.06,                   # fraction of the budget
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "eps": 1e-6,
        "grad_clip": 1.0,
        "optimizer": "adamw",             # adamw | lamb (apex FusedLAMB)
        "precision": "auto",              # auto (bf16 autocast on GPU) | fp32 | bf16
        "compile": False,
        "checkpoint_steps": 500,
        "keep_checkpoints": 2,
        "eval_points": 10,                # held-out MLM evaluations spread over the budget
        "eval_batches": 8,
        "log_steps": 10,
        "tensorboard": False,
        "progress": True,
        "calibration": None,              # JSON of `kdfast bench budget`, to convert budgets up front
        "snapshots": [],                  # smaller budgets at which the model is saved too (sweep --snapshots)
    },
    "sweep": {
        "budgets": None,                  # "15s,45s,135s", a list, or {start: 15s, factor: 3, count: 3}
        "snapshots": False,               # approximation: evaluate checkpoints of one run at the largest budget
        "draws": 1000,                    # bootstrap draws per crossover interval
    },
    "glue": {
        "tasks": ["cola", "sst2", "stsb"],
        "data_dir": None,                 # {task}/{train,validation}.jsonl; None: the HF `glue` dataset
        "seeds": [0],
        "lrs": [1e-4],
        "lr_reference_width": None,       # scale each lr by this / the model's hidden size (Adam's 1/width rule)
        "batch_sizes": [32],
        "epochs": 3,
        "seq_len": 128,
        "warmup": 0.1,
        "weight_decay": 0.01,
        "max_train_examples": None,
        "max_eval_examples": None,
        "evaluate_teacher": True,
        "select": "validation",           # validation (the study's) | dev (a split of train picks the grid point)
        "select_examples": None,          # select=dev: training rows per grid point
        "custom": {},                     # custom tasks: {name: {columns: [a, b], num_labels: N, metrics: [..]}}
    },
    "eval": {
        "level": 0.95,                    # interval level of every estimate and test, in (0, 1)
        "random_init": True,              # the floor row: a student of the same shape, zero budget
        "probe_tasks": ["bshift", "sentlen", "wc", "adjacent", "prevword", "nextword"],  # [] turns them off
        "probe_corpus": [],               # text sources for the probes; default: data.heldout (else data.train)
        "probe_seed": 0,                  # builds the tasks and their fixed test splits
        "probe_seeds": [0, 1, 2],         # probe seeds: train/dev splits of each task's pool
        "probe_test": 1000,               # test examples per task at most
        "probe_pool": 2000,               # train + dev examples per task at most
        "probe_max_length": 64,
        "mlm_probe_steps": 2000,          # most Adam steps (early stopped); 0 turns the probe off
        "mlm_probe_batch": 512,
        "mlm_probe_sequences": 1024,      # training sequences the head is fitted on
    },
}


def _dotted_keys(tree: Dict[str, Any], prefix: str = "") -> List[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, prefix + key + ".")
    return keys


def unknown_key(key: str) -> ValueError:
    """The error for a key not in DEFAULTS, listing the nearest known keys."""
    known = _dotted_keys(DEFAULTS)
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}?" if near else f"known keys: {', '.join(sorted(known))}"
    return ValueError(f"config: unknown key {key!r}; {hint}")


def merge(base: Dict[str, Any], update: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``base`` updated with ``update``; every key of ``update`` must already be in ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise unknown_key(prefix + key)
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"config: {prefix + key}: expected a mapping, got {value!r}")
            out[key] = merge(out[key], value, prefix + key + ".")
        else:
            out[key] = _coerce(prefix + key, out[key], value)
    return out


def _coerce(key: str, default: Any, value: Any) -> Any:
    """YAML reads ``1e-4`` as a string; numbers are converted where the default is a number."""
    if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config: {key}: expected a number, got {value!r}") from None
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, str):
        try:
            return int(float(value))
        except ValueError:
            raise ValueError(f"config: {key}: expected an integer, got {value!r}") from None
    return value


def parse_override(text: str) -> Dict[str, Any]:
    """``'train.budget=4h'`` -> ``{'train': {'budget': '4h'}}`` (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override: expected KEY=VALUE such as train.budget=4h, got {text!r}")
    value = yaml.safe_load(raw) if raw else None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"preset: expected one of {', '.join(names)}, got {name!r}")
    return path


def read_yaml(path: Path) -> Dict[str, Any]:
    if not Path(path).is_file():
        raise ValueError(f"config: expected a YAML file, got {str(path)!r} (not found)")
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"config: expected a mapping at the top of {str(path)!r}, got {type(tree).__name__}")
    return tree


def layers(tree: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A config tree after the layers it builds on: ``extends: NAME`` (a preset) comes first, recursively."""
    base = tree.pop("extends", None)
    return [*layers(read_yaml(preset_path(base))), tree] if base else [tree]


def load(path: Optional[str] = None, preset: Optional[str] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """DEFAULTS, then the preset or YAML file (after what it ``extends``), then each override in order."""
    config = copy.deepcopy(DEFAULTS)
    for tree in [*(layers(read_yaml(preset_path(preset))) if preset else []),
                 *(layers(read_yaml(Path(path))) if path else [])]:
        config = merge(config, tree)
    for text in overrides:
        config = merge(config, parse_override(text))
    return config
