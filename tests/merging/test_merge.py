"""fisher_merge against the closed form written out elementwise, its edge cases (λ at the
corners, zero Fishers: never NaN), floors, normalization, presets, heads and the search."""

import math

import pytest
import torch

from meanwise.average import weighted_average
from meanwise.merging import (
    MergeOptions,
    average_merge,
    candidate_coefficients,
    fisher_merge,
    search_coefficients,
)


def _states(n=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    states = [
        {
            "w": torch.randn(4, 3, generator=g, dtype=dtype),
            "b": torch.randn(4, generator=g, dtype=dtype),
            "steps": torch.tensor(10 + i),
        }
        for i in range(n)
    ]
    fishers = [
        {
            "w": torch.rand(4, 3, generator=g, dtype=dtype) ** 3,
            "b": torch.rand(4, generator=g, dtype=dtype),
        }
        for _ in range(n)
    ]
    return states, fishers


def by_hand(states, fishers, lambdas, floor_fn, key):
    num = sum(lam * floor_fn(i, f[key]) * s[key] for i, (lam, s, f) in
              enumerate(zip(lambdas, states, fishers, strict=True)))  # fmt: skip
    den = sum(
        lam * floor_fn(i, f[key]) for i, (lam, f) in enumerate(zip(lambdas, fishers, strict=True))
    )
    return num / den


def test_closed_form_with_floor_max_and_add():
    states, fishers = _states()
    fishers[1]["w"][0, 0] = 0.0  # floored
    lambdas = [0.2, 0.5, 0.3]
    for mode, fn in (("max", lambda i, f: f.clamp_min(1e-3)), ("add", lambda i, f: f + 1e-3)):
        merged = fisher_merge(
            states, fishers, lambdas, options=MergeOptions(floor=1e-3, floor_mode=mode)
        )
        for key in ("w", "b"):
            torch.testing.assert_close(
                merged[key], by_hand(states, fishers, lambdas, fn, key), rtol=1e-12, atol=0
            )
        assert merged["steps"].item() == 10  # integer buffers come from the target


def test_favor_target_floors_only_model_zero():
    states, fishers = _states(2)
    fishers[0]["w"].zero_()
    fishers[1]["w"][:2].zero_()
    merged = fisher_merge(
        states, fishers, [0.5, 0.5], options=MergeOptions(floor=1e-2, favor_target=True)
    )
    fn = lambda i, f: f.clamp_min(1e-2) if i == 0 else f  # noqa: E731
    torch.testing.assert_close(merged["w"], by_hand(states, fishers, [0.5, 0.5], fn, "w"))
    # where the donor's Fisher is zero, the target wins outright
    torch.testing.assert_close(merged["w"][:2], states[0]["w"][:2])


def test_unit_fisher_is_plain_averaging_through_the_kernel():
    states, _ = _states()
    ones = [{k: torch.ones_like(v) for k, v in s.items() if k != "steps"} for s in states]
    lambdas = [1.0, 2.0, 3.0]
    merged = fisher_merge(states, ones, lambdas, options=MergeOptions(floor=0.0))
    plain = average_merge(states, lambdas)
    for key in ("w", "b"):
        expected = weighted_average([s[key] for s in states], torch.tensor(lambdas))
        torch.testing.assert_close(merged[key], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(plain[key], expected, rtol=1e-12, atol=0)


def test_normalize_divides_lambda_by_the_global_fisher_norm():
    states, fishers = _states(2)
    fishers[1] = {k: 1000.0 * v for k, v in fishers[1].items()}  # another scale
    lambdas = [0.4, 0.6]
    norms = [math.sqrt(sum(float(v.square().sum()) for v in f.values())) for f in fishers]
    unscaled = MergeOptions(floor=0.0, normalize=True)
    merged = fisher_merge(states, fishers, lambdas, options=unscaled)
    scaled = [lam / n for lam, n in zip(lambdas, norms, strict=True)]
    for key in ("w", "b"):
        expected = by_hand(states, fishers, scaled, lambda i, f: f, key)
        torch.testing.assert_close(merged[key], expected, rtol=1e-12, atol=0)
    # normalization makes the merge invariant to each Fisher's scale
    rescaled = [{k: 7.0 * v for k, v in fishers[0].items()}, fishers[1]]
    again = fisher_merge(states, rescaled, lambdas, options=unscaled)
    torch.testing.assert_close(again["w"], merged["w"], rtol=1e-12, atol=0)


def test_authors_preset_is_max_floor_on_target_and_normalized():
    states, fishers = _states(2)
    a = fisher_merge(states, fishers, [0.3, 0.7], options=MergeOptions.from_preset("authors"))
    written = MergeOptions(floor=1e-6, floor_mode="max", favor_target=True, normalize=True)
    b = fisher_merge(states, fishers, [0.3, 0.7], options=written)
    with pytest.warns(DeprecationWarning, match=r"MergeOptions.from_preset\('authors'"):
        legacy = fisher_merge(states, fishers, [0.3, 0.7], preset="authors")  # the old spelling
    for key in a:
        assert torch.equal(a[key], b[key])
        assert torch.equal(legacy[key], a[key])
    assert MergeOptions.from_preset("authors") == MergeOptions(1e-6, "max", True, True)


@pytest.mark.parametrize(
    "explicit",
    [{"normalize": False}, {"favor_target": False}, {"floor_mode": "add"}, {"floor": 0.5},
     {"missing": "error"}, {"normalize": False, "favor_target": False, "floor_mode": "add"}],
)  # fmt: skip
def test_explicit_options_override_the_preset(explicit):
    """An option passed with preset= is never ignored: the merge equals the one with the preset's
    other values written out and the explicit one in its place (and the closed form)."""
    states, fishers = _states(2)
    fishers[1]["w"][0, 0] = 0.0  # a zero donor Fisher, so favor_target / floors matter
    fishers = [{k: v * (10.0 if i else 1.0) for k, v in f.items()} for i, f in enumerate(fishers)]
    lambdas = [0.3, 0.7]
    written = {"floor": 1e-6, "floor_mode": "max", "favor_target": True, "normalize": True,
               "missing": "average", **explicit}  # fmt: skip
    got = fisher_merge(
        states, fishers, lambdas, options=MergeOptions.from_preset("authors", **explicit)
    )
    expected = fisher_merge(states, fishers, lambdas, options=MergeOptions(**written))
    default = fisher_merge(states, fishers, lambdas, options=MergeOptions.from_preset("authors"))
    with pytest.warns(DeprecationWarning, match="deprecated"):
        legacy = fisher_merge(states, fishers, lambdas, preset="authors", **explicit)
    assert all(torch.equal(legacy[k], got[k]) for k in got)  # the old flat keywords still work
    changes = any(not torch.equal(got[k], default[k]) for k in ("w", "b"))
    assert changes or explicit == {"missing": "error"}  # missing only matters without Fishers
    norms = [math.sqrt(sum(float(v.square().sum()) for v in f.values())) for f in fishers]
    for key in ("w", "b"):
        assert torch.equal(got[key], expected[key]), key

        def floor_fn(i, f, o=written, n=norms):
            if o["floor"] and (not o["favor_target"] or i == 0):
                f = f.clamp_min(o["floor"]) if o["floor_mode"] == "max" else f + o["floor"]
            return f / n[i] if o["normalize"] else f

        torch.testing.assert_close(got[key], by_hand(states, fishers, lambdas, floor_fn, key))
    assert MergeOptions.from_preset("authors", normalize=False).normalize is False
    with pytest.raises(TypeError, match="unknown merge options \\['florr'\\]"):
        MergeOptions.from_preset("authors", florr=1.0)


@pytest.mark.parametrize("lambdas,winner", [([0.0, 1.0], 1), ([1.0, 0.0], 0)])
@pytest.mark.parametrize("floor", [0.0, 1e-6])
@pytest.mark.parametrize("favor_target", [False, True])
def test_corner_coefficients_give_that_model_and_never_nan(lambdas, winner, floor, favor_target):
    states, fishers = _states(2)
    for f in fishers:  # zero Fishers somewhere in both models, an all-zero tensor in one
        f["w"][0].zero_()
    fishers[1]["b"].zero_()
    merged = fisher_merge(
        states, fishers, lambdas, options=MergeOptions(floor=floor, favor_target=favor_target)
    )
    for key in ("w", "b"):
        assert torch.isfinite(merged[key]).all()
        torch.testing.assert_close(merged[key], states[winner][key], rtol=1e-12, atol=1e-15)


def test_all_zero_fishers_fall_back_to_the_lambda_average():
    states, fishers = _states(3)
    zeros = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    lambdas = [0.5, 0.25, 0.25]
    merged = fisher_merge(states, zeros, lambdas, options=MergeOptions(floor=0.0))
    plain = average_merge(states, lambdas)
    for key in ("w", "b"):
        torch.testing.assert_close(merged[key], plain[key], rtol=1e-12, atol=0)


def test_zero_fishers_of_mixed_dtypes_fall_back_without_a_dtype_clash():
    # float32 models, a float64 and a float32 Fisher, all zero: the fallback is built in the
    # numerator's dtype (it used to take the last Fisher's and fail on the index put)
    states = [{"w": torch.randn(3, 2)} for _ in range(2)]
    fishers = [{"w": torch.zeros(3, 2, dtype=torch.float64)}, {"w": torch.zeros(3, 2)}]
    merged = fisher_merge(states, fishers, [0.25, 0.75], options=MergeOptions(floor=0.0))
    expected = 0.25 * states[0]["w"].double() + 0.75 * states[1]["w"].double()
    assert merged["w"].dtype == torch.float32
    torch.testing.assert_close(merged["w"], expected.float(), rtol=1e-6, atol=1e-7)


def test_missing_fisher_keys_average_or_raise():
    states, fishers = _states(2)
    partial = [{"w": f["w"]} for f in fishers]
    merged = fisher_merge(states, partial, [0.25, 0.75])
    expected = 0.25 * states[0]["b"] + 0.75 * states[1]["b"]
    torch.testing.assert_close(merged["b"], expected, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"\['b'\] have no Fisher"):
        fisher_merge(states, partial, options=MergeOptions(missing="error"))


def test_keep_target_merges_the_body_and_keeps_the_target_head():
    states, fishers = _states(2)
    states[0]["head.weight"] = torch.randn(5, 4, dtype=torch.float64)
    states[1]["head.weight"] = torch.randn(2, 4, dtype=torch.float64)  # another task's head
    with pytest.raises(ValueError, match="'head.weight'.*keep_target"):
        fisher_merge(states, fishers)
    merged = fisher_merge(states, fishers, keep_target=["head"])
    assert torch.equal(merged["head.weight"], states[0]["head.weight"])
    assert list(merged) == list(states[0])
    torch.testing.assert_close(
        merged["w"], by_hand(states, fishers, [0.5, 0.5], lambda i, f: f.clamp_min(1e-6), "w")
    )
    del states[1]["head.weight"]  # a model without the head at all is fine too
    assert torch.equal(fisher_merge(states, fishers, keep_target="head")["w"], merged["w"])


def test_half_precision_members_accumulate_in_float32():
    states, fishers = _states(2, dtype=torch.float32)
    half = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in s.items()}
            for s in states]  # fmt: skip
    merged = fisher_merge(half, fishers, [0.5, 0.5])
    reference = fisher_merge(
        [{k: v.float() if v.is_floating_point() else v for k, v in s.items()} for s in half],
        fishers,
        [0.5, 0.5],
    )
    assert merged["w"].dtype == torch.bfloat16
    assert torch.equal(merged["w"], reference["w"].to(torch.bfloat16))


def test_errors_name_the_tensor_and_argument():
    states, fishers = _states(2)
    bad = [dict(f) for f in fishers]
    bad[1]["w"] = -bad[1]["w"]
    with pytest.raises(ValueError, match="'w'.*fishers\\[1\\].*negative"):
        fisher_merge(states, bad)
    bad[1]["w"] = torch.full_like(fishers[1]["w"], float("nan"))
    with pytest.raises(ValueError, match="'w'.*non-finite"):
        fisher_merge(states, bad)
    bad[1]["w"] = torch.ones(3)
    with pytest.raises(ValueError, match="'w'.*fishers\\[1\\] has shape \\[3\\]"):
        fisher_merge(states, bad)
    with pytest.raises(ValueError, match="coefficients has 3 entries"):
        fisher_merge(states, fishers, [1, 1, 1])
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        fisher_merge(states, fishers, [-1.0, 2.0])
    with pytest.raises(ValueError, match="not all be zero"):
        fisher_merge(states, fishers, [0.0, 0.0])
    with pytest.raises(ValueError, match="floor_mode"):
        fisher_merge(states, fishers, options=MergeOptions(floor_mode="min"))
    with pytest.raises(ValueError, match="preset"):
        fisher_merge(states, fishers, options=MergeOptions.from_preset("fusionbench"))
    with pytest.raises(ValueError, match="fishers has 1 dicts"):
        fisher_merge(states, fishers[:1])
    with pytest.raises(ValueError, match="fishers\\[0\\] has keys \\['steps'\\] of integer"):
        fisher_merge(states, [{**f, "steps": torch.ones(())} for f in fishers])
    other = [dict(s) for s in states]
    other[1]["w"] = other[1]["w"].float()
    with pytest.raises(ValueError, match="'w'.*dtype"):
        fisher_merge(other, fishers)
    zero = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    with pytest.raises(ValueError, match="fishers\\[0\\] is zero"):
        fisher_merge(states, zero, options=MergeOptions(normalize=True))


def test_candidates_grid_and_dirichlet():
    grid = candidate_coefficients(2, grid_points=51)
    assert len(grid) == 51 and grid[0] == [0.0, 1.0] and grid[-1] == [1.0, 0.0]
    assert all(abs(sum(c) - 1) < 1e-12 for c in grid)
    draws = candidate_coefficients(3, num_samples=4000, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(draws, dtype=torch.float64)
    assert t.shape == (4000, 3) and (t >= 0).all()
    torch.testing.assert_close(t.sum(1), torch.ones(4000, dtype=torch.float64))
    # Dirichlet(1,1,1): each coordinate is Beta(1, 2), mean 1/3 and variance 1/18
    torch.testing.assert_close(t.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(t.var(0), torch.full((3,), 1 / 18, dtype=torch.float64), atol=0.005,
                               rtol=0)  # fmt: skip


def test_search_picks_the_best_scored_merge():
    states, fishers = _states(2)
    target = 0.3 * states[0]["w"] + 0.7 * states[1]["w"]

    def score(merged):
        return -float((merged["w"] - target).abs().max())

    result = search_coefficients(lambda lam: average_merge(states, lam), score, 2, grid_points=11)
    assert result.best == pytest.approx([0.3, 0.7])
    assert result.best_score == pytest.approx(0.0, abs=1e-12)
    assert len(result.scores) == 11
    with pytest.raises(ValueError, match="NaN"):
        search_coefficients(lambda lam: states[0], lambda m: float("nan"), 2, grid_points=3)
