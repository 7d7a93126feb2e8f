"""Compile every Triton kernel for real GPUs without one, and read registers and spills.

Each kernel module in ``kdfast.triton`` exposes ``STATIC_COMPILE_SPECS``: a list of
:class:`KernelSpec` with representative compile-time constants. ``check_all`` compiles each for
sm_80 and sm_90 with ``triton.compile`` and runs the bundled ``ptxas -v`` on the PTX.

Must run in a process *without* ``TRITON_INTERPRET=1`` (there ``@triton.jit`` returns interpreter
functions that ``triton.compile`` rejects): ``python -m kdfast.triton.static [--json PATH]``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ARCHS = (80, 90)


@dataclass
class KernelSpec:
    """One kernel configuration to compile: ``signature`` maps every argument to a Triton type
    ("*fp32", "*bf16", "i32", "fp32", "constexpr"); ``constexprs`` gives the constexpr values."""

    name: str
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2


def all_specs() -> list[KernelSpec]:
    import kdfast.triton as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "static":
            continue
        module = importlib.import_module(f"kdfast.triton.{info.name}")
        specs.extend(getattr(module, "STATIC_COMPILE_SPECS", ()))
    return specs


def _ptxas() -> str:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {bin_dir}")


def parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return {
        "registers": max(map(int, regs)) if regs else None,
        "spill_bytes": sum(int(a) + int(b) for a, b in spills),
        "stack_bytes": max(map(int, stack)) if stack else 0,
    }


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>``; returns registers, spill bytes, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    return {"kernel": spec.name, "arch": gpu, "shared_bytes": kernel.metadata.shared,
            **parse_ptxas(ptxas_log(kernel.asm["ptx"], gpu, spec.name))}


def ptxas_log(ptx: str, gpu: str, name: str) -> str:
    """``ptxas -v``'s report on ``ptx`` for ``gpu``. Stored beside Triton's own cache, keyed by the PTX, the GPU
    and the ptxas binary, so an unchanged kernel is not assembled again (Triton caches the PTX the same way)."""
    import hashlib

    from triton import knobs

    ptxas = _ptxas()
    binary = os.stat(ptxas)
    key = hashlib.sha256(f"{gpu}\0{ptxas}\0{binary.st_size}\0{binary.st_mtime_ns}\0{ptx}".encode()).hexdigest()
    stored = os.path.join(knobs.cache.dir, "kdfast-ptxas", f"{key}.log")
    if os.path.isfile(stored):
        with open(stored) as fh:
            return fh.read()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name} on {gpu}:\n{proc.stderr}")
    os.makedirs(os.path.dirname(stored), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(stored), delete=False) as fh:
        fh.write(proc.stdout + proc.stderr)
    os.replace(fh.name, stored)
    return proc.stdout + proc.stderr


def check_all() -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the static compile without TRITON_INTERPRET=1")
    return [compile_spec(spec, arch) for spec in all_specs() for arch in ARCHS]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the per-kernel report here")
    args = parser.parse_args(argv)
    rows = check_all()
    for row in rows:
        print(f"{row['kernel']:<40} {row['arch']:<7} regs={row['registers']} spill={row['spill_bytes']}B "
              f"smem={row['shared_bytes']}B")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    spilled = [r for r in rows if r["spill_bytes"]]
    if spilled:
        print(f"{len(spilled)} kernel builds spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
