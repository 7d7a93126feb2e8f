"""Files that appear whole or not at all: a temporary name, flush, fsync, rename, then fsync of the folder
(rename is atomic on POSIX), so an interrupted writer (ENOSPC, kill) never leaves a file a reader takes
for a finished one."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Iterator


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` whole (on leaving the block) or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_json(path: Path, value, sort_keys: bool = False) -> None:
    """``value`` as indented JSON at ``path``, atomically."""
    with atomic_open(Path(path)) as f:
        f.write(json.dumps(value, indent=1, sort_keys=sort_keys).encode())
