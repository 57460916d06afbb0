"""Shared fixtures: the reference data folder, or a skip that says why it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meanwise.trajectory.data import resolve_data_dir


def _data_root() -> Path | None:
    root = resolve_data_dir()
    return root if root is not None and (root / "eth_ucy").is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip(
            "ETH/UCY data not found (no eth_ucy/ in $MEANWISE_DATA_DIR, in ../shared/data beside "
            "the repository, or in ~/.cache/meanwise/data): run `meanwise trajectory fetch-data "
            "--checkpoints` or set MEANWISE_DATA_DIR to a folder holding eth_ucy/"
        )
    return root


@pytest.fixture(scope="session")
def checkpoints_root(data_root: Path) -> Path:
    folder = data_root / "social_implicit_checkpoints"
    if not folder.is_dir():
        pytest.skip(
            f"released Social-Implicit weights not found under {folder}: run "
            f"`meanwise trajectory fetch-data --checkpoints --dest {data_root}`"
        )
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """The model and metric kernels here are many small ops; on a shared CPU extra intra-op
    threads only oversubscribe it (a 3x slowdown measured), so these tests run single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
