"""Registered merge methods and the one validation path `iter_merged`: task arithmetic against
its closed form (Ilharco et al., 2023), in memory, streamed and from a YAML config; a method
added by registering one class; the pipeline's checks shared by every method."""

import pytest
import torch

from meanwise.merging import (
    FisherWeighted,
    MergeMethod,
    MergeOptions,
    PlainAverage,
    TaskArithmetic,
    fisher_merge,
    iter_merged,
    load_state_dict,
    merge_checkpoints,
    merge_methods,
    merge_states,
    register_method,
    save_safetensors,
)
from meanwise.merging.checkpoints import InMemoryCheckpoint
from meanwise.merging.config import parse_merge_config
from meanwise.merging.methods import base as methods_base
from meanwise.merging.methods import method_class


def _models(n=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g, dtype=dtype),
            "b": torch.randn(6, generator=g, dtype=dtype), "steps": torch.tensor(3)}  # fmt: skip
    models = [base]
    for i in range(1, n):
        models.append(
            {
                "w": base["w"] + 0.1 * torch.randn(6, 5, generator=g, dtype=dtype),
                "b": base["b"] + 0.1 * torch.randn(6, generator=g, dtype=dtype),
                "steps": torch.tensor(3 + i),
            }
        )
    return models


def _task_arithmetic_by_hand(models, scale, weights, key):
    """θ_0 + scale · Σ_{i≥1} w_i (θ_i − θ_0), in float64, written out."""
    base = models[0][key].double()
    vectors = sum(w * (m[key].double() - base) for w, m in zip(weights, models[1:], strict=True))
    return base + scale * vectors


@pytest.mark.parametrize("scale", [1.0, 0.3, -0.5])
def test_task_arithmetic_is_the_closed_form(scale):
    models = _models()
    merged = merge_states(models, TaskArithmetic(scale=scale))
    for key in ("w", "b"):
        expected = _task_arithmetic_by_hand(models, scale, [1.0, 1.0, 1.0], key)
        torch.testing.assert_close(merged[key], expected, rtol=1e-12, atol=1e-14)
    assert merged["steps"].item() == 3  # integer buffers come from the base
    # weights per task vector (the base's entry is not used)
    weighted = merge_states(models, TaskArithmetic(scale=scale), coefficients=[5.0, 0.5, 0.0, 2.0])
    for key in ("w", "b"):
        expected = _task_arithmetic_by_hand(models, scale, [0.5, 0.0, 2.0], key)
        torch.testing.assert_close(weighted[key], expected, rtol=1e-12, atol=1e-14)


def test_task_arithmetic_with_one_task_at_scale_one_is_that_model():
    models = _models(2)
    merged = merge_states(models, TaskArithmetic())
    torch.testing.assert_close(merged["w"], models[1]["w"], rtol=1e-14, atol=1e-15)
    assert merge_states(models, TaskArithmetic(scale=0.0))["w"].equal(models[0]["w"])


def test_task_arithmetic_streamed_equals_in_memory_and_from_yaml(tmp_path, monkeypatch):
    from meanwise import cli

    models = _models(3, dtype=torch.float32)
    for i, state in enumerate(models):
        save_safetensors(state, tmp_path / f"m{i}.safetensors")
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    merge_checkpoints(paths, None, tmp_path / "out", method=TaskArithmetic(scale=0.5))
    streamed = load_state_dict(tmp_path / "out")
    in_memory = merge_states(models, TaskArithmetic(scale=0.5))
    assert list(streamed) == list(in_memory)
    for key in in_memory:
        assert torch.equal(streamed[key], in_memory[key]), key
    (tmp_path / "merge.yaml").write_text(
        "method: task_arithmetic\n"
        "models: [m0.safetensors, m1.safetensors, m2.safetensors]\n"
        "parameters: {scale: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["merge", "merge.yaml", "--out", "from_yaml"]) == 0
    from_yaml = load_state_dict(tmp_path / "from_yaml")
    for key in in_memory:
        assert torch.equal(from_yaml[key], in_memory[key]), key


def test_a_new_method_is_one_registered_class(tmp_path, monkeypatch):
    """An elementwise-max "merge" written as one class: usable in memory, streamed and by name
    in a YAML config, with the pipeline's checks and integer handling for free."""
    monkeypatch.setattr(methods_base, "_REGISTRY", dict(methods_base._REGISTRY))

    @register_method
    class ElementwiseMax(MergeMethod):
        name = "elementwise_max"

        def combine(self, reads, wide):
            out = reads.member(0).clone()
            for i in range(1, reads.count):
                torch.maximum(out, reads.member(i), out=out)
            return out

    assert (
        "elementwise_max" in merge_methods() and method_class("elementwise_max") is ElementwiseMax
    )
    models = _models(3)
    merged = merge_states(models, ElementwiseMax())
    torch.testing.assert_close(merged["w"], torch.stack([m["w"] for m in models]).amax(0))
    assert merged["steps"].item() == 3
    config = parse_merge_config({"method": "elementwise_max", "models": ["a", "b"]}, tmp_path)
    assert isinstance(config.merge_method, ElementwiseMax)
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Other(MergeMethod):
            name = "elementwise_max"


def test_methods_registered_by_name_with_their_parameters(tmp_path):
    assert {"fisher", "average", "task_arithmetic"} <= set(merge_methods())
    config = parse_merge_config(
        {"method": "task_arithmetic", "models": ["a", "b"], "parameters": {"scale": 0.25}},
        tmp_path,
    )
    assert config.merge_method == TaskArithmetic(scale=0.25)
    assert [m.fisher for m in config.models] == [None, None]
    authors = parse_merge_config(
        {"models": [{"path": "a", "fisher": "f"}], "parameters": {"preset": "authors"}}, tmp_path
    )
    assert authors.merge_method == FisherWeighted(MergeOptions.from_preset("authors"))
    cases = [
        ({"method": "task_arithmetic", "models": ["a"], "parameters": {"floor": 0}},
         r"\['floor'\] apply to method: fisher only"),
        ({"method": "average", "models": ["a"], "parameters": {"scale": 2}},
         "apply to method: task_arithmetic only"),
        ({"method": "task_arithmetic", "models": ["a"], "parameters": {"scale": "big"}},
         "parameters: scale must be a finite number"),
        ({"models": [{"path": "a", "fisher": "f"}], "parameters": {"favor_target": "yes"}},
         "parameters: favor_target must be true or false"),
        ({"models": [{"path": "a", "fisher": "f"}], "parameters": {"florr": 1}},
         r"parameters: unknown keys \['florr'\]"),
    ]  # fmt: skip
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_merge_config(data, tmp_path)


def test_iter_merged_validates_before_the_first_tensor():
    """The checks run when iter_merged is called, before any tensor is merged or read."""
    models = [InMemoryCheckpoint(s) for s in _models(2)]
    wrong = dict(_models(2)[1], w=torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="'w': models\\[1\\] has shape \\[2, 2\\].*keep_target"):
        iter_merged([models[0], InMemoryCheckpoint(wrong)], None, PlainAverage())
    fishers = [InMemoryCheckpoint({"w": torch.ones(6, 5, dtype=torch.float64)})] * 2
    with pytest.raises(ValueError, match="'task_arithmetic' does not use Fishers"):
        iter_merged(models, fishers, TaskArithmetic())
    with pytest.raises(ValueError, match="'fisher' needs one Fisher per model"):
        iter_merged(models, None, FisherWeighted())
    with pytest.raises(ValueError, match="1 Fishers for 2 models"):
        iter_merged(models, fishers[:1], FisherWeighted())
    with pytest.raises(TypeError, match="method must be a MergeMethod instance"):
        iter_merged(models, None, "average")
    keys = [key for key, _ in iter_merged(models, fishers, FisherWeighted())]
    assert keys == ["w", "b", "steps"]  # the target's order, every key once


def test_one_way_to_pass_fisher_options(tmp_path):
    states = _models(2)
    fishers = [{"w": torch.rand(6, 5, dtype=torch.float64)} for _ in states]
    with pytest.raises(TypeError, match="either as options= or"):
        fisher_merge(states, fishers, options=MergeOptions(), floor=0.1)
    save_safetensors(states[0], tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="options= goes with method=None"):
        merge_checkpoints([tmp_path / "a.safetensors"], None, tmp_path / "out",
                          options=MergeOptions(floor=0.5), method=PlainAverage())  # fmt: skip
    with pytest.raises(ValueError, match="scale must be a finite number"):
        TaskArithmetic(scale=float("nan"))
    with pytest.raises(TypeError, match="options must be a MergeOptions"):
        FisherWeighted({"floor": 1.0})


def test_task_arithmetic_overflow_is_redone_in_float64_and_nan_refused():
    """The pipeline's float64 redo and refusal hold for every method, not only the averages."""
    base = {"w": torch.tensor([3e38, -3e38, 1.0])}
    tuned = {"w": torch.tensor([-3e38, 3e38, 2.0])}
    merged = merge_states([base, tuned], TaskArithmetic(scale=0.5))["w"]
    # θ_0 + 0.5 (θ_1 − θ_0) = the midpoint: finite, although θ_1 − θ_0 overflows float32
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 1.5]), rtol=0, atol=1e-6)
    bad = {"w": torch.tensor([1.0, float("nan"), 1.0])}
    with pytest.raises(ValueError, match="tensor 'w': the merge is not finite: models.1."):
        merge_states([base, bad], TaskArithmetic())
    # the base is read whatever its weight: its NaN is named too
    with pytest.raises(ValueError, match="tensor 'w': the merge is not finite: models.0."):
        merge_states([bad, tuned], TaskArithmetic(), coefficients=[0.0, 1.0])


def test_normalize_names_a_non_finite_fisher_instead_of_calling_it_zero():
    states = _models(2)
    fishers = [{"w": torch.rand(6, 5, dtype=torch.float64)} for _ in states]
    fishers[1]["w"][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"fishers\[1\] has non-finite entries"):
        fisher_merge(states, fishers, options=MergeOptions(normalize=True))
    fishers[1]["w"][2, 3] = 0.5
    fishers[0] = {"w": torch.zeros(6, 5, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"fishers\[0\] is zero over all merged tensors"):
        fisher_merge(states, fishers, options=MergeOptions(normalize=True))
