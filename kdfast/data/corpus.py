"""Text sources for pretraining, each yielding documents (str).

A source is one of:
- a local text file or a directory of ``*.txt`` files (UTF-8; empty or binary files are refused);
- a ``.jsonl`` file: one JSON object per line, its ``text`` field a document;
- ``hf:NAME[/CONFIG][:SPLIT]``, an HF ``datasets`` corpus, streamed (column ``text``);
- ``builtin:python-docs``, the Python documentation that ships with every CPython: the reference
  topics (``pydoc_data.topics``) and the docstrings of the standard library's modules, classes and
  functions (read with ``ast``, nothing imported), about 2 MB of real English text on any machine,
  with no network. A quarter of its documents (chosen by a CRC32 of their text) is held out as
  ``builtin:python-docs:heldout`` and never appears in ``builtin:python-docs``.
"""
from __future__ import annotations

import ast
import functools
import json
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
BUILTIN_PYTHON_DOCS_HELDOUT = "builtin:python-docs:heldout"
_BUILTIN = (BUILTIN_PYTHON_DOCS, BUILTIN_PYTHON_DOCS_HELDOUT)
_HELDOUT_EVERY = 4  # one document in four is held out
_SNIFF_BYTES = 1 << 16


def check_text_file(path: Path) -> None:
    """Refuse a missing, empty, binary or non-UTF-8 file with a message naming it."""
    if not path.is_file():
        raise ValueError(f"data: expected an existing text file or directory, got {str(path)!r} (not found)")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head.strip():
        raise ValueError(f"data: expected a non-empty text corpus, got {str(path)!r} (empty)")
    if b"\x00" in head:
        raise ValueError(f"data: expected a UTF-8 text corpus, got {str(path)!r} (binary: contains NUL bytes)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not merely a multi-byte character cut by the sniff window
            raise ValueError(f"data: expected a UTF-8 text corpus, got {str(path)!r} "
                             f"(undecodable byte at offset {err.start})") from None


def resolve_files(source: str) -> List[Path]:
    """The text files behind a local source (a file, or the sorted ``*.txt`` files of a directory)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data: expected a directory holding *.txt files, got {source!r} (none found)")
    else:
        files = [path]
    for file in files:
        check_text_file(file)
    return files


def check_sources(sources: Sequence[str]) -> None:
    """Validate every source before training starts (local files are read; HF names only parsed)."""
    if not sources:
        raise ValueError("data: expected at least one text source, got none")
    for source in sources:
        if source in _BUILTIN:
            _topics()
        elif source.startswith("hf:"):
            _parse_hf(source)
        else:
            resolve_files(source)


def documents(sources: Sequence[str]) -> Iterator[str]:
    """Documents of every source in order: blank-line separated blocks of local files,
    HF rows, or the topics of the built-in Python documentation."""
    for source in sources:
        if source in _BUILTIN:
            heldout = source == BUILTIN_PYTHON_DOCS_HELDOUT
            yield from (doc for doc in _python_docs() if (zlib.crc32(doc.encode()) % _HELDOUT_EVERY == 0) == heldout)
        elif source.startswith("hf:"):
            yield from _hf_documents(source)
        else:
            for file in resolve_files(source):
                yield from (_jsonl_documents if file.suffix == ".jsonl" else _file_documents)(file)


def _file_documents(path: Path) -> Iterator[str]:
    block: List[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                block.append(line.strip())
            elif block:
                yield " ".join(block)
                block = []
    if block:
        yield " ".join(block)


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"data: expected a JSON object with a 'text' string on each line of {str(path)!r}, "
                                 f"got line {number}: {line.strip()[:80]!r} ({type(err).__name__})") from None
            if not isinstance(text, str):
                raise ValueError(f"data: expected a 'text' string on line {number} of {str(path)!r}, got "
                                 f"{type(text).__name__}")
            if text.strip():
                yield text.strip()


def _python_docs() -> Iterator[str]:
    """The reference topics, then the standard library's docstrings of 8 words or more, in file order
    (the docstrings are read only when a consumer goes past the topics)."""
    yield from _topics()
    yield from _docstrings()


def _topics() -> List[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise ValueError(f"data: {BUILTIN_PYTHON_DOCS} needs the standard library's pydoc_data, which this "
                         "Python lacks; pass --data FILES_OR_DIR instead") from None
    return [" ".join(topics[name].split()) for name in sorted(topics)]


@functools.lru_cache(maxsize=1)
def _docstrings() -> Tuple[str, ...]:
    docs = []
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text.split()) >= 8:
                    docs.append(" ".join(text.split()))
    return tuple(docs)


def _parse_hf(source: str) -> tuple:
    spec, _, split = source[3:].partition(":")
    name, _, config = spec.partition("/")
    if not name:
        raise ValueError(f"data: expected hf:NAME[/CONFIG][:SPLIT], got {source!r}")
    return name, config or None, split or "train"


def _hf_documents(source: str) -> Iterator[str]:
    import datasets

    name, config, split = _parse_hf(source)
    rows = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in rows:
        text = row.get("text")
        if text is None:
            raise ValueError(f"data: expected a 'text' column in {source!r}, got columns {sorted(row)}")
        if text.strip():
            yield text.strip()
