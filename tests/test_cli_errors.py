"""Bad input on the command line: `kdfast: error: <message>` alone on stderr and exit status 2, the
traceback only with --debug or KDFAST_DEBUG=1; the data a command chose, and why, printed at its start."""
from __future__ import annotations

import pytest
from trainer_fixtures import write_corpus

from kdfast.cli import main
from kdfast.train import config as config_lib
from kdfast.train import setup

BUDGET_MESSAGE = "budget: expected"


def _pretrain(tmp_path, *extra):
    return main(["pretrain", "--strategy", "no-kd", "--budget", "5parsecs", "--data", str(write_corpus(tmp_path)),
                 "--out", str(tmp_path / "run"), "--device", "cpu", *extra])


def test_bad_budget_prints_one_error_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDFAST_DEBUG", raising=False)
    assert _pretrain(tmp_path) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kdfast: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"kdfast: error: {BUDGET_MESSAGE}") and "5parsecs" in errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_lets_the_traceback_through(tmp_path, monkeypatch, how):
    monkeypatch.setenv("KDFAST_DEBUG", "1" if how == "env" else "0")
    with pytest.raises(ValueError, match=BUDGET_MESSAGE):
        _pretrain(tmp_path, *(["--debug"] if how == "flag" else []))


def test_shared_data_is_looked_up_beside_the_checkout_only(tmp_path, monkeypatch, capsys):
    """A shared/data beside the working directory's parent is ignored; the choice and its reason are printed."""
    text = tmp_path / "shared" / "data" / "text"
    text.mkdir(parents=True)
    for name in setup.SHARED_TEXT:
        (tmp_path / "shared" / "data" / name).write_text("x\n")
    (tmp_path / "shared" / "data" / "glue").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(setup, "CHECKOUT_SHARED", tmp_path / "elsewhere" / "shared" / "data")
    config = setup.resolve_auto(config_lib.load(None, "tiny", []))
    assert config["data"]["train"] == ["builtin:python-docs"] and config["glue"]["data_dir"] is None
    line = capsys.readouterr().err.strip()
    assert line.startswith("kdfast: corpus builtin:python-docs") and "no shared/data beside the checkout" in line
    monkeypatch.setattr(setup, "CHECKOUT_SHARED", tmp_path / "shared" / "data")
    config = setup.resolve_auto(config_lib.load(None, "tiny", []))
    assert config["data"]["train"] == [str(tmp_path / "shared" / "data" / setup.SHARED_TEXT[0])]
    assert config["glue"]["data_dir"] == str(tmp_path / "shared" / "data" / "glue")
    assert "auto: WikiText-2 from shared/data beside the checkout" in capsys.readouterr().err
