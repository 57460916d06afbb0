"""The engine's place in the layering (docs/DESIGN.md): it imports only the bottom layer, and
the simulators above it do not import each other. Read from the code's own import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import meanwise

SRC = Path(meanwise.__file__).parent


def _imported_areas(area: str, skip: tuple[str, ...] = ()) -> set[str]:
    found = set()
    for path in (SRC / area).rglob("*.py"):
        if path.name in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[1] for n in names if n.startswith("meanwise.")}
    return found - {area}


def test_engine_imports_only_the_bottom_layer():
    assert _imported_areas("engine") <= {"average", "atomic_io", "functional", "data"}


def test_federated_and_gossip_do_not_import_each_other():
    assert "gossip" not in _imported_areas("federated")
    assert "federated" not in _imported_areas("gossip")


def test_functional_imports_nothing_of_meanwise():
    # the pure rules sit at the bottom (local training, an engine over them, lives in engine/)
    assert _imported_areas("functional") == set()
    assert not (SRC / "functional" / "local_training.py").exists()
