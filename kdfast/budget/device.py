"""What the calibration needs to know about the device: identity, peak FLOP/s, free memory."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from kdfast.runtime.environment import device_name

# Dense bf16 tensor-core peaks (FLOP/s) from the vendor data sheets, matched on the device name.
PEAK_BF16 = (
    ("H200", 989e12, "H200 bf16 dense (data sheet)"),
    ("H100 PCIe", 756e12, "H100 PCIe bf16 dense (data sheet)"),
    ("H100", 989e12, "H100 SXM bf16 dense (data sheet)"),
    ("A100", 312e12, "A100 bf16 dense (data sheet)"),
)


def resolve_device(name: str) -> torch.device:
    """``'cuda'``/``'cuda:N'``/``'cpu'``; ValueError when CUDA is asked for but absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected 'cuda', 'cuda:N' or 'cpu', got {name!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda', 'cuda:N' or 'cpu', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected a CUDA device for --device {name}, got none (torch "
                         f"{torch.__version__} sees no GPU); run with --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or MemAvailable of the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def table_peak(device: torch.device) -> Optional[tuple[float, str]]:
    """(peak bf16 FLOP/s, source) for a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, peak, source in PEAK_BF16:
        if key in name:
            return peak, source
    return None


def matmul_ceiling(device: torch.device, quick: bool = False) -> tuple[float, str]:
    """(FLOP/s, source) of the best of a few square matmuls: bf16 on CUDA, fp32 on CPU."""
    n = (512 if quick else 1024) if device.type == "cpu" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best, f"measured matmul ceiling ({n}x{n} {str(dtype).replace('torch.', '')})"


def peak_flops(device: torch.device, quick: bool = False) -> tuple[float, str]:
    return table_peak(device) or matmul_ceiling(device, quick)
