"""``kdfast teacher-cache build`` for a causal-LM teacher (Llama, Qwen, GPT-2, ...): pack the data with the
teacher's tokenizer, then build the cache of every target position, or reuse the folder's cache when its
fingerprint matches (refused, naming the field, when it does not)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from kdfast.apps import causal_teacher_cache_build as causal_build
from kdfast.cache import causal, store
from kdfast.cache import fingerprint as fingerprints
from kdfast.cache.sparse import SparseSpec
from kdfast.data import causal_packing
from kdfast.data import tokenizer as tokenizers
from kdfast.runtime import distributed

TOKENS_PER_BATCH = 4096   # default teacher batch: sequences of L tokens holding about this many tokens


def is_causal_teacher(path: str) -> bool:
    """True when the saved model at ``path`` is a causal LM (its config's architectures, else its model
    type, is one of transformers' causal-LM classes and not a masked LM)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        names = set()
        for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            names.update((value,) if isinstance(value, str) else value)
        return any(name in names for name in architectures)
    return (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def load_teacher(path: str, device: torch.device) -> torch.nn.Module:
    """The frozen causal LM at ``path`` (bf16 on CUDA, fp32 on CPU), in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def check_tokenizer(tokenizer, vocab: int, path: str) -> None:
    """Every token id of ``tokenizer`` must address a row of the teacher's head (V may be padded above it)."""
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer: expected at most the teacher's vocabulary size V={vocab} tokens, got "
                         f"{len(tokenizer)} from {path!r}; use the tokenizer saved with the teacher")


def run(config: dict, spec: SparseSpec, temperature: float, batch_size: Optional[int]) -> int:
    """Build (or reuse) the causal cache of ``config``'s data in ``config['out']``."""
    path, data = config["teacher"]["path"], config["data"]
    seq_len = int(data["seq_len"])
    max_tokens = next((int(float(data[key])) for key in ("unique_tokens", "max_tokens") if data[key] is not None),
                      None)
    context = distributed.init(config["device"])
    out = Path(config["out"])
    if context.is_main:
        print(f"kdfast: causal teacher cache of {', '.join(map(str, data['train']))} (all of it: no held-out split), "
              f"{seq_len}-token sequences" + (f", at most {max_tokens:,} tokens" if max_tokens else ""),
              file=sys.stderr, flush=True)
    tokenizer = tokenizers.load(config["teacher"]["tokenizer"] or path)
    sequences = causal_packing.load(data["train"], tokenizer, seq_len, max_tokens)
    wanted = causal.make_fingerprint(tokenizer, path, sequences, spec, temperature)
    if (out / store.INDEX).is_file():
        fingerprints.check(store.read_index(out).get("fingerprint", {}), wanted, str(out))
    else:
        teacher = load_teacher(path, context.device)
        check_tokenizer(tokenizer, teacher.config.vocab_size, path)
        spec.check_vocab(teacher.config.vocab_size)
        about = {"teacher_path": str(path), "teacher_class": type(teacher).__name__}
        causal_build.build(teacher, sequences, out, spec, temperature, wanted, context,
                           batch_size or max(1, TOKENS_PER_BATCH // seq_len), int(config["seed"]), about)
        del teacher
    index = causal.CausalTeacherCache(out).index
    if context.is_main:
        print(f"teacher cache {out}: {index['sparse']} of causal LM {path}, {index['sequences']:,} sequences of "
              f"{index['seq_len']} tokens, {index['target_tokens']:,} target tokens, "
              f"{index['bytes_per_target_token']:.1f} bytes per target token (ids {index['id_bytes']} B, weights "
              f"float24), built in {index['build_seconds']:.1f} s", file=sys.stdout)
    return 0
