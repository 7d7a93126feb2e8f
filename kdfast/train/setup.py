"""What ``kdfast compare`` and ``kdfast pretrain`` share before training: the command-line flags and
config, the corpus and GLUE folder found offline, the tokenizer, the packed data and the teacher.
Everything here runs (and fails on bad input) before the budget clock starts."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from kdfast.data import corpus, dataset
from kdfast.data import tokenizer as tokenizers
from kdfast.train import config as config_lib

AUTO = "auto"
SHARED_TEXT = ("text/wikitext2-test.txt", "text/wikitext2-valid.txt")  # (train, held out) under shared/data


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.budget=4h student.preset=6L-768")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, help="YAML config (keys as in kdfast/configs/tiny.yaml)")
    source.add_argument("--preset", default=None, help="a config in kdfast/configs/: tiny, study-base, study-large")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILES_OR_DIR",
                        help="training text: files, directories of *.txt, hf:NAME[/CONFIG][:SPLIT]")
    parser.add_argument("--heldout", nargs="+", default=None, help="held-out text for the MLM loss curve")
    parser.add_argument("--teacher", default=None, help="teacher: HF name or directory (default: the config's)")
    parser.add_argument("--teacher-cache", default=None, metavar="ROOT",
                        help="cached arms (vanilla-cached-*): their caches are ROOT/<kind>-<K> (built there if absent)")
    parser.add_argument("--budget", default=None, help="per-arm budget: 4h, 14400s, 3e18flop, 4.6e9tok")
    parser.add_argument("--unique-tokens", type=float, default=None,
                        help="limited-data mode: keep this many distinct training tokens (arms repeat them)")
    parser.add_argument("--masking", choices=["dynamic", "static"], default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--out", default=None, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoints in --out")


def load_config(args: argparse.Namespace, extra: Optional[List[str]] = None) -> dict:
    """The config of a command line: preset or YAML, the flags, then KEY=VALUE overrides."""
    flags = {"data.train": args.data, "data.heldout": args.heldout, "teacher.path": args.teacher,
             "teacher.cache": getattr(args, "teacher_cache", None),
             "train.budget": args.budget, "data.unique_tokens": args.unique_tokens, "data.masking": args.masking,
             "device": args.device, "out": args.out}
    overrides = [f"{key}={value!r}" if isinstance(value, list) else f"{key}={value}"
                 for key, value in flags.items() if value is not None]
    config = config_lib.load(args.config, args.preset, [*overrides, *(extra or []), *args.overrides])
    if isinstance(config["data"]["train"], str):
        config["data"]["train"] = [config["data"]["train"]]
    if isinstance(config["data"]["heldout"], str):
        config["data"]["heldout"] = [config["data"]["heldout"]]
    return config


CHECKOUT_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # beside a source checkout


def shared_data_dir() -> Optional[Path]:
    """``shared/data`` beside this checkout (``CHECKOUT_SHARED``) when present; never one found from the
    working directory, so where a command is started does not change its data."""
    return CHECKOUT_SHARED if CHECKOUT_SHARED.is_dir() else None


def resolve_auto(config: dict, announce=None) -> dict:
    """``data.train: [auto]``: WikiText-2 from shared/data when present (test split to train on,
    validation split held out), else the Python documentation that ships with CPython (a quarter of
    its documents held out).
    ``glue.data_dir: auto``: shared/data/glue when present, else no GLUE evaluation offline.
    ``announce`` (default: print to stderr on rank 0) gets one line saying what was chosen and why."""
    shared = shared_data_dir()
    where = f"shared/data beside the checkout ({shared})" if shared else \
        f"no shared/data beside the checkout ({CHECKOUT_SHARED})"
    data, glue = config["data"], config["glue"]
    corpus_why = "as configured"
    if data["train"] == [AUTO]:
        files = [shared / name for name in SHARED_TEXT] if shared else []
        if files and all(f.is_file() for f in files):
            data["train"], data["heldout"] = [str(files[0])], [str(files[1])]
            corpus_why = f"auto: WikiText-2 from {where}"
        else:
            data["train"], data["heldout"] = [corpus.BUILTIN_PYTHON_DOCS], [corpus.BUILTIN_PYTHON_DOCS_HELDOUT]
            corpus_why = f"auto: CPython's documentation, {where if not shared else f'no {SHARED_TEXT[0]} in {shared}'}"
    glue_why = "as configured"
    if glue["data_dir"] == AUTO:
        found = shared / "glue" if shared is not None and (shared / "glue").is_dir() else None
        glue["data_dir"] = str(found) if found else None
        glue["tasks"] = glue["tasks"] if found else []
        glue_why = f"auto: {where}" + ("" if found or not shared else ", which holds no glue/")
    heldout = ", ".join(map(str, data["heldout"] or [])) or f"a {data['heldout_fraction']:g} split of it"
    tasks = ", ".join(glue["tasks"]) if glue["tasks"] else "none"
    (announce or _announce)(f"kdfast: corpus {', '.join(map(str, data['train']))}, held out {heldout} ({corpus_why}); "
                            f"GLUE tasks {tasks} from {glue['data_dir'] or 'nowhere offline'} ({glue_why})")
    return config


def _announce(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def tokenizer_for(config: dict, cache_dir: Path, context=None):
    """The teacher's tokenizer, or (``teacher.build_tokenizer`` > 0, no teacher path) a WordPiece one
    trained on the corpus and cached in ``cache_dir`` (by rank 0; the other ranks wait, then load it)."""
    teacher = config["teacher"]
    if teacher["tokenizer"] or teacher["path"]:
        return tokenizers.load(teacher["tokenizer"] or teacher["path"])
    if teacher["build_tokenizer"] <= 0:
        raise ValueError("teacher: expected teacher.path (a pretrained teacher) or teacher.build_tokenizer > 0 "
                         "(build a tokenizer and pretrain a small teacher), got neither")
    from kdfast.runtime.distributed import Context, barrier

    context = context or Context()
    corpus.check_sources(config["data"]["train"])
    if context.is_main and not (cache_dir / "tokenizer.json").is_file():
        tokenizers.build_wordpiece(corpus.documents(config["data"]["train"]), teacher["build_tokenizer"], cache_dir)
    barrier(context)
    return tokenizers.load(str(cache_dir))


def load_data(config: dict, tokenizer) -> dataset.PretrainData:
    data = config["data"]
    unique = None if data["unique_tokens"] is None else int(float(data["unique_tokens"]))
    max_tokens = None if data["max_tokens"] is None else int(float(data["max_tokens"]))
    return dataset.load(data["train"], tokenizer, data["seq_len"], data["heldout"] or None, data["heldout_fraction"],
                        data["heldout_sequences"], unique, max_tokens, data["masking"], data["mask_prob"],
                        data["max_predictions"])


def load_teacher_checked(path: str, tokenizer, device):
    """The frozen teacher at ``path``, refusing a tokenizer whose vocabulary it does not use."""
    import torch

    from kdfast.models import load_teacher

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = load_teacher(path, dtype=dtype, device=device)
    saved = tokenizers.find_saved(path)
    tokenizers.check_matches(tokenizer, teacher.config.vocab_size,
                             tokenizers.load(saved) if saved else None)
    return teacher
