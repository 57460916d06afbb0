"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a torn one.

Every result, report, log and checkpoint the project writes goes through here. The temporary
file lives in the destination folder so that `os.replace` is a rename within one file system,
it is fsynced before the rename, and it is removed if anything fails. Like `average`,
`functional` and `data`, this module imports nothing of meanwise, so every area may use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "append_json_line",
    "rewrite_json_lines",
    "remove_stale_temporaries",
    "process_alive",
]


@contextlib.contextmanager
def atomic_writer(path: Path | str) -> Iterator[IO[bytes]]:
    """A binary file handle whose contents replace `path` only when the block ends cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name tells a killed writer's leftover from a live one's
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        # mkstemp creates 0600; results are meant to be read (and served) like any other file
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    remove_stale_temporaries(path)


def remove_stale_temporaries(path: Path | str) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that were killed (their pid is gone);
    returns what was removed. Temporaries of live writers are left alone."""
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid_text = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            leftover.unlink()
            removed.append(leftover)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts as alive): whose
    temporaries may be removed as left by a killed writer."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (alive), or not a pid
        return pid > 0
    return True


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, data: Any, indent: int | None = 2) -> None:
    """`data` as JSON with a final newline."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """`torch.save` of tensors and plain containers (load it back with `weights_only=True`)."""
    with atomic_writer(path) as handle:
        torch.save(obj, handle)


def _json_line(record: Any) -> str:
    """Strict JSON: a NaN or infinite metric (a diverged test loss) becomes null, since the bare
    ``NaN`` Python writes is not JSON and breaks other readers of the log."""
    return json.dumps(_finite_or_null(record), allow_nan=False) + "\n"


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def append_json_line(path: Path | str, record: Any) -> None:
    """Append one JSON line to a metrics log (a torn last line is the worst a crash leaves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(_json_line(record))


def rewrite_json_lines(path: Path | str, records: list[Any]) -> None:
    """Replace a metrics log with `records` atomically (after a resume, lines logged past the
    checkpoint would otherwise appear twice)."""
    atomic_write_text(path, "".join(_json_line(r) for r in records))
