"""Bad arguments: exit status 2 and one line naming the argument, before any work starts.

Each try of the reliability audit is a row: the command line, the exit status and a fragment
of the message that names the culprit. `{file}` is an existing file, `{dir}` an existing
folder, `{ro}` a place where nobody (root included) can create anything.
"""

from __future__ import annotations

import argparse

import pytest

from meanwise import cli
from meanwise.cli_args import input_file, output_dir, output_file

UNWRITABLE = "/proc/meanwise-cannot-write-here"

TRIES = [
    # reproduce --out is a folder to create
    (["reproduce", "optimizers", "--out", "{file}"], "--out", "is a file; expected a folder"),
    (["reproduce", "optimizers", "--out", "{file}/below"], "--out", "is a file, not a folder"),
    (["reproduce", "optimizers", "--out", "{ro}/out"], "--out", "cannot write"),
    (["reproduce", "optimizers", "--seeds", "0"], "--seeds", "must be >= 1"),
    (["reproduce", "optimizers", "--seeds", "two"], "--seeds", "expected an integer"),
    # gossip run --out is a file to write
    (["gossip", "run", "--out", "{dir}"], "--out", "is a folder; expected a file"),
    (["gossip", "run", "--out", "{dir}/"], "--out", "is a folder; expected a file"),
    (["gossip", "run", "--out", "{file}/models.pt"], "--out", "is a file, not a folder"),
    (["gossip", "run", "--out", "{ro}/models.pt"], "--out", "cannot write"),
    (["gossip", "run", "--port", "-1"], "--port", "[1, 65535]"),
    (["gossip", "run", "--port", "70000"], "--port", "[1, 65535]"),
    (["gossip", "run", "--lr", "inf"], "--lr", "positive finite"),
    (["gossip", "run", "--lr", "nan"], "--lr", "positive finite"),
    (["gossip", "run", "--lr", "0"], "--lr", "positive finite"),
    (["gossip", "run", "--threads", "-5"], "--threads", "must be >= 1"),
    (["gossip", "run", "--timeout", "0"], "--timeout", "positive finite"),
    (["gossip", "run", "--nodes", "x"], "--nodes", "expected an integer"),
    (["trajectory", "evaluate", "--split", "zara1", "--threads", "-5"], "--threads", ">= 0"),
    (["trajectory", "evaluate", "--json", "{dir}"], "--json", "is a folder; expected a file"),
    (["trajectory", "evaluate", "--json", "{file}/r.json"], "--json", "is a file, not a folder"),
    (["trajectory", "evaluate", "--json", "{ro}/r.json"], "--json", "cannot write"),
    (["fisher", "--out", "{dir}"], "--out", "is a folder; expected a file"),
    (["fisher", "--out", "{file}/f.safetensors"], "--out", "is a file, not a folder"),
    (["fisher", "--out", "{ro}/f.safetensors"], "--out", "cannot write"),
    (["merge", "{dir}", "--out", "{tmp}/merged"], "CONFIG", "is a folder; expected a file"),
    (["merge", "{file}", "--out", "{file}"], "--out", "is a file; expected a folder"),
    (["merge", "{file}", "--out", "{ro}/merged"], "--out", "cannot write"),
]


@pytest.fixture
def places(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    return {
        "file": str(tmp_path / "a-file"),
        "dir": str(tmp_path / "a-dir"),
        "ro": UNWRITABLE,
        "tmp": str(tmp_path),
    }


@pytest.mark.parametrize("argv, argument, fragment", TRIES, ids=[" ".join(t[0]) for t in TRIES])
def test_bad_arguments_exit_2_with_one_line_naming_the_argument(
    argv, argument, fragment, places, capsys
):
    argv = [a.format(**places) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert argument in err and fragment in err, err
    assert "Traceback" not in err


def test_nothing_is_created_by_the_checks(tmp_path):
    """The writability probe leaves no file behind; a folder to create is not created yet."""
    target = tmp_path / "new" / "deeper"
    assert output_dir(str(target)) == str(target)
    assert output_file(str(tmp_path / "new" / "f.json")) == str(tmp_path / "new" / "f.json")
    assert list(tmp_path.iterdir()) == []
    assert output_dir(str(tmp_path)) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_input_file(tmp_path):
    (tmp_path / "config.yaml").write_text("method: linear\n")
    assert input_file(str(tmp_path / "config.yaml"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder; expected a file"):
        input_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        input_file(str(tmp_path / "missing.yaml"))


def test_usage_errors_raised_by_handlers_exit_2(monkeypatch, capsys):
    from meanwise.cli_args import UsageError

    def refuse():
        raise UsageError("--names: expected one of a, b; got 'c'")

    monkeypatch.setattr(cli, "_list", refuse)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "meanwise: --names: expected one of a, b; got 'c'"
