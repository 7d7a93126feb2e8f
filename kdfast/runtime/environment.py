"""Where and with what a number was taken: device, driver and versions, recorded in every benchmark,
calibration and device-check JSON."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the host's processor."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def package_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list, cwd: Optional[Path] = None) -> Optional[str]:
    """First line of a command's output, None when it is missing or fails."""
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else None


def git_commit() -> Optional[str]:
    """HEAD of the checkout kdfast is imported from (None outside a git checkout)."""
    return _run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent)


def environment(device: torch.device) -> dict:
    """``device`` (type), ``device_name``, driver, CUDA, versions, threads and git commit."""
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": device_name(device),
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
