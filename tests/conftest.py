"""Shared test setup: poisoned kernel outputs, seeded RNG, the optional ../shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("KDFAST_POISON", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests using it skip on a clone without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI and dev machines have it beside the repo)")
    return SHARED_DATA


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


needs_triton_interpreter = pytest.mark.skipif(
    not interpreting_triton(), reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 (set in .ci/run)")
