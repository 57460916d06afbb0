"""Atomic writes: the old file survives any failure, the new one appears whole, nothing leaks."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from meanwise.atomic_io import (
    append_json_line,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    rewrite_json_lines,
)


def test_old_file_survives_a_failed_rename(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_old_file_survives_an_error_while_writing(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_writer(path) as handle:
            handle.write(b"half a checkpoint")
            raise RuntimeError("interrupted")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_round_trips_and_permissions(tmp_path):
    state = {"w": torch.randn(4, 5, dtype=torch.float64), "step": torch.tensor(7)}
    atomic_torch_save(state, tmp_path / "deep" / "s.pt")  # parent folders are created
    loaded = torch.load(tmp_path / "deep" / "s.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and int(loaded["step"]) == 7

    atomic_write_json(tmp_path / "r.json", {"a": [1, 2.5]})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": [1, 2.5]} and text.endswith("\n")
    # readable by others like a normally created file (mkstemp alone would give 0600)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    (tmp_path / "r.json").chmod(0o640)
    atomic_write_json(tmp_path / "r.json", {})
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640  # kept on overwrite


def test_json_lines_append_then_rewrite(tmp_path):
    log = tmp_path / "runs" / "metrics.jsonl"
    for r in range(4):
        append_json_line(log, {"round": r})
    rewrite_json_lines(log, [{"round": 0}, {"round": 1}])  # a resume from round 1
    append_json_line(log, {"round": 2})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"round": 0},
        {"round": 1},
        {"round": 2},
    ]


def test_json_lines_are_strict_json(tmp_path):
    """A diverged metric is written as null, not Python's bare NaN (not JSON)."""
    import json as stdlib_json

    from meanwise.atomic_io import append_json_line, rewrite_json_lines

    log = tmp_path / "m.jsonl"
    append_json_line(log, {"round": 1, "loss": float("nan"), "acc": [0.5, float("inf")]})
    line = log.read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    assert stdlib_json.loads(line, parse_constant=lambda c: 1 / 0) == {
        "round": 1,
        "loss": None,
        "acc": [0.5, None],
    }
    rewrite_json_lines(log, [{"loss": float("-inf")}])
    assert log.read_text() == '{"loss": null}\n'


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    from meanwise.atomic_io import atomic_write_text

    target = tmp_path / "ckpt.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    leftover = tmp_path / f".ckpt.pt.{dead.stdout.strip()}.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    live = tmp_path / f".ckpt.pt.{os.getppid()}.def456.tmp"  # a live process: kept
    live.write_bytes(b"being written")
    atomic_write_text(target, "done")
    assert target.read_text() == "done"
    assert not leftover.exists() and live.exists()
