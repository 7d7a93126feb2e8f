"""Build kdfast's two native extensions without torch in the build environment.

- ``kdfast._C``    : pybind11 + C++17 + OpenMP CPU kernels (csrc/*.cpp). Always attempted.
- ``kdfast._cuda`` : pybind11 bindings (csrc/cuda/*.cpp, host compiler) linked with
                    nvcc-compiled device code (kernels/*.cu), ``-cudart static``.
                    Built when nvcc is found; ``KDFAST_BUILD_CUDA=0/1`` forces the choice.

Both take raw pointers, strides, sizes and (on CUDA) a stream handle, so neither links
against libtorch. A failed ``_C`` build leaves a working package on the ``torch``
reference backend and says so; a failed CUDA build is fatal only when it was forced.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "86", "90")  # plus PTX for the newest, so later GPUs JIT it


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_wanted() -> str | None:
    flag = os.environ.get("KDFAST_BUILD_CUDA", "").strip()
    nvcc = find_nvcc()
    if flag == "0":
        return None
    if flag == "1" and nvcc is None:
        raise RuntimeError("KDFAST_BUILD_CUDA=1 but no nvcc was found: set CUDA_HOME or put nvcc on PATH")
    return nvcc


def _spill_report(ptxas_log: str) -> list[str]:
    """Lines of a ``-Xptxas -v`` log that report non-zero spill bytes."""
    bad = []
    for line in ptxas_log.splitlines():
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and (int(m.group(1)) or int(m.group(2))):
            bad.append(line.strip())
    return bad


class KdfastBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            if ext.name == "kdfast._cuda":
                self._compile_cuda_objects(ext)
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - we re-raise unless the extension is optional
            if ext.name == "kdfast._cuda" and os.environ.get("KDFAST_BUILD_CUDA") == "1":
                raise
            if ext.name == "kdfast._cuda":
                msg = "kdfast: the CUDA extension failed to build; GPU calls use Triton or torch"
            else:
                msg = ("kdfast: the C++ CPU extension kdfast._C failed to build; CPU calls will use "
                       "the 'torch' reference backend. Install a C++17 compiler and reinstall")
            print(f"\n*** {msg}.\n*** reason: {err}\n", file=sys.stderr)

    def _compile_cuda_objects(self, ext):
        nvcc = cuda_wanted()
        build_temp = os.path.join(self.build_temp, "cuda")
        os.makedirs(build_temp, exist_ok=True)
        gencode = []
        for arch in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
        objects = []
        for src in _rel("kernels/*.cu"):
            obj = os.path.join(build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Icsrc", "-Ikernels",
                   "--threads", "0", "-Xcompiler", "-fPIC", "-Xptxas", "-v", *gencode]
            print(" ".join(cmd))
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{log}")
            spills = _spill_report(log)
            if spills:
                raise RuntimeError(f"{src}: register spills are not allowed:\n" + "\n".join(spills))
            with open(obj + ".ptxas.log", "w") as fh:
                fh.write(log)
            objects.append(obj)
        cuda_home = os.path.dirname(os.path.dirname(nvcc))
        ext.extra_objects = objects
        ext.library_dirs = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib64", "stubs")]
        ext.libraries = ["cudart_static", "rt", "pthread", "dl"]


def extensions() -> list[Pybind11Extension]:
    exts = [
        Pybind11Extension(
            "kdfast._C",
            _rel("csrc/*.cpp"),
            include_dirs=["csrc"],
            cxx_std=17,
            # -fno-trapping-math: kdfast never enables FP exceptions; without it GCC will not if-convert
            # selects around a division or an overflowing product, and loops like the JSD row kernel's
            # stay scalar. Results are unchanged (unlike -ffast-math).
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    ]
    if cuda_wanted() is not None and _rel("kernels/*.cu"):
        exts.append(
            Pybind11Extension(
                "kdfast._cuda",
                _rel("csrc/cuda/*.cpp"),
                include_dirs=["csrc", "kernels"],
                cxx_std=17,
                extra_compile_args=["-O2"],
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": KdfastBuildExt})
