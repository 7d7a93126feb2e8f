"""Every command of docs/losses.md "Many devices" runs as written (2 CPU processes) and logs the losses of
the one-process run: a new user following them gets the same loss curve."""
from __future__ import annotations

import json

import many_devices_fixtures as fixtures
import pytest
from many_devices_fixtures import commands, out_dir, run

workdir = fixtures.workdir  # the module-scoped fixture, for pytest to find here


def test_the_section_has_the_launchers_and_engines():
    text = "\n".join(commands())
    assert commands()[0].startswith("python ")
    for needle in ("torchrun --nproc_per_node 2", "accelerate launch --num_processes 2", "--fsdp2", "--use_fsdp",
                   "--loop"):
        assert needle in text


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(commands())))
def test_command_gives_the_one_process_losses(index, workdir):
    reference = workdir / out_dir(commands()[0]) / "losses.json"
    if not reference.is_file():
        run(commands()[0], workdir)
    if index:
        run(commands()[index], workdir)
    expected = json.loads(reference.read_text())
    got = json.loads((workdir / out_dir(commands()[index]) / "losses.json").read_text())
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0]
