"""Fixtures shared by the Flower tests."""

import pytest


@pytest.fixture
def server_identity(monkeypatch):
    """What a ServerApp process has set when it builds messages (Flower's TaskIdentity)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
