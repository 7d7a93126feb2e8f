"""Shared test setup: poisoned kernel outputs, seeded RNG, the optional ../shared data, and how pytest-xdist
shares the suite between its workers (pyproject.toml's addopts: one worker per core)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("KDFAST_POISON", "1")
# pytest-xdist runs one worker per core: one torch thread each (two per worker oversubscribe the cores and cost
# about a fifth more CPU time); tests/test_native_threads.py runs the C++ kernels on 2 threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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


# Modules that launch several processes, in two lanes that pytest-xdist runs beside each other, each on one
# worker and one module after another: torchrun and accelerate on their default port 29500 (two such launches at
# once would collide), and torchrun --standalone (a free port) or ranks spawned with a file store.
LAUNCHING = {"test_docs_many_devices.py": "default port", "test_parallel_distillation.py": "default port",
             "test_rank_faults.py": "free ports", "test_train_pretrain.py": "free ports",
             "test_vocab_parallel.py": "free ports"}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _lane(nodeid: str) -> "str | None":
    return LAUNCHING.get(_module(nodeid).rsplit("/", 1)[-1])


def _scope(nodeid: str) -> str:
    """A worker's unit of work: the module (its module-scoped fixtures are built once), or a LAUNCHING lane."""
    lane = _lane(nodeid)
    return f"launching processes on {lane}" if lane else _module(nodeid)


def pytest_collection_modifyitems(items):
    """The launching lanes first, then the modules with a slow test, then the rest, each in file order:
    under pytest-xdist the workers start on the longest units of work and end together."""
    slow = {_module(item.nodeid) for item in items if item.get_closest_marker("slow")}
    first = {}
    for index, item in enumerate(items):
        first.setdefault(_module(item.nodeid), index)
    items.sort(key=lambda item: (_lane(item.nodeid) is None, _lane(item.nodeid) or "",
                                 _module(item.nodeid) not in slow, first[_module(item.nodeid)]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        """Whole modules (or a launching lane) per worker, in the collected order (longest first)."""

        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)
