"""The `meanwise` command: list, usage errors, reproduce into a folder, merge, cache reuse."""

import dataclasses
import json
import subprocess
import sys

import pytest

from meanwise import cli
from meanwise.experiments import registry
from meanwise.experiments.optimizers import OptimizersConfig

TINY = OptimizersConfig(
    functions=("F1",),
    synthetic_methods=("Adam", "diffGrad"),
    synthetic_steps=20,
    methods=("SGD", "AdaHessian"),
    epochs=1,
    max_batches_per_epoch=1,
    batch_size=16,
    width=4,
)


@pytest.fixture
def tiny_optimizers(monkeypatch):
    """`optimizers --quick` with a seconds-long config, counting the seeds it really runs."""
    monkeypatch.setattr(OptimizersConfig, "quick", classmethod(lambda cls: TINY))
    experiment = registry.get("optimizers")
    calls = []

    def counting_run(config, seed):
        calls.append(seed)
        return experiment.run(config, seed)

    monkeypatch.setitem(
        registry._REGISTRY, "optimizers", dataclasses.replace(experiment, run=counting_run)
    )
    return calls


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "optimizers" in out and "AdaBelief" in out


def test_unknown_name_exits_2_and_lists_known_names(capsys, tmp_path):
    assert cli.main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "optimizers" in err
    assert not (tmp_path / "results.json").exists()


def test_help_and_bad_seeds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "--help"])
    assert exit_info.value.code == 0
    assert ".cache" in capsys.readouterr().out  # the resume behaviour is documented
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "optimizers", "--seeds", "0"])
    assert exit_info.value.code == 2


def test_reproduce_writes_report_merges_and_reuses_cache(tiny_optimizers, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    previous = {"experiments": {"fedau": {"title": "FedAU earlier", "verdict": "kept"}}}
    (out / "results.json").write_text(json.dumps(previous))
    args = ["reproduce", "optimizers", "--quick", "--seeds", "1", "--out", str(out)]
    args += ["--no-progress"]

    assert cli.main(args) == 0
    assert tiny_optimizers == [0]
    document = json.loads((out / "results.json").read_text())
    assert set(document["experiments"]) == {"optimizers", "fedau"}
    entry = document["experiments"]["optimizers"]
    assert entry["seeds"] == [0] and len(entry["results"]) == 1
    assert entry["config"]["epochs"] == 1 and entry["preset"] == "quick"
    assert "On F1, diffGrad ends closer" in entry["verdict"]
    assert {"tables", "metrics"} <= set(entry["summary"])
    assert document["meanwise_version"] and document["created"]
    page = (out / "index.html").read_text()
    assert "FedAU earlier" in page and "95.44" in page and "On F1, diffGrad ends closer" in page
    for figure in entry["figures"]:
        assert (out / figure["file"]).read_bytes().startswith(b"\x89PNG")
    assert list((out / ".cache" / "optimizers").glob("*-seed0.json"))

    assert cli.main(args) == 0  # the same command again: served from the cache
    assert tiny_optimizers == [0]
    again = json.loads((out / "results.json").read_text())["experiments"]["optimizers"]
    assert again["cached_seeds"] == [0]
    assert again["results"] == entry["results"]
    assert not [p for p in out.rglob("*.tmp")]

    assert cli.main(["report", "--out", str(out)]) == 0


def test_python_dash_m_meanwise():
    done = subprocess.run(
        [sys.executable, "-m", "meanwise", "list"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "optimizers" in done.stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["report", "--out", "{tmp}/typed"], "experiments['a'] is a int"),
        (["report", "--out", "{tmp}/nothing"], "no results.json"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(argv, fragment, tmp_path, capsys):
    (tmp_path / "typed").mkdir()
    (tmp_path / "typed" / "results.json").write_text('{"experiments": {"a": 3}}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_unexpected_errors_are_one_line_and_debug_shows_them(monkeypatch, capsys):
    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "_list", lambda: broken(None))
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert "KeyError" in err and "--debug" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(KeyError):
        cli.main(["--debug", "list"])


def test_pickled_checkpoints_get_no_advice_to_unpickle(monkeypatch, capsys):
    import pickle

    def unpickle(args):
        raise pickle.UnpicklingError("Weights only load failed ... weights_only=False ...")

    monkeypatch.setattr(cli, "_list", lambda: unpickle(None))
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert "not a weights-only file" in err and "weights_only=False" not in err
