"""Chunk sizing from the memory budget, and [C, V] views into the flat chunk workspace."""
from __future__ import annotations

import os
from typing import Optional

import torch

# Bytes for the two fp32 logit chunks: on CPU, big enough that the chunk matmuls run as fast as whole
# ones (~550 rows at V=30522), small next to the [N, V] logits; on GPU, far below its memory.
CPU_CHUNK_BYTES = 128 * 2**20
CUDA_CHUNK_BYTES = 1024 * 2**20
# ... but on CPU at least this many rows while free memory allows: fewer rows slow the head matmuls at LLM
# vocabularies (V = 128256, H = 2048, 2 cores: 9.2 ms per row at 128 rows, 8.5 at 256, 8.4 at 512).
CPU_MIN_CHUNK_ROWS = 256


def free_bytes(device: torch.device) -> Optional[int]:
    """Free memory of ``device`` in bytes (CUDA: the driver's count; CPU: Linux's MemAvailable), or
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def chunk_rows(rows: int, vocab: int, device: torch.device, buffers: int = 2) -> int:
    """Rows per chunk so ``buffers`` fp32 chunks [C, V] (teacher and student logits, and a softcapped
    student's dz/du) fit the memory budget: the smaller of ``CUDA_CHUNK_BYTES`` (CUDA) or, on CPU,
    ``CPU_CHUNK_BYTES`` raised to hold ``CPU_MIN_CHUNK_ROWS`` rows, and a quarter of free memory, both
    sized for two chunks and scaled by buffers / 2. Independent of the number of rows.
    ``KDFAST_VOCAB_CHUNK_ROWS`` overrides it (for experiments)."""
    forced = os.environ.get("KDFAST_VOCAB_CHUNK_ROWS")
    if forced:
        return max(1, min(rows, int(forced)))
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else max(CPU_CHUNK_BYTES, 2 * CPU_MIN_CHUNK_ROWS * vocab * 4)
    free = free_bytes(device)
    if free is not None:
        budget = min(budget, free // 4)
    return rows_within(rows, vocab, budget * 2 // buffers, buffers)


def rows_within(rows: int, vocab: int, budget: int, buffers: int = 2) -> int:
    """Rows per chunk (a multiple of 16, at least 16, at most ``rows``) whose ``buffers`` fp32 [C, V]
    chunks fit ``budget`` bytes: fewer rows for a larger vocabulary, the same bytes."""
    chunk = max(16, (budget // (buffers * vocab * 4)) // 16 * 16)
    return max(1, min(rows, chunk))


def chunk_view(buf: torch.Tensor, rows: int, vocab: int, vocab_major: bool) -> torch.Tensor:
    """A [rows, V] view of the front of the flat buffer ``buf``: row-major, or vocab-major (its
    transpose contiguous)."""
    front = buf[: rows * vocab]
    return front.view(vocab, rows).t() if vocab_major else front.view(rows, vocab)


def chunk_views(flat: torch.Tensor, slots: int, size: int, rows: int, vocab: int,
                vocab_major: bool) -> "list[Optional[torch.Tensor]]":
    """Three [rows, V] views (``chunk_view``) of the first ``slots`` consecutive size x V slots of the
    flat workspace ``flat``, None in place of the others."""
    return [chunk_view(flat[i * size * vocab:(i + 1) * size * vocab], rows, vocab, vocab_major) if i < slots
            else None for i in range(3)]
