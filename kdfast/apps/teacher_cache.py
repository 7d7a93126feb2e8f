"""``kdfast teacher-cache build``: build (or find, when its fingerprint matches) the sparse-target
cache of a teacher over the run's unique, statically masked corpus; ``ensure`` is what
``kdfast pretrain``/``compare`` call for the cached arms. A causal-LM teacher goes to
``kdfast.apps.causal_teacher_cache`` (every target position of the packed corpus, no masking)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from kdfast.apps import causal_teacher_cache
from kdfast.apps import teacher_cache_build as builder
from kdfast.cache import fingerprint as fingerprints
from kdfast.cache import store
from kdfast.cache.serve import DYNAMIC_REFUSAL, TeacherCache
from kdfast.cache.sparse import SparseSpec
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context
from kdfast.train import replicates


def ensure(directory: Path, teacher, tokenizer, data, seed: int, spec: SparseSpec, temperature: float,
           context: Optional[Context] = None, batch_size: int = 64) -> TeacherCache:
    """The cache of ``data.train`` in ``directory``: reused when its fingerprint matches these inputs,
    built when the folder holds no finished build, refused (naming the field) when it differs."""
    if data.masking.mode != "static":
        raise ValueError(DYNAMIC_REFUSAL)
    spec.check_vocab(teacher.config.vocab_size)
    wanted = fingerprints.make(tokenizer, teacher, data.train, data.masking, seed, spec, temperature)
    if not (Path(directory) / store.INDEX).is_file():
        builder.build(teacher, data.train, data.masking, Path(directory), spec, temperature, seed, wanted, context,
                      batch_size)
    return TeacherCache(directory, wanted)


def for_strategy(config: dict, strategy: str, teacher, tokenizer, data, context: Context,
                 default_root: Path, replicate: int = 0) -> TeacherCache:
    """The cache a cached arm ``strategy`` trains from: ``ROOT/<kind>-<K>`` under ROOT = ``teacher.cache``
    (else ``default_root``), K = ``teacher.cache_k``, the strategy's sparse kind and vanilla's T = 1.
    ``config`` is the replicate's (its seed draws the static masks the cache covers); replicate r >= 1
    keeps its cache under ``ROOT/rep<r>``."""
    from kdfast.strategies import STRATEGIES

    section = config["teacher"]
    proposal = section["cache_proposal_temperature"] if STRATEGIES[strategy].sparse_kind == "sample" else None
    spec = SparseSpec.parse(f"{STRATEGIES[strategy].sparse_kind}:{section['cache_k']}", proposal)
    directory = replicates.run_dir(Path(section["cache"] or default_root), replicate) / f"{spec.kind}-{spec.k}"
    return ensure(directory, teacher, tokenizer, data, config["seed"], spec, 1.0, context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kdfast.train.setup import add_common_arguments

    parser.add_argument("--sparse", required=True, help="topk:K (K largest teacher probabilities) or sample:K "
                                                        "(K draws from the proposal, importance-weighted)")
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature T of p = softmax(t/T)")
    parser.add_argument("--proposal-temperature", type=float, default=None,
                        help="sample only: proposal r = softmax(t/tau) (default tau = T, so r = p)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per teacher forward (default: 64 for a masked LM, 4096 tokens for a causal LM)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from kdfast.train import setup

    spec = SparseSpec.parse(args.sparse, args.proposal_temperature)
    config = setup.load_config(args)
    if config["teacher"]["path"] and causal_teacher_cache.is_causal_teacher(config["teacher"]["path"]):
        setup.resolve_auto(config, announce=lambda line: None)   # the causal build announces its own corpus use
        return causal_teacher_cache.run(config, spec, args.temperature, args.batch_size)
    config = setup.resolve_auto(config)
    if config["data"]["masking"] != "static":
        raise ValueError(DYNAMIC_REFUSAL)
    if not config["teacher"]["path"]:
        raise ValueError("teacher: expected --teacher PATH, got none")
    context = distributed.init(config["device"], config["dist_timeout"])
    out = Path(config["out"])
    tokenizer = setup.tokenizer_for(config, out / "tokenizer", context)
    data = setup.load_data(config, tokenizer)
    teacher = setup.load_teacher_checked(config["teacher"]["path"], tokenizer, context.device)
    cache = ensure(out, teacher, tokenizer, data, config["seed"], spec, args.temperature, context,
                   args.batch_size or 64)
    index = cache.index
    if context.is_main:
        print(f"teacher cache {out}: {index['sparse']}, {index['sequences']:,} sequences, "
              f"{index['masked_tokens']:,} masked tokens, {index['bytes_per_masked_token']:.1f} bytes per masked "
              f"token, built in {index['build_seconds']:.1f} s ({index['teacher_flops']:.3g} teacher FLOPs)",
              file=sys.stdout)
    return 0
