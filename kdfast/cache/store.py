"""On-disk layout of a teacher cache: safetensors shards written atomically, read memory-mapped.

``DIR/shard-rRRRR-pPPPPP.safetensors`` (rank R's part P) holds, for S sequences and their M masked
positions (in row-major order of each sequence):
``sequence`` [S] int64 sequence index, ``offsets`` [S+1] int64 (rows of sequence i are
offsets[i]:offsets[i+1]), ``positions`` [M] int16, ``ids`` [M, K] int16 (V <= 32768) or int32,
``weights`` [M, K] float16, and for top-K ``leftover`` [M] float16 (1 - Σ top-K probabilities).
``DIR/cache.json`` (written last, so its presence means the build finished) lists every shard
with its size and CRC-32, the fingerprint and the build statistics.
Every file goes through a temporary name, fsync and rename: an interrupted build (ENOSPC, kill)
leaves no file a reader would take for a shard.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from kdfast.runtime.io import atomic_open

INDEX = "cache.json"
FORMAT = 1
_NUMPY = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "F16": np.float16}
_TORCH = {torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.float16: "F16"}


def shard_name(rank: int, part: int) -> str:
    return f"shard-r{rank:04d}-p{part:05d}.safetensors"


def id_dtype(vocab: int) -> torch.dtype:
    """The smallest signed integer holding ids in [-1, vocab)."""
    return torch.int16 if vocab <= 2**15 else torch.int32


def write_shard(path: Path, tensors: dict) -> dict:
    """Write ``tensors`` (name -> CPU tensor of a dtype in ``_TORCH``) atomically; returns the shard's
    index entry (file name, bytes, crc32)."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"kdfast_cache": str(FORMAT)})
    with atomic_open(path) as f:
        f.write(data)
    return {"file": path.name, "bytes": len(data), "crc32": zlib.crc32(data)}


class CacheFileError(ValueError):
    """A cache file that is missing, truncated, corrupt or not a kdfast cache shard."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"teacher cache: {path}: {what}; rebuild it with `kdfast teacher-cache build`")


def read_shard(path: Path, entry: dict, verify: bool = True) -> dict:
    """Memory-mapped tensors of one shard (name -> torch tensor over a copy-on-write np.memmap), after
    checking its size against ``entry``, its CRC-32 when ``verify``, and its header."""
    if not path.is_file():
        raise CacheFileError(path, "expected a shard listed in cache.json, got no such file")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CacheFileError(path, f"expected {entry['bytes']} bytes, got {size} (truncated or overwritten)")
    if verify:
        crc = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
        if crc != entry["crc32"]:
            raise CacheFileError(path, f"expected CRC-32 {entry['crc32']}, got {crc} (corrupt)")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= size - 8:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
        start = 8 + length
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            dtype = np.dtype(_NUMPY[info["dtype"]])
            count = int(np.prod(info["shape"], dtype=np.int64))
            if not 0 <= lo <= hi <= size - start or hi - lo != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r} at bytes {lo}:{hi}")
            array = np.memmap(path, dtype=dtype, mode="c", offset=start + lo, shape=tuple(info["shape"])) \
                if count else np.zeros(info["shape"], dtype=dtype)
            tensors[name] = torch.from_numpy(array) if count else torch.from_numpy(array.copy())
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as err:
        raise CacheFileError(path, f"expected a safetensors shard, got an unreadable header ({err})") from None
    if header.get("__metadata__", {}).get("kdfast_cache") != str(FORMAT):
        raise CacheFileError(path, f"expected a kdfast cache shard of format {FORMAT}, got metadata "
                                   f"{header.get('__metadata__')}")
    return tensors


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheFileError(path, "expected this file of a finished build, got none (the build did not finish "
                                   "or this is not a teacher cache folder)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheFileError(path, f"expected JSON, got an unreadable file ({err})") from None


def read_index(directory: Path) -> dict:
    """``cache.json`` of a finished build in ``directory``."""
    index = read_json(Path(directory) / INDEX)
    if index.get("format") != FORMAT:
        raise CacheFileError(Path(directory) / INDEX, f"expected format {FORMAT}, got {index.get('format')!r}")
    return index
