"""Every registered Triton kernel compiles for sm_80 and sm_90 without register spills.

Runs ``python -m kdfast.triton.static`` in a subprocess without TRITON_INTERPRET (the static
compile needs real ``@triton.jit`` functions), and reads its JSON report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("triton")


def test_every_triton_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    report = tmp_path / "static.json"
    proc = subprocess.run([sys.executable, "-m", "kdfast.triton.static", "--json", str(report)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), proc.stdout + proc.stderr
    rows = json.loads(report.read_text())

    from kdfast.triton.static import all_specs

    expected = {spec.name for spec in all_specs()}
    assert expected, "no Triton kernel registers STATIC_COMPILE_SPECS"
    compiled = {(row["kernel"], row["arch"]) for row in rows}
    for name in expected:
        assert {(name, "sm_80"), (name, "sm_90a")} <= compiled, f"{name} not compiled for both archs"
    spilled = [f"{row['kernel']} on {row['arch']}: {row['spill_bytes']} B" for row in rows if row["spill_bytes"]]
    assert not spilled, "register spills: " + "; ".join(spilled)
    assert proc.returncode == 0, proc.stdout + proc.stderr
