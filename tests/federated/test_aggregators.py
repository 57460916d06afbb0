"""Aggregators against the papers' update equations written out by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch

from meanwise.federated.aggregators import (
    AFACD,
    AFACS,
    MIFA,
    FedAU,
    FedAvg,
    FedVARP,
    KnownParticipation,
    ParticipationIntervalWeights,
)
from meanwise.federated.participation import Bernoulli


def _mask(*bits):
    return torch.tensor(bits, dtype=torch.bool)


def test_interval_weights_hand_simulated_no_cutoff():
    w = ParticipationIntervalWeights(3)
    # r0 [1,0,0]: nobody has intervals -> 1 for participants. c0 records 0+1 = 1.
    assert w.update(_mask(1, 0, 0)).tolist() == [1.0, 0.0, 0.0]
    # r1 [0,1,0]: c1 has none -> 1. c1 records (1 absent)+1 = 2.
    assert w.update(_mask(0, 1, 0)).tolist() == [0.0, 1.0, 0.0]
    # r2 [1,0,1]: c0 mean{1} = 1, c2 none -> 1. c0 records 1+1 = 2 -> {1,2}; c2 records 3.
    assert w.update(_mask(1, 0, 1)).tolist() == [1.0, 0.0, 1.0]
    # r3 all: c0 mean{1,2} = 1.5, c1 {2}, c2 {3}. Then c0 {1,2,1}, c1 {2,2}, c2 {3,1}.
    assert w.update(_mask(1, 1, 1)).tolist() == [1.5, 2.0, 3.0]
    # r4 [1,0,1]: c0 4/3, c2 2
    assert w.update(_mask(1, 0, 1)).tolist() == pytest.approx([4 / 3, 0.0, 2.0])


def test_interval_weights_hand_simulated_cutoff():
    w = ParticipationIntervalWeights(2, cutoff=2)
    assert w.update(_mask(0, 1)).tolist() == [0.0, 1.0]  # c1 records 1; c0 absent 1
    assert w.update(_mask(0, 1)).tolist() == [0.0, 1.0]  # c1 {1,1}; c0 absent 2 -> records 2
    assert w.update(_mask(0, 0)).tolist() == [0.0, 0.0]  # both absent 1
    assert w.update(_mask(1, 0)).tolist() == [2.0, 0.0]  # c0 {2} -> then {2,2}; c1 records 2
    assert w.update(_mask(1, 1)).tolist() == pytest.approx([2.0, 4 / 3])  # c1 {1,1,2}


def test_interval_weights_estimate_inverse_probability_under_bernoulli():
    # with no cutoff the intervals are Geometric(p): their mean converges to 1/p
    probs = torch.tensor([0.1, 0.3, 0.6, 1.0])
    rounds = 4000
    process, w = Bernoulli(probs, seed=3), ParticipationIntervalWeights(4)
    for _ in range(rounds):
        w.update(process.sample())
    final = w.update(torch.ones(4, dtype=torch.bool))
    for n, p in enumerate(probs.tolist()):
        count = int(w.interval_count[n]) - 1
        sigma = math.sqrt((1 - p) / p**2 / count)
        assert abs(float(final[n]) - 1 / p) <= 5 * sigma + 1e-12


def test_interval_weights_rejects_wrong_mask():
    with pytest.raises(ValueError, match="mask"):
        ParticipationIntervalWeights(3).update(_mask(1, 0))


X = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
D = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]], dtype=torch.float64)
CLIENTS = torch.tensor([0, 2])


def test_fedavg_participants_and_all():
    got = FedAvg(4, server_lr=0.5).step(X, D, CLIENTS)
    torch.testing.assert_close(got, X + 0.5 * (D[0] + D[1]) / 2)
    got = FedAvg(4, over="all").step(X, D, CLIENTS)
    torch.testing.assert_close(got, X + (D[0] + D[1]) / 4)


def test_known_participation():
    probs = [0.5, 0.2, 0.25, 1.0]
    got = KnownParticipation(probs).step(X, D, CLIENTS)
    torch.testing.assert_close(got, X + (D[0] / 0.5 + D[1] / 0.25) / 4)


def test_fedau_uses_interval_weights():
    agg = FedAU(3)
    x1 = agg.step(X, D[:1], [0])  # round 0: weight 1 -> x + Δ/3
    torch.testing.assert_close(x1, X + D[0] / 3)
    agg.step(x1, D[:0], [])  # empty round: model unchanged, intervals advance
    x3 = agg.step(x1, D, [0, 1])  # c0 recorded {1} -> 1 ; c1 has none -> 1
    torch.testing.assert_close(x3, x1 + (D[0] + D[1]) / 3)
    x4 = agg.step(x3, D[:1], [0])  # c0 intervals {1, 2} -> 1.5
    torch.testing.assert_close(x4, x3 + 1.5 * D[0] / 3)


def test_mifa_memory():
    agg = MIFA(3)
    x1 = agg.step(X, D[:1], [0])
    torch.testing.assert_close(x1, X + D[0] / 3)
    x2 = agg.step(x1, D[1:], [2])  # memory {0: D0, 2: D1}
    torch.testing.assert_close(x2, x1 + (D[0] + D[1]) / 3)
    x3 = agg.step(x2, 2 * D[1:], [0])  # memory {0: 2 D1, 2: D1}
    torch.testing.assert_close(x3, x2 + 3 * D[1] / 3)


def test_fedvarp_control_variate():
    agg = FedVARP(3)
    x1 = agg.step(X, D, [0, 1])  # y = 0: mean(D)
    torch.testing.assert_close(x1, X + (D[0] + D[1]) / 2)
    new = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    x2 = agg.step(x1, new, [1])  # y = {0: D0, 1: D1}; 1/3 (D0 + D1) + (new − D1)
    torch.testing.assert_close(x2, x1 + (D[0] + D[1]) / 3 + (new[0] - D[1]))


def test_afa_cd_two_sided_rates():
    server_lr, local_lr = 2.0, 0.1
    steps = torch.tensor([2, 5])
    g = -D / (local_lr * steps[:, None].double())  # average local gradients
    got = AFACD(4, server_lr, local_lr, arrivals_per_round=2).step(X, D, CLIENTS, local_steps=steps)
    torch.testing.assert_close(got, X - server_lr * local_lr * g.mean(0))


def test_afa_cs_keeps_every_workers_latest():
    server_lr, local_lr = 1.5, 0.2
    agg = AFACS(3, server_lr, local_lr)
    g0 = -D[0] / (local_lr * 2)
    x1 = agg.step(X, D[:1], [0], local_steps=[2])
    torch.testing.assert_close(x1, X - server_lr * local_lr * g0 / 3)
    g2 = -D[1] / (local_lr * 4)
    x2 = agg.step(x1, D[1:], [2], local_steps=[4])  # stale g0 still counted
    torch.testing.assert_close(x2, x1 - server_lr * local_lr * (g0 + g2) / 3)
    with pytest.raises(ValueError, match="local_steps"):
        agg.step(x2, D[1:], [2])


def _all_aggregators():
    return [
        FedAvg(4),
        FedAvg(4, over="all"),
        KnownParticipation([0.5, 0.5, 0.5, 0.5]),
        MIFA(4),
        FedVARP(4),
        FedAU(4, cutoff=3),
        AFACD(4, 1.0, 0.1),
        AFACS(4, 1.0, 0.1),
    ]


@pytest.mark.parametrize("agg", _all_aggregators(), ids=lambda a: type(a).__name__)
def test_empty_round_is_a_no_op(agg):
    kw = {"local_steps": torch.zeros(0, dtype=torch.long)} if agg.needs_local_steps else {}
    got = agg.step(
        X, torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long), **kw
    )
    assert torch.equal(got, X)


@pytest.mark.parametrize("index", range(8))
def test_nonfinite_updates_are_dropped_and_counted(index):
    agg, reference = _all_aggregators()[index], _all_aggregators()[index]
    kw = {"local_steps": torch.tensor([1, 3])} if agg.needs_local_steps else {}
    bad = D.clone()
    bad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got = agg.step(X, bad, CLIENTS, **kw)
    assert torch.isfinite(got).all()
    assert agg.dropped_nonfinite == 1
    # identical to a round in which only client 0 took part (the dropped one counts as absent)
    kw0 = {"local_steps": torch.tensor([1])} if agg.needs_local_steps else {}
    torch.testing.assert_close(got, reference.step(X, D[:1], [0], **kw0))


@pytest.mark.parametrize("index", range(8))
def test_state_dict_resume_is_exact(index):
    def rounds(agg, x, start, stop):
        gen = torch.Generator().manual_seed(start)
        for _ in range(start, stop):
            mask = torch.rand(4, generator=gen) < 0.6
            clients = mask.nonzero().flatten()
            deltas = torch.randn(clients.numel(), 3, generator=gen, dtype=torch.float64)
            steps = torch.randint(1, 5, (clients.numel(),), generator=gen)
            x = agg.step(x, deltas, clients, local_steps=steps)
        return x

    agg = _all_aggregators()[index]
    x = rounds(agg, X, 0, 5)
    buffer = io.BytesIO()
    torch.save(agg.state_dict(), buffer)
    expected = rounds(agg, x, 5, 10)
    buffer.seek(0)
    restored = _all_aggregators()[index]
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(rounds(restored, x, 5, 10), expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="deltas"):
        FedAvg(4).step(X, D[:, :2], CLIENTS)
    with pytest.raises(ValueError, match="clients"):
        FedAvg(4).step(X, D, [0, 4])
    with pytest.raises(ValueError, match="distinct"):
        FedAvg(4).step(X, D, [1, 1])
    with pytest.raises(ValueError, match="probs"):
        KnownParticipation([0.5, 0.0])
    with pytest.raises(ValueError, match="over"):
        FedAvg(4, over="some")
    with pytest.raises(ValueError, match="FedAU"):
        FedAvg(4).load_state_dict(FedAU(4).state_dict())


def test_former_names_still_work_with_a_deprecation_warning():
    import meanwise.federated as federated
    from meanwise.federated import aggregators

    for old, new in (("AFA_CD", AFACD), ("AFA_CS", AFACS)):
        for module in (federated, aggregators):
            with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use {new.__name__}"):
                assert getattr(module, old) is new
    with pytest.warns(DeprecationWarning, match="AFA_CS is deprecated"):
        from meanwise.federated import AFA_CS  # noqa: F401, PLC0415 - the import form users have
    with pytest.raises(AttributeError, match="AFA_XX"):
        federated.AFA_XX  # noqa: B018


@pytest.mark.parametrize("cls", [AFACD, AFACS])
def test_a_state_saved_under_the_former_name_still_loads(cls):
    agg = cls(4, 1.0, 0.1)
    x = agg.step(X, D, CLIENTS, local_steps=[1, 3])
    state = agg.state_dict()
    assert state["kind"] == cls.__name__
    state["kind"] = {"AFACD": "AFA_CD", "AFACS": "AFA_CS"}[
        cls.__name__
    ]  # as written before the rename
    restored = cls(4, 1.0, 0.1)
    restored.load_state_dict(state)
    assert torch.equal(
        restored.step(x, D, CLIENTS, local_steps=[2, 2]),
        agg.step(x, D, CLIENTS, local_steps=[2, 2]),
    )
    other = {"AFACD": "AFA_CS", "AFACS": "AFA_CD"}[cls.__name__]
    with pytest.raises(ValueError, match=other):
        cls(4, 1.0, 0.1).load_state_dict({**state, "kind": other})
