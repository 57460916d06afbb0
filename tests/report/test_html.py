"""The report: escaping, published numbers and verdict on the page, atomic writes, merging."""

import json

import pytest

from meanwise.experiments import get
from meanwise.experiments.base import FigureSpec
from meanwise.report.figures import render_figures, render_png
from meanwise.report.html import render_html, write_html
from meanwise.report.results import load_results, merge_results, write_results


def _claims():
    return [
        {
            "claim": "AdaBelief above Adam (x < y)",
            "status": "supported",
            "effect": 1.5,
            "ci95": [0.5, 2.5],
            "paper_effect": 2.42,
            "n_seeds": 5,
            "test": "paired t interval",
            "detail": "clear",
        },
        {
            "claim": "AdaHessian above Adam",
            "status": "contradicted",
            "effect": -1.0,
            "ci95": [-2.0, -0.1],
            "paper_effect": 1.8,
            "n_seeds": 5,
            "test": "paired t interval",
            "detail": "reversed",
        },
        {
            "claim": "AdaBelief above AdamW",
            "status": "unresolved",
            "effect": 0.08,
            "ci95": [-1.2, 1.4],
            "paper_effect": 0.85,
            "n_seeds": 3,
            "test": "paired t interval",
            "detail": "needs >= 12 seeds",
        },
    ]


def _entry(name="optimizers"):
    experiment = get("optimizers")
    return {
        "title": f"{name} <title>",
        "paper": "A & B",
        "claim": experiment.claim + " <script>alert(1)</script>",
        "published": [
            {"columns": t.columns, "rows": t.rows, "caption": t.caption}
            for t in experiment.published
        ],
        "preset": "quick",
        "config": {"epochs": 1, "note": "<b>x</b>"},
        "config_hash": "abc",
        "seeds": [0, 1],
        "results": [],
        "summary": {"tables": [{"columns": ["a"], "rows": [["97.1 ± 0.2"]], "caption": ""}]},
        "claims": _claims(),
        "protocol": {
            "columns": ["aspect", "paper", "ours", "why"],
            "rows": [["data", "CIFAR-10", "digits", "offline"]],
            "caption": "protocol",
        },
        "figures": [
            {"file": "figures/x.png", "caption": "cap"},
            {"file": None, "caption": "broken", "error": "RuntimeError('no')"},
        ],
        "runtime_s": 12.5,
        "cached_seeds": [1],
    }


def test_page_shows_claim_published_numbers_and_verdict():
    page = render_html({"experiments": {"optimizers": _entry()}, "meanwise_version": "0"})
    for number in ("95.44", "94.64", "94.59", "93.02", "+1.80", "+1.45"):
        assert number in page
    for status in ("supported", "contradicted", "unresolved"):
        assert f'class="status status-{status}"' in page
    assert "unresolved at this scale" in page and "needs &gt;= 12 seeds" in page
    assert "+1.5 [+0.5, +2.5]" in page and "+2.42" in page
    # the summary table opens the page, before the first experiment's section
    assert page.index("Every claim at a glance") < page.index('<section id="optimizers"')
    assert "1 supported, 1 contradicted, 1 unresolved at this scale" in page
    assert "The paper's protocol and ours" in page and "CIFAR-10" in page
    assert "97.1 ± 0.2" in page
    assert '<img src="figures/x.png"' in page
    assert "Figure missing" in page
    assert "12.5 s" in page and "reused from the cache" in page
    assert "<script" not in page.lower()


def test_every_text_is_escaped():
    page = render_html({"experiments": {"optimizers": _entry()}})
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "optimizers &lt;title&gt;" in page
    assert "A &amp; B" in page
    assert "(x &lt; y)" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<b>x</b>" not in page


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    document = {"experiments": {"optimizers": _entry()}}
    write_html(tmp_path, document)
    write_results(tmp_path, document)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "results.json"]
    before = (tmp_path / "index.html").read_text()

    def fail(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        write_html(tmp_path, {"experiments": {}})
    assert (tmp_path / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "results.json"]


def test_merge_keeps_other_experiments_and_replaces_same_name(tmp_path):
    write_results(tmp_path, {"experiments": {"fedau": {"title": "FedAU", "verdict": "v1"}}})
    merged = merge_results(load_results(tmp_path), {"optimizers": _entry()})
    assert set(merged["experiments"]) == {"fedau", "optimizers"}
    assert merged["experiments"]["fedau"] == {"title": "FedAU", "verdict": "v1"}
    assert list(merged["experiments"])[0] == "optimizers"  # registered ones first
    changed = {**_entry(), "title": "changed"}
    again = merge_results(merged, {"optimizers": changed})
    assert again["experiments"]["optimizers"]["title"] == "changed"
    assert "meanwise_version" in again and "created" in again
    page = render_html(again)
    assert "FedAU" in page and "changed" in page


def test_damaged_results_file_is_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="move it away"):
        load_results(tmp_path)
    assert load_results(tmp_path / "missing") == {"experiments": {}}


def test_figures_are_png_and_failures_are_reported(tmp_path):
    def draw(fig):
        fig.subplots().plot([0, 1], [1, 0])

    png = render_png(FigureSpec("ok", "c", draw))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    def broken(fig):
        raise RuntimeError("no data")

    class Fake:
        name = "fake"

        @staticmethod
        def figures(config, results):
            return [FigureSpec("ok", "fine", draw), FigureSpec("bad", "broken", broken)]

    entries = render_figures(Fake, {}, [], tmp_path)
    assert entries[0] == {"file": "figures/fake-ok.png", "caption": "fine"}
    assert entries[1]["file"] is None and "no data" in entries[1]["error"]
    assert (tmp_path / "figures" / "fake-ok.png").read_bytes() == png
    json.dumps(entries)
