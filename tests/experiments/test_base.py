"""experiments.base: the typed-results contract (`from_json` / `to_json` / `JSONRecord`) and the
runner's public helpers (`current_stage_dir`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meanwise.experiments.base import (
    JSONRecord,
    current_stage_dir,
    from_json,
    runner_context,
    to_json,
)


@dataclass
class Point(JSONRecord):
    offset: float
    pair: tuple[int, int]
    label: str | None = None


@dataclass
class Record(JSONRecord):
    seed: int
    points: list[Point]
    by_name: dict[str, Point] = field(default_factory=dict)
    grid: list[list[Point]] = field(default_factory=list)
    best: Point | None = None
    raw: dict[str, float] = field(default_factory=dict)


DATA = {
    "seed": 3,
    "points": [{"offset": 0.5, "pair": [1, 2], "label": None}],
    "by_name": {"a": {"offset": 1.0, "pair": [3, 4], "label": "x"}},
    "grid": [[{"offset": 2.0, "pair": [5, 6], "label": None}], []],
    "best": None,
    "raw": {"ade": 0.25, "nan": math.nan},
}


def test_nested_records_are_built_from_their_field_types():
    record = Record.from_json(DATA)
    assert record.points == [Point(0.5, (1, 2))]  # a tuple field gets a tuple
    assert record.by_name["a"] == Point(1.0, (3, 4), "x")
    assert record.grid[0][0].pair == (5, 6) and record.grid[1] == []
    assert record.best is None and record.raw["ade"] == 0.25
    with_best = Record.from_json({**DATA, "best": {"offset": 9.0, "pair": [0, 0]}})
    assert with_best.best == Point(9.0, (0, 0))  # a missing field with a default takes it


def test_to_json_gives_the_json_text_back_unchanged():
    """Lists for tuples, dicts for records, key order and NaN kept: the same text as the input,
    so results.json does not change by passing through the typed form."""
    text = json.dumps(DATA)
    assert json.dumps(Record.from_json(json.loads(text)).to_json()) == text
    assert to_json(Record.from_json(DATA)) == Record.from_json(DATA).to_json()
    assert from_json(Record, DATA) == Record.from_json(DATA)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**DATA, "sede": 1}, r"^Record: unknown key\(s\) \['sede'\] for Record$"),
        ({"points": []}, r"^Record: missing key\(s\) \['seed'\] for Record$"),
        (
            {**DATA, "points": [{"offset": 0.5, "pair": [1, 2, 3]}]},
            r"^Record\.points\[0\]\.pair: expected 2 items; got 3$",
        ),
        ({**DATA, "by_name": {"a": [1.0]}}, r"^Record\.by_name\['a'\]: expected an object"),
        ([DATA], r"^Record: expected an object for Record"),
    ],
)
def test_bad_json_names_the_path_to_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        Record.from_json(data)


def test_current_stage_dir_is_the_runners_folder_or_none(tmp_path: Path):
    assert current_stage_dir() is None
    with runner_context(show_progress=False, stage_dir=tmp_path):
        assert current_stage_dir() == tmp_path
        with runner_context(show_progress=False, stage_dir=None):
            assert current_stage_dir() is None
        assert current_stage_dir() == tmp_path
    assert current_stage_dir() is None
