"""``kdfast info``: versions, built extensions, the backend each op takes on CPU and CUDA, the GPU."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

import torch

from kdfast import _backends, _ext


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import kdfast

    report = {
        "kdfast": kdfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **{pkg: _version(pkg) for pkg in ("triton", "transformers", "datasets", "flash-attn", "apex")},
        "extensions": {"kdfast._C": _ext.C_ERROR or "built", "kdfast._cuda": _ext.CUDA_ERROR or "built"},
        "cpu_threads": _ext.C.num_threads() if _ext.C is not None else torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {},
    }
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op in _backends.OPS:
        report["backends"][op] = {
            "implemented": [b for b in _backends.BACKENDS if _backends.implemented(op, b)],
            **{dev.type: _backends.pick(op, dev) for dev in devices},
        }
        if not torch.cuda.is_available():
            ready = [b for b in _backends.AUTO_ORDER["cuda"] if _backends.implemented(op, b)]
            report["backends"][op]["cuda"] = f"(no GPU here; would try {', '.join(ready)})"
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for key, value in report.items():
        if key == "backends":
            print("backends (auto choice per device):")
            for op, row in value.items():
                print(f"  {op:<20} cpu -> {row['cpu']:<7} cuda -> {row['cuda']}   implemented: "
                      f"{', '.join(row['implemented'])}")
        elif key == "extensions":
            for ext, state in value.items():
                print(f"{ext:<14} {state}")
        else:
            print(f"{key:<14} {value}")
    return 0
