"""Probing tasks built from raw held-out text, after the SentEval probing suite (Conneau et al. 2018,
"What you can cram into a single vector"), scaled down and needing no parser or labels.

- ``bshift`` (bigram shift; word order): two adjacent words of the sentence are swapped, or not.
  Binary, balanced: chance 50%.
- ``sentlen`` (sentence length; surface): which of 6 length bins (words: 5-8, 9-12, 13-16, 17-20,
  21-25, 26-40) the sentence falls in. Classes balanced by down-sampling: chance 1/6.
- ``wc`` (word content; lexical): which of N mid-frequency words (frequency ranks after the 100
  most frequent) the sentence contains, each sentence containing exactly one of them. Balanced:
  chance 1/N.
- ``adjacent`` (discourse coherence; a sentence pair): is the second sentence the one that follows
  the first in its document, or a sentence drawn from elsewhere in the corpus? Balanced: chance 50%.
- ``prevword`` (context encoding; token level, not in SentEval): from the state of a word's first
  word-piece, which of the N most frequent words stands just before it? Balanced: chance 1/N.
- ``nextword`` (the same, looking right): which of the N most frequent words stands just after it?
  A masked-LM encoder is trained to read both sides; the two directions need not be learnt alike.
  Sentence pooling hides what a briefly pretrained encoder knows of its neighbours; these two probes read
  it at the token (the token-level probing of Liu et al. 2019, "Linguistic Knowledge and
  Transferability of Contextual Representations").

Every task is a deterministic function of the sentences and a seed: a fixed test split (shared by
every model and probe seed, so models are compared on the same examples) and a pool that probe
seeds divide into train and dev.
"""
from __future__ import annotations

import collections
import random
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

TASK_NAMES = ("bshift", "sentlen", "wc", "adjacent", "prevword", "nextword")
LENGTH_BINS = ((5, 8), (9, 12), (13, 16), (17, 20), (21, 25), (26, 40))
MIN_WORDS, MAX_WORDS = 5, 40
NEIGHBOUR_CLASSES = 10
MIN_SPLIT = 200  # fewer test (or train+dev) examples than this make a task too weak to report
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


@dataclass
class ProbeTask:
    """``texts`` [n]: (sentence,), (sentence, sentence) pairs, or (sentence, word index) for token-level
    tasks; integer ``labels`` [n]; ``test`` indices fixed, ``pool`` the rest."""

    name: str
    measures: str
    texts: List[Tuple[str, ...]]
    labels: List[int]
    classes: List[str]
    test: List[int]
    pool: List[int]
    chance: float = field(init=False)

    def __post_init__(self):
        counts = collections.Counter(self.labels[i] for i in self.test)
        self.chance = max(counts.values()) / len(self.test)  # the majority-class rate on the test split

    @property
    def pair(self) -> bool:
        return len(self.texts[0]) == 2 and isinstance(self.texts[0][1], str)

    @property
    def token_level(self) -> bool:
        return len(self.texts[0]) == 2 and isinstance(self.texts[0][1], int)

    def split(self, seed: int, dev_fraction: float = 0.2) -> Tuple[List[int], List[int]]:
        """(train, dev) indices of the pool for probe seed ``seed``."""
        pool = list(self.pool)
        random.Random(seed).shuffle(pool)
        cut = max(1, int(len(pool) * dev_fraction))
        return pool[cut:], pool[:cut]


def sentences(documents: Iterable[str]) -> List[List[str]]:
    """Per document, its sentences of MIN_WORDS..MAX_WORDS whitespace words (mostly alphabetic)."""
    out = []
    for doc in documents:
        kept = []
        for sentence in _SENTENCE_END.split(" ".join(doc.split())):
            words = sentence.split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and sum(map(bool, map(_WORD.match, words))) >= 0.6 * len(words):
                kept.append(sentence)
        if kept:
            out.append(kept)
    return out


def _finish(name: str, measures: str, texts, labels, classes, test_size: int, pool_size: int,
            rng: random.Random) -> ProbeTask:
    order = list(range(len(texts)))
    rng.shuffle(order)
    test, pool = order[:test_size], order[test_size:test_size + pool_size]
    return ProbeTask(name, measures, [texts[i] for i in test + pool], [labels[i] for i in test + pool], classes,
                     list(range(len(test))), list(range(len(test), len(test) + len(pool))))


def _balanced(items: Dict[int, List], rng: random.Random) -> Tuple[List, List[int]]:
    """Down-sample every class to the smallest one's count."""
    smallest = min(len(v) for v in items.values())
    texts, labels = [], []
    for label in sorted(items):
        chosen = rng.sample(items[label], smallest)
        texts += chosen
        labels += [label] * smallest
    return texts, labels


def bshift(docs: List[List[str]], rng: random.Random) -> Tuple[List, List[int], List[str]]:
    texts, labels = [], []
    for sentence in (s for doc in docs for s in doc):
        words = sentence.split()
        label = rng.random() < 0.5
        if label:
            i = rng.randrange(len(words) - 1)
            if words[i] == words[i + 1]:
                continue
            words[i], words[i + 1] = words[i + 1], words[i]
        texts.append((" ".join(words),))
        labels.append(int(label))
    return texts, labels, ["original", "swapped"]


def sentlen(docs: List[List[str]], rng: random.Random) -> Tuple[List, List[int], List[str]]:
    by_bin: Dict[int, List] = collections.defaultdict(list)
    for sentence in (s for doc in docs for s in doc):
        length = len(sentence.split())
        for label, (low, high) in enumerate(LENGTH_BINS):
            if low <= length <= high:
                by_bin[label].append((sentence,))
    if len(by_bin) < len(LENGTH_BINS):
        return [], [], []
    texts, labels = _balanced(by_bin, rng)
    return texts, labels, [f"{low}-{high} words" for low, high in LENGTH_BINS]


def wc(docs: List[List[str]], rng: random.Random, words: int) -> Tuple[List, List[int], List[str]]:
    flat = [s for doc in docs for s in doc]
    counts = collections.Counter(w.lower() for s in flat for w in set(s.split()) if _WORD.match(w) and len(w) > 3)
    ranked = [w for w, _ in counts.most_common()][100:]
    targets = [w for w in ranked if counts[w] >= 20][:words]
    index = {w: i for i, w in enumerate(targets)}
    by_word: Dict[int, List] = collections.defaultdict(list)
    for sentence in flat:
        found = {index[w.lower()] for w in sentence.split() if w.lower() in index}
        if len(found) == 1:
            by_word[found.pop()].append((sentence,))
    if len(by_word) < 2:
        return [], [], []
    texts, labels = _balanced(by_word, rng)
    return texts, labels, [targets[i] for i in sorted(by_word)]


def adjacent(docs: List[List[str]], rng: random.Random) -> Tuple[List, List[int], List[str]]:
    flat = [(d, s) for d, doc in enumerate(docs) for s in range(len(doc))]
    texts, labels = [], []
    for d, doc in enumerate(docs):
        for s in range(len(doc) - 1):
            if rng.random() < 0.5:
                texts.append((doc[s], doc[s + 1]))
                labels.append(1)
            else:
                od, os_ = flat[rng.randrange(len(flat))]
                if od == d and abs(os_ - s) <= 1:
                    continue
                texts.append((doc[s], docs[od][os_]))
                labels.append(0)
    return texts, labels, ["not adjacent", "adjacent"]


def neighbour(docs: List[List[str]], rng: random.Random, words: int, offset: int
              ) -> Tuple[List, List[int], List[str]]:
    """Token-level examples (sentence, i): which of the ``words`` most frequent words stands at i + ``offset``."""
    flat = [s for doc in docs for s in doc]
    counts = collections.Counter(w.lower() for s in flat for w in s.split() if _WORD.match(w))
    targets = [w for w, _ in counts.most_common(words)]
    index = {w: i for i, w in enumerate(targets)}
    by_word: Dict[int, List] = collections.defaultdict(list)
    for sentence in flat:
        tokens = sentence.split()
        places = [i for i in range(len(tokens))
                  if 0 <= i + offset < len(tokens) and tokens[i + offset].lower() in index]
        if places:  # one position per sentence, so examples stay independent
            i = rng.choice(places)
            by_word[index[tokens[i + offset].lower()]].append((sentence, i))
    if len(by_word) < 2:
        return [], [], []
    texts, labels = _balanced(by_word, rng)
    return texts, labels, [targets[i] for i in sorted(by_word)]


MEASURES = {
    "bshift": "word order: were two adjacent words swapped? (SentEval BShift)",
    "sentlen": "surface: which of 6 sentence-length bins (SentEval SentLen)",
    "wc": "lexical content: which of N mid-frequency words the sentence holds (SentEval WC)",
    "adjacent": "discourse: does sentence B follow sentence A in its document? (pair task)",
    "prevword": "context: which frequent word precedes this word? (token level, from the word's own state)",
    "nextword": "context: which frequent word follows this word? (token level, from the word's own state)",
}


def build(documents: Iterable[str], names: Sequence[str] = TASK_NAMES, seed: int = 0, test_size: int = 1000,
          pool_size: int = 2000, wc_words: int = 20, source: str = "the probe corpus") -> List[ProbeTask]:
    """The probing tasks ``names`` from ``documents``; refuses a corpus too small for any of them
    (fewer than min(test_size, 200) test or min(pool_size, 200) train+dev examples)."""
    min_test, min_pool = min(test_size, MIN_SPLIT), min(pool_size, MIN_SPLIT)
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise ValueError(f"probes.tasks: expected names among {', '.join(TASK_NAMES)}, got {list(names)!r}")
    docs = sentences(documents)
    builders = {"bshift": bshift, "sentlen": sentlen, "adjacent": adjacent,
                "wc": lambda d, r: wc(d, r, wc_words), "prevword": lambda d, r: neighbour(d, r, NEIGHBOUR_CLASSES, -1),
                "nextword": lambda d, r: neighbour(d, r, NEIGHBOUR_CLASSES, +1)}
    tasks = []
    for name in names:
        rng = random.Random(f"{seed}/{name}")
        texts, labels, classes = builders[name](docs, rng)
        available = len(texts)
        test = min(test_size, available // 2)
        if test < min_test or available - test < min_pool:
            raise ValueError(f"probes: expected {source} to give the {name!r} task at least {min_test} test and "
                             f"{min_pool} train/dev examples, got {available} examples in total from "
                             f"{sum(map(len, docs))} usable sentences; give a larger held-out corpus "
                             f"(data.heldout or eval.probe_corpus) or drop the task (eval.probe_tasks)")
        tasks.append(_finish(name, MEASURES[name], texts, labels, classes, test, pool_size, rng))
    return tasks


def describe(task: ProbeTask, sizes: Optional[Dict[str, int]] = None) -> Dict:
    """JSON-ready facts of a task for the report."""
    return {"name": task.name, "measures": task.measures, "classes": len(task.classes), "chance": task.chance,
            "test": len(task.test), "pool": len(task.pool), **(sizes or {})}
