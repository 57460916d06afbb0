"""The registry, the presets, and the runner's cache keys and stage checkpoints."""

import dataclasses
import json

import pytest
import torch

from meanwise.experiments import Experiment, Table, get, names, register, registry
from meanwise.experiments.base import (
    cached_stage,
    format_mean_std,
    mean_std,
    runner_context,
    torch_threads,
)
from meanwise.experiments.optimizers import OptimizersConfig
from meanwise.experiments.runner import config_hash, run_experiment


def _toy_experiment(name="toy", run=None):
    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        seeds: int = 2
        scale: float = 1.0

        @classmethod
        def quick(cls):
            return cls(scale=0.5)

        @classmethod
        def full(cls):
            return cls()

    def default_run(config, seed):
        return {"value": config.scale * (seed + 1)}

    return Experiment(
        name=name,
        title="A toy",
        config_cls=ToyConfig,
        run=run or default_run,
        claim="c",
        published=[],
        summarize=lambda results: [Table(["v"], [[str(r["value"])] for r in results])],
        claims=lambda results: [],
    )


def test_optimizers_is_registered():
    assert "optimizers" in names()
    assert get("optimizers").name == "optimizers"


def test_builtin_order_does_not_depend_on_which_module_was_imported_first(monkeypatch):
    """The report lists experiments in the registry's order; importing one experiment module
    directly (it registers itself then) must not move it to the front."""
    builtins = registry.experiments()
    expected = [m.rsplit(".", 1)[1].replace("_", "-") for m in registry._BUILTIN_MODULES]
    assert [e.name for e in builtins] == expected
    toy = _toy_experiment("toy-first")
    # as if afa and a user's experiment had registered before the builtins were loaded
    shuffled = [builtins[4], toy, *reversed(builtins)]
    monkeypatch.setattr(registry, "_REGISTRY", {e.name: e for e in shuffled})
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    assert registry.names() == [*expected, "toy-first"]


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown experiment 'nope'.*optimizers"):
        get("nope")


@pytest.mark.parametrize("name", names())
def test_every_experiment_has_quick_and_full_presets(name):
    experiment = get(name)
    quick, full = experiment.config(quick=True), experiment.config(quick=False)
    assert isinstance(quick, experiment.config_cls) and isinstance(full, experiment.config_cls)
    assert quick.seeds >= 1 and full.seeds >= 1
    json.dumps(dataclasses.asdict(quick))  # configs are JSON-friendly


@pytest.mark.parametrize("name", names())
def test_every_experiment_states_claims_and_its_protocol(name):
    """The contract: claims as data (checked on real runs in each experiment's tests) and a
    paper-vs-ours protocol table for both presets, every row saying why it differs."""
    experiment = get(name)
    for quick in (True, False):
        config = json.loads(json.dumps(dataclasses.asdict(experiment.config(quick))))
        table = experiment.protocol(config)
        assert isinstance(table, Table) and len(table.rows) >= 5
        assert table.columns[:3] == ["aspect", "paper", "ours"]
        assert all(all(str(cell).strip() for cell in row) for row in table.rows)


def test_optimizers_presets():
    quick, full = OptimizersConfig.quick(), OptimizersConfig.full()
    # one task for both presets; the full one only runs more paired runs
    assert quick.seeds * quick.replicates < full.seeds * full.replicates
    assert quick.epochs == full.epochs
    assert set(full.methods) == {"SGD", "Adam", "AdamW", "AdaBelief", "diffGrad", "AdaHessian"}
    with pytest.raises(ValueError, match="unknown methods"):
        OptimizersConfig(methods=("Lion",))


def test_register_refuses_a_second_experiment_with_the_same_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    toy = register(_toy_experiment())
    assert register(toy) is toy  # the same object again is fine (re-import)
    with pytest.raises(ValueError, match="already registered"):
        register(_toy_experiment())
    other = register(_toy_experiment(), replace=True)
    assert get("toy") is other
    with pytest.raises(TypeError):
        register("toy")


def test_config_hash_ignores_seed_count_only():
    a = OptimizersConfig(epochs=3)
    more_seeds = dataclasses.replace(a, seeds=7)
    assert config_hash("optimizers", a) == config_hash("optimizers", more_seeds)
    assert config_hash("optimizers", a) != config_hash("optimizers", OptimizersConfig(epochs=4))
    assert config_hash("optimizers", a) != config_hash("other", a)


def test_runner_caches_each_seed_and_reuses_it(tmp_path):
    calls = []

    def run(config, seed):
        calls.append(seed)
        return {"value": config.scale * (seed + 1)}

    toy = _toy_experiment(run=run)
    config = toy.config(quick=True)
    first = run_experiment(toy, config, [0, 1], cache_dir=tmp_path)
    assert calls == [0, 1] and [s.cached for s in first.seeds] == [False, False]
    second = run_experiment(toy, config, [0, 1, 2], cache_dir=tmp_path)
    assert calls == [0, 1, 2]  # only the new seed ran
    assert [s.cached for s in second.seeds] == [True, True, False]
    assert second.results[:2] == first.results
    fresh = run_experiment(toy, config, [0], cache_dir=tmp_path, fresh=True)
    assert calls[-1] == 0 and not fresh.seeds[0].cached
    # a changed config is a different cache key
    run_experiment(toy, toy.config(quick=False), [0], cache_dir=tmp_path)
    assert calls[-1] == 0 and len(calls) == 5
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_runner_rejects_results_that_are_not_json(tmp_path):
    toy = _toy_experiment(run=lambda config, seed: {"tensor": torch.zeros(1)})
    with pytest.raises(TypeError, match="not JSON"):
        run_experiment(toy, toy.config(True), [0], cache_dir=tmp_path)


def test_cached_stage_resumes_without_recomputing(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": 0.1 + 0.2}

    assert cached_stage("a", compute) == {"x": 0.1 + 0.2}  # no runner: a plain call
    with runner_context(show_progress=False, stage_dir=tmp_path):
        assert cached_stage("a", compute) == {"x": 0.1 + 0.2}
        assert cached_stage("a", compute) == {"x": 0.1 + 0.2}  # exact float round trip
    assert len(calls) == 2
    assert (tmp_path / "a.json").exists()


def test_mean_std_and_formatting():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std
    assert format_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert format_mean_std([5.0]) == "5.00"


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"config": {}, "seed": 0}', "{not json", '{"experiment": "toy"}']
)
def test_a_damaged_seed_cache_is_set_aside_and_recomputed(tmp_path, content, capsys):
    experiment = _toy_experiment()
    config = experiment.config(quick=False)
    first = run_experiment(experiment, config, [0], cache_dir=tmp_path)
    (path,) = (tmp_path / "toy").glob("*-seed0.json")
    path.write_text(content)
    again = run_experiment(experiment, config, [0], cache_dir=tmp_path)
    assert again.results == first.results and not again.seeds[0].cached
    if content in ("[1, 2]", "{not json"):  # a stale record (other config) is recomputed
        assert path.with_name(path.name + ".corrupt").exists()
        assert "damaged" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{}", "[]", '{"runs": [1', ""])
def test_a_damaged_stage_file_is_set_aside_and_recomputed(tmp_path, content):
    (tmp_path / "a.json").write_text(content)
    with runner_context(show_progress=False, stage_dir=tmp_path):
        assert cached_stage("a", lambda: {"runs": [1]}) == {"runs": [1]}
    assert (tmp_path / "a.json.corrupt").exists()
