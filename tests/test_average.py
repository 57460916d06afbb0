"""The averaging kernel against closed forms and the invariances an average must have."""

import pytest
import torch

from meanwise.average import (
    RunningWeightedSum,
    average_state_dicts,
    member_variance,
    rescale_to_variance,
    weighted_average,
)


def test_scalar_weights_closed_form():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    # (1*[1,2] + 2*[3,6] + 1*[5,10]) / 4 = [12, 24] / 4
    assert torch.equal(weighted_average(x, w), torch.tensor([3.0, 6.0], dtype=torch.float64))


def test_uniform_weights_is_the_mean():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(weighted_average(x), x.mean(0))
    torch.testing.assert_close(weighted_average(list(x)), x.mean(0))


def test_permutation_invariance():
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64)
    perm = torch.randperm(6)
    torch.testing.assert_close(weighted_average(x, w), weighted_average(x[perm], w[perm]))
    we = torch.rand(6, 5, dtype=torch.float64)
    torch.testing.assert_close(weighted_average(x, we), weighted_average(x[perm], we[perm]))


def test_elementwise_equals_scalar_when_constant_per_member():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64) + 0.1
    elementwise = w.reshape(4, 1, 1).expand_as(x).clone()
    torch.testing.assert_close(weighted_average(x, w), weighted_average(x, elementwise))


def test_elementwise_closed_form():
    x = torch.tensor([[0.0, 10.0], [4.0, 20.0]])
    f = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    # element 0: (0*1 + 4*3)/4 = 3 ; element 1: (10*3 + 20*1)/4 = 12.5
    assert torch.equal(weighted_average(x, f), torch.tensor([3.0, 12.5]))


def test_explicit_denominator_divides_by_n():
    x = torch.tensor([[2.0], [4.0]])
    w = torch.tensor([1.0, 1.0])
    # FedAvg over all N = 4 clients where only 2 participated: sum / N
    assert torch.equal(weighted_average(x, w, denominator=4), torch.tensor([1.5]))


def test_zero_weight_sum_needs_denominator():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average(x, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="sum to zero at some elements"):
        weighted_average(x, torch.tensor([[1.0, 0, 1], [1, 0, 1]]))
    assert torch.equal(
        weighted_average(x, torch.tensor([1.0, -1.0]), denominator=2), torch.zeros(3)
    )


def test_empty_round_is_zero_update_with_denominator():
    empty = torch.empty(0, 3, 2)
    out = weighted_average(empty, torch.empty(0), denominator=10)
    assert out.shape == (3, 2) and torch.equal(out, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="no members"):
        weighted_average(empty, torch.empty(0))
    with pytest.raises(ValueError, match="stacked is empty"):
        weighted_average([])


def test_bad_shapes_and_values_name_the_argument():
    with pytest.raises(ValueError, match="weights has 3 entries but stacked has 2"):
        weighted_average(torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="elementwise"):
        weighted_average(torch.ones(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        weighted_average([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match="finite"):
        weighted_average(torch.ones(2, 2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="denominator"):
        weighted_average(torch.ones(2, 2), denominator=0)
    with pytest.raises(TypeError, match="stacked"):
        weighted_average("abc")


def test_mixed_dtypes_promote_and_half_accumulates_in_float32():
    a = torch.tensor([1.0, 2.0], dtype=torch.float32)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64)
    out = weighted_average([a, b])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0], dtype=torch.float64))
    # 4097 half-precision members: a float16 running sum would stall at 2048
    h = torch.ones(4097, 1, dtype=torch.float16)
    out = weighted_average(h, denominator=4097)
    assert out.dtype == torch.float16 and out.item() == 1.0
    ints = torch.tensor([[1, 2], [3, 4]])
    torch.testing.assert_close(weighted_average(ints), torch.tensor([2.0, 3.0]))


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


def test_state_dict_average_matches_per_key_average():
    states = [_state(s) for s in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    out = average_state_dicts(states, w)
    assert list(out) == ["w", "b", "bn.num_batches_tracked"]
    for key in ("w", "b"):
        expected = sum(wi * s[key] for wi, s in zip(w, states, strict=True)) / w.sum()
        torch.testing.assert_close(out[key], expected)
    # integer buffers are taken from the first state, not averaged
    assert out["bn.num_batches_tracked"].item() == 0


def test_state_dict_elementwise_is_fisher_weighted():
    states = [_state(s) for s in range(2)]
    fishers = [{"w": torch.rand(3, 2, dtype=torch.float64) + 0.1} for _ in range(2)]
    lam = torch.tensor([0.7, 0.3], dtype=torch.float64)
    out = average_state_dicts(states, lam, elementwise=fishers)
    num = lam[0] * fishers[0]["w"] * states[0]["w"] + lam[1] * fishers[1]["w"] * states[1]["w"]
    den = lam[0] * fishers[0]["w"] + lam[1] * fishers[1]["w"]
    torch.testing.assert_close(out["w"], num / den)
    # "b" has no Fisher: scalar weights only
    torch.testing.assert_close(out["b"], 0.7 * states[0]["b"] + 0.3 * states[1]["b"])


def test_state_dict_mismatches_name_the_key():
    a, b = _state(0), _state(1)
    b_missing = dict(b)
    del b_missing["b"]
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        average_state_dicts([a, b_missing])
    b_shape = dict(b, w=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="key 'w'.*shape"):
        average_state_dicts([a, b_shape])
    b_dtype = dict(b, w=b["w"].float())
    with pytest.raises(ValueError, match="key 'w'.*dtype"):
        average_state_dicts([a, b_dtype])
    out = average_state_dicts([a, b_dtype], strict_dtypes=False)
    assert out["w"].dtype == torch.float64
    with pytest.raises(TypeError, match="key 'b'"):
        average_state_dicts([a, dict(b, b=[1.0])])
    with pytest.raises(ValueError, match="states is empty"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="weights must have shape"):
        average_state_dicts([a, b], [1.0, 2.0, 3.0])


def test_member_variance_is_the_weighted_mean_of_unbiased_variances():
    torch.manual_seed(3)
    x = torch.randn(3, 50, dtype=torch.float64) * torch.tensor(
        [[1.0], [2.0], [3.0]], dtype=torch.float64
    )
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    expected = sum(wi * xi.var(unbiased=True) for wi, xi in zip(w, x, strict=True))
    torch.testing.assert_close(member_variance(x, w), expected)
    with pytest.raises(ValueError, match="at least 2 elements"):
        member_variance(torch.ones(3, 1))


def test_rescale_to_variance_closed_form_and_vanishing_variance():
    torch.manual_seed(4)
    m = 8
    members = torch.randn(m, 64, 32, dtype=torch.float64) * 0.1  # independent inits, sd 0.1
    merged = weighted_average(members)
    # the vanishing variance: a plain mean of m independent tensors keeps ~1/m of the variance
    assert merged.var().item() == pytest.approx(0.01 / m, rel=0.1)
    target = member_variance(members)
    fixed = rescale_to_variance(merged, target, eps=1e-4)
    expected_var = merged.var() * (target + 1e-4) / (merged.var() + 1e-4)
    torch.testing.assert_close(fixed.var(), expected_var)
    torch.testing.assert_close(fixed.mean(), merged.mean())
    # the pattern is kept: the correction is an affine map of the merged tensor
    centred = merged - merged.mean()
    torch.testing.assert_close(fixed - fixed.mean(), centred * (fixed.std() / merged.std()))
    one = torch.tensor([3.0])
    assert rescale_to_variance(one, 10.0) is one


def test_batched_variance_and_rescale_equal_one_tensor_at_a_time():
    from meanwise.average import member_variance, rescale_to_variance

    g = torch.Generator().manual_seed(0)
    members = torch.randn(5, 3, 4, 6, generator=g, dtype=torch.float64)  # 5 members, 3 tensors
    weights = torch.tensor([0.4, 0.15, 0.15, 0.15, 0.15], dtype=torch.float64)
    batched = member_variance(members, weights, batch_dims=1)
    looped = torch.stack([member_variance(members[:, k], weights) for k in range(3)])
    torch.testing.assert_close(batched, looped)
    # closed form: sum_i w_i Var(x_i) / sum_i w_i, Var unbiased over the 24 elements
    torch.testing.assert_close(batched[1], (weights * members[:, 1].reshape(5, -1).var(1)).sum())
    merged, target = members[0], torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    out = rescale_to_variance(merged, target, 1e-4, batch_dims=1)
    for k in range(3):
        torch.testing.assert_close(out[k], rescale_to_variance(merged[k], target[k], 1e-4))
    torch.testing.assert_close(
        rescale_to_variance(merged, 0.5, 1e-4, batch_dims=1)[2],
        rescale_to_variance(merged[2], 0.5, 1e-4),
    )
    with pytest.raises(ValueError, match="target_variance"):
        rescale_to_variance(merged, torch.ones(2), batch_dims=1)
    with pytest.raises(ValueError, match="batch_dims"):
        rescale_to_variance(merged, 1.0, batch_dims=4)
    with pytest.raises(TypeError, match="batch_dims"):
        member_variance(members, batch_dims=1.0)


# --- overflow: finite members whose products or sums overflow the dtype ------------------------


def test_finite_members_that_overflow_the_sum_average_exactly():
    x = torch.tensor([[3e38, 1.0], [3e38, 2.0]], dtype=torch.float32)
    torch.testing.assert_close(weighted_average(x), torch.tensor([3e38, 1.5]))
    torch.testing.assert_close(
        weighted_average(x, torch.tensor([1.0, 3.0])), torch.tensor([3e38, 1.75])
    )
    torch.testing.assert_close(weighted_average(x, denominator=4), torch.tensor([1.5e38, 0.75]))


def test_huge_elementwise_weights_do_not_make_nan():
    """Two Fishers of 3e38 (the merge that wrote [nan, nan, ...]) and a 3e38 against a 1."""
    params = torch.tensor([[10.0, 20.0, 10.0], [-10.0, -20.0, 20.0]])
    fishers = torch.tensor([[3e38, 3e38, 3e38], [3e38, 3e38, 1.0]])
    out = weighted_average(params, fishers)
    # float64 oracle of the same average
    expected = (fishers.double() * params.double()).sum(0) / fishers.double().sum(0)
    torch.testing.assert_close(out, expected.float())
    assert torch.isfinite(out).all()


def test_an_average_outside_the_dtype_is_refused():
    x = torch.tensor([[3e38], [3e38]])
    with pytest.raises(ValueError, match="overflows torch.float32"):
        weighted_average(x, denominator=0.5)


# RunningWeightedSum: the streaming form, one member at a time, against the stacked kernel


def _running(xs, ws, *, owned=False, dtype=None):
    total = RunningWeightedSum()
    for x, w in zip(xs, ws, strict=True):
        total.add(x.clone() if owned else x, w.clone() if owned and torch.is_tensor(w) else w,
                  owned=owned)  # fmt: skip
    return total.result(dtype)


def _left_fold(products):
    """((p_0 + p_1) + p_2) + ...: the member order the running sum promises, written out."""
    total = products[0].clone()
    for p in products[1:]:
        total = total + p
    return total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_running_sum_equals_the_stacked_average(dtype, owned, n):
    g = torch.Generator().manual_seed(3 + n)
    x = (torch.randn(n, 13, 7, generator=g, dtype=torch.float64) * 4).to(dtype)
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    lam = (torch.rand(n, generator=g, dtype=torch.float64) + 0.1).tolist()
    fisher = torch.rand(n, 13, 7, generator=g, dtype=torch.float64).to(dtype)
    before = x.clone()
    w = torch.tensor(lam, dtype=acc)
    expanded = w.reshape(n, 1, 1).expand(x.shape)
    scalar = _running(list(x), lam, owned=owned)
    scalar_acc = _running(list(x), lam, owned=owned, dtype=acc)
    elementwise = _running(list(x), list(fisher), owned=owned)
    assert scalar.dtype == dtype and scalar_acc.dtype == acc and elementwise.dtype == dtype
    # the member order written out: the products in `acc`, added left to right, then divided
    xa, fa = x.to(acc), fisher.to(acc)
    assert torch.equal(scalar_acc, _left_fold([xa[i] * w[i] for i in range(n)]) / w.sum())
    assert torch.equal(
        elementwise, (_left_fold([xa[i] * fa[i] for i in range(n)]) / _left_fold(fa)).to(dtype)
    )
    # weighted_average's stacked (w * x).sum(0): the same sum for up to 3 members; with more,
    # torch's reduction adds in another order, equal up to that rounding
    for got, stacked in [
        (scalar_acc, weighted_average(xa, expanded)),
        (elementwise, weighted_average(x, fisher)),
        (scalar, weighted_average(xa, expanded).to(dtype)),
    ]:
        if n <= 3:
            assert torch.equal(got, stacked)
        else:
            torch.testing.assert_close(got, stacked)
    # the [n] form contracts with tensordot: equal up to its rounding
    torch.testing.assert_close(scalar_acc, weighted_average(x, w))
    assert torch.equal(x, before)  # owned or not, the caller's tensors survive


def test_running_sum_half_precision_keeps_the_sum_in_float32():
    # 4000 members of 1 + 2**-10 in float16: a float16 sum would stall at 2048 (its spacing
    # there is 2); every partial sum is exact in float32
    member = torch.full((3,), 1 + 2**-10, dtype=torch.float16)
    total = RunningWeightedSum()
    for _ in range(4000):
        total.add(member, 1.0)
    assert total.dtype == torch.float32 and total.numerator.dtype == torch.float32
    assert float(total.numerator[0]) == 4000 * (1 + 2**-10)
    assert torch.equal(total.result(), member)


def test_running_sum_owned_buffers_are_kept_not_copied():
    """owned=True: the first member's buffers become the numerator and the denominator (model
    merging's memory bound: no full-size tensor besides the reads)."""
    x, f = torch.randn(6), torch.rand(6)
    total = RunningWeightedSum()
    total.add(x, f, owned=True)
    assert total.numerator is x and total.denominator is f
    y, h = torch.randn(6), torch.rand(6)
    total.add(y, h, owned=True)
    assert total.numerator is x and total.denominator is f


def test_running_sum_closed_form_and_denominator():
    total = RunningWeightedSum(torch.float64)
    total.add(torch.tensor([1.0, 2.0]), 1.0)
    total.add(torch.tensor([3.0, 6.0]), 3.0)
    assert float(total.denominator) == 4.0
    # (1*[1,2] + 3*[3,6]) / 4
    assert torch.equal(total.result(), torch.tensor([2.5, 5.0], dtype=torch.float64))


def test_running_sum_refuses_bad_input():
    total = RunningWeightedSum()
    with pytest.raises(ValueError, match="no members"):
        total.result()
    with pytest.raises(ValueError, match="weight must be finite"):
        total.add(torch.ones(2), float("nan"))
    with pytest.raises(ValueError, match="match x's shape"):
        total.add(torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match="weight must be a number or a tensor"):
        total.add(torch.ones(2), "1")
    total.add(torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="earlier members have"):
        total.add(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="one kind"):
        total.add(torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="floating dtype"):
        RunningWeightedSum(torch.int64)
    zero = RunningWeightedSum()
    zero.add(torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        zero.result()
