"""Argument types and the parser class shared by every `meanwise` command.

A bad argument is a usage error: exit status 2 and one line naming the argument and what was
expected, found while parsing — before any work starts, so a run that would fail only when it
writes its result (an `--out` below a file, an unwritable folder) fails at once instead.
Failed work (a corrupt input file, a diverged run) exits 1. Imports nothing of meanwise, so
every area's command module can use it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "OneLineParser",
    "UsageError",
    "input_file",
    "non_negative_int",
    "output_dir",
    "output_file",
    "port",
    "positive_float",
    "positive_int",
    "positive_seconds",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """An argument's value is wrong (exit status 2); raised by handlers after parsing."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {value!r}") from None


def positive_int(value: str) -> int:
    number = _integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {number}")
    return number


def non_negative_int(value: str) -> int:
    number = _integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {number}")
    return number


def port(value: str) -> int:
    number = _integer(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [1, 65535]; got {number}")
    return number


def _positive_finite(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 < number < math.inf:  # also refuses nan and inf, which float() accepts
        raise argparse.ArgumentTypeError(f"must be a positive finite {what}; got {value!r}")
    return number


def positive_float(value: str) -> float:
    return _positive_finite(value, "number")


def positive_seconds(value: str) -> float:
    return _positive_finite(value, "number of seconds")


def _writable_ancestor(path: Path) -> None:
    """Raise unless the nearest existing ancestor of `path` is a folder we can create in.

    Tried for real (a temporary file made and removed): permission bits do not tell whether
    root can write, nor whether the file system is read-only.
    """
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".meanwise-probe-", dir=ancestor)
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"{path}: cannot write in {ancestor} ({error.strerror or error})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def output_dir(value: str) -> str:
    """A folder to write into: an existing folder, or one that can be created."""
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a file; expected a folder")
    if path.is_dir():
        _writable_ancestor(path / "x")
    else:
        _writable_ancestor(path)
    return value


def output_file(value: str) -> str:
    """A file to write: not a folder, in a folder that exists or can be created."""
    path = Path(value).expanduser().absolute()
    if value.endswith(("/", os.sep)) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a folder; expected a file name")
    _writable_ancestor(path)
    return value


def input_file(value: str) -> str:
    """An existing, readable file (not a folder)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a folder; expected a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{value}: not readable")
    return value
