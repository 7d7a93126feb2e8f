"""What must match before results of two runs are put side by side: corpus, tokenizer and teacher.

``of(...)`` gives ``{"corpus", "tokenizer", "teacher"}``, each ``{"sha256": first 32 hex digits,
"describe": words}``, hashing content rather than names with the hashes of ``kdfast.runtime.fingerprint``
(those of the teacher cache's fingerprint):
- corpus: the packed training and held-out token ids (the same text under another path matches; another
  ``unique_tokens``, ``seq_len`` or held-out split does not);
- tokenizer: its vocabulary (token -> id pairs, sorted);
- teacher: its weights (every tensor of the state dict in key order, rounded to bf16).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from kdfast.runtime.fingerprint import teacher_hash, tokenizer_hash, tokens_hash

FIELDS = ("corpus", "tokenizer", "teacher")


def of(tokenizer, data, teacher, sources: Sequence[str], teacher_row: dict) -> dict:
    """The fingerprint of a run's tokenizer, packed data (``data.train``, ``data.heldout`` [N, L]) and
    frozen teacher (an ``nn.Module``)."""
    return {
        "corpus": {"sha256": tokens_hash(data.train.cpu(), data.heldout.cpu()),
                   "describe": f"{', '.join(sources)}: {data.train.numel():,} training tokens, "
                               f"{data.heldout.numel():,} held out"},
        "tokenizer": {"sha256": tokenizer_hash(tokenizer), "describe": f"{len(tokenizer.get_vocab())} tokens"},
        "teacher": {"sha256": teacher_hash(teacher),
                    "describe": teacher_row.get("description", teacher_row.get("model", "?"))},
    }


def differences(before: dict, now: dict, prefix: str = "") -> List[Tuple[str, object, object]]:
    """(dotted key, value before, value now) for every leaf where two nested dicts differ."""
    found = []
    for key in list(before) + [k for k in now if k not in before]:
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append((prefix + key, old, new))
    return found


def check_same(named: Sequence[Tuple[str, dict]]) -> None:
    """Refuse runs (name, fingerprint) whose corpus, tokenizer or teacher differ from the first's."""
    first_name, first = named[0]
    for name, other in named[1:]:
        for field in FIELDS:
            a, b = (first or {}).get(field), (other or {}).get(field)
            if a is None or b is None or a["sha256"] != b["sha256"]:
                describe = [f"{x['describe']} (sha256 {x['sha256']})" if x else "no fingerprint" for x in (a, b)]
                raise ValueError(f"{name}: expected the {field} of {first_name}, {describe[0]}, got {describe[1]}")
