"""Participation processes: empirical laws against their definitions, exact resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from meanwise.federated.participation import (
    Anarchic,
    Bernoulli,
    Cyclic,
    Markov,
    heterogeneous_probabilities,
)

PROBS = torch.tensor([0.02, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
Z = 5.0  # z-score bound; per-client false-alarm probability ~6e-7


def _masks(process, rounds: int) -> torch.Tensor:
    return torch.stack([process.sample() for _ in range(rounds)])  # [T, N]


def test_bernoulli_rates_match_probabilities():
    rounds = 6000
    masks = _masks(Bernoulli(PROBS, seed=1), rounds).double()
    rate = masks.mean(0)
    sigma = torch.sqrt(PROBS.double() * (1 - PROBS.double()) / rounds)
    assert (torch.abs(rate - PROBS.double()) <= Z * sigma + 1e-12).all(), (rate, PROBS)
    # independence across clients: the correlation of two clients' indicators is ~0
    c = np.corrcoef(masks[:, 3].numpy(), masks[:, 4].numpy())[0, 1]
    assert abs(c) < Z / math.sqrt(rounds)


def _markov_rates_by_hand(p: float, rate: float) -> tuple[float, float]:
    a, b = rate, rate * (1 / p - 1)
    if b > 1:
        a, b = rate / b, 1.0
    return a, b


def test_markov_stationary_probability_and_transition_rates():
    rounds, rate = 20000, 0.05
    masks = _masks(Markov(PROBS, rate=rate, seed=2), rounds).double()
    for n, p in enumerate(PROBS.tolist()):
        a, b = _markov_rates_by_hand(p, rate)
        assert a / (a + b) == pytest.approx(p)  # the rule keeps the stationary probability
        x = masks[:, n]
        # long-run fraction: the chain's variance of the mean is inflated by (1+λ)/(1-λ)
        lam = 1 - a - b
        var = p * (1 - p) / rounds * (1 + lam) / (1 - lam)
        assert abs(float(x.mean()) - p) <= Z * math.sqrt(var) + 1e-12, (n, float(x.mean()), p)
        prev, nxt = x[:-1], x[1:]
        n_on, n_off = float(prev.sum()), float((1 - prev).sum())
        if n_on > 0:
            off_rate = float(((prev == 1) & (nxt == 0)).sum()) / n_on
            assert abs(off_rate - b) <= Z * math.sqrt(b * (1 - b) / n_on) + 1e-12, (n, off_rate, b)
        if n_off > 0:
            on_rate = float(((prev == 0) & (nxt == 1)).sum()) / n_off
            assert abs(on_rate - a) <= Z * math.sqrt(a * (1 - a) / n_off) + 1e-12, (n, on_rate, a)


def test_markov_small_probability_uses_released_rule_not_clipping():
    # p = 0.02, rate 0.05: b = 2.45 > 1, so a = 0.05 / 2.45 and b = 1: every on-round is
    # followed by an off-round, and the stationary probability stays 0.02.
    process = Markov([0.02], rate=0.05, seed=0)
    assert float(process.off_rate[0]) == 1.0
    assert float(process.on_rate[0]) == pytest.approx(0.05 / 2.45)


def test_markov_starts_from_bernoulli():
    # many clients with one p: the first round's fraction is p (started stationary)
    n, p = 40000, 0.3
    first = Markov(torch.full((n,), p), seed=3).sample().double().mean()
    assert abs(float(first) - p) <= Z * math.sqrt(p * (1 - p) / n)


def test_cyclic_on_length_and_contiguity():
    period = 20
    process = Cyclic(PROBS, period=period, seed=4)
    masks = _masks(process, 3 * period)
    for n, p in enumerate(PROBS.tolist()):
        expected = max(1, round(period * p))
        for k in range(3):
            window = masks[k * period : (k + 1) * period, n]
            assert int(window.sum()) == expected
        # on-rounds form one contiguous cyclic block: exactly one off→on switch per period
        x = masks[:period, n].long()
        switches = int(((x - torch.roll(x, 1)) == 1).sum())
        assert switches == (1 if expected < period else 0)


def test_heterogeneous_probabilities_formula():
    hist = np.array([[10, 0, 0], [0, 5, 5], [1, 1, 1], [0, 0, 7]], dtype=float)
    p = heterogeneous_probabilities(hist, seed=5)
    d = np.random.default_rng(5).dirichlet([0.1] * 3)
    pi = hist / hist.sum(1, keepdims=True)
    expected = np.clip(0.1 * 3 * pi @ d, 0.02, 1.0)
    np.testing.assert_allclose(p.numpy(), expected)
    with pytest.raises(ValueError, match="label_histograms"):
        heterogeneous_probabilities(np.zeros((2, 3)))


@pytest.mark.parametrize("bad", [[0.5, 0.0], [1.2], [float("nan")], [-0.1]])
def test_probabilities_outside_unit_interval_are_rejected(bad):
    for cls in (Bernoulli, Markov, Cyclic):
        with pytest.raises(ValueError, match="probs"):
            cls(bad)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: Bernoulli(PROBS, seed=seed),
        lambda seed: Markov(PROBS, seed=seed),
        lambda seed: Cyclic(PROBS, period=10, seed=seed),
    ],
)
def test_resume_reproduces_the_stream(make):
    original = make(7)
    _masks(original, 13)
    state = _roundtrip(original.state_dict())
    expected = _masks(original, 25)
    restored = make(99)  # different seed: everything must come from the state
    restored.load_state_dict(state)
    assert torch.equal(_masks(restored, 25), expected)


def test_load_state_rejects_other_kinds_and_sizes():
    with pytest.raises(ValueError, match="Markov"):
        Bernoulli(PROBS).load_state_dict(Markov(PROBS).state_dict())
    with pytest.raises(ValueError, match="n_clients"):
        Bernoulli(PROBS).load_state_dict(Bernoulli([0.5]).state_dict())


def test_anarchic_hand_simulated_sequence():
    # two workers, one step each, no idling: worker 0 takes 1 s per step, worker 1 takes 3 s.
    # Times: w0 arrives at 1, 2, 3, ...; w1 at 3 (started from version 0). Ties go to the
    # lower worker id. One arrival closes a round.
    process = Anarchic(2, 1, 1, step_times=[1.0, 3.0], max_staleness=10)
    got = []
    for _ in range(6):
        a = process.next_round()
        got.append((int(a.workers[0]), a.close_time, int(a.staleness[0])))
    # R0 w0@1 (v0), R1 w0@2, R2 w0@3, R3 w1@3 started at v0, now v3 -> staleness 3;
    # w0 restarted at 3 from v3, but R3 (w1) closed first: its arrival at 4 is stale by 1.
    # R5: w0 restarted at 4 from v5 -> staleness 0.
    assert got == [(0, 1.0, 0), (0, 2.0, 0), (0, 3.0, 0), (1, 3.0, 3), (0, 4.0, 1), (0, 5.0, 0)]

    discarding = Anarchic(2, 1, 1, step_times=[1.0, 3.0], max_staleness=2, discard_stale=True)
    got = [discarding.next_round() for _ in range(6)]
    # w1's update at t=3 (staleness 3 > 2) is rejected; it restarts at 3 with version 3 and
    # would arrive at 6, after w0's arrival at 6 (tie, lower id first): R3@4, R4@5, R5@6 are w0.
    assert [int(a.workers[0]) for a in got] == [0, 0, 0, 0, 0, 0]
    assert got[3].rejected_stale == 1 and got[3].close_time == 4.0
    assert all(int(a.staleness.max()) <= 2 for a in got)


def test_anarchic_waits_for_a_worker_at_the_delay_bound():
    # The same two workers, bounded delay (the default): in R2 (version 2) w1, started from
    # version 0, has delay 2 = max_staleness, so R2 waits for it: w0@3 then w1@3 (tie, lower id
    # first), staleness [0, 2]. Both restart at 3 from version 3: w0 arrives at 4, 5, 6, w1 at
    # 6; in R5 (version 5) w1's delay is 2 again, so R5 takes w0@6 and w1@6.
    process = Anarchic(2, 1, 1, step_times=[1.0, 3.0], max_staleness=2)
    got = [process.next_round() for _ in range(6)]
    assert [a.workers.tolist() for a in got] == [[0], [0], [0, 1], [0], [0], [0, 1]]
    assert [a.staleness.tolist() for a in got] == [[0], [0], [0, 2], [0], [0], [0, 2]]
    assert [a.close_time for a in got] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [a.waited_for for a in got] == [0, 0, 1, 0, 0, 1]
    assert all(a.rejected_stale == 0 for a in got)


@pytest.mark.parametrize("max_staleness", [0, 3, 10])
def test_anarchic_bounded_delay_every_worker_arrives(max_staleness):
    # Strongly heterogeneous workers (log-speed and log-idle spread 1.0, as in the AFA
    # experiment): with the default bounded delay nobody is starved; each worker arrives at
    # least once in every max_staleness + 1 consecutive rounds and no delay exceeds the bound.
    # max_staleness = 0 is synchronous FL: every round waits for all workers.
    g = torch.Generator().manual_seed(3)
    n, rounds = 20, 600 if max_staleness else 100  # synchronous rounds cost 20 arrivals each
    step_times = 0.2 * torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    idle_means = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    process = Anarchic(
        n,
        4,
        10,
        local_steps="per_worker",
        step_times=step_times,
        idle_means=idle_means,
        max_staleness=max_staleness,
        seed=1,
    )
    last = torch.full((n,), -1, dtype=torch.long)
    counts = torch.zeros(n, dtype=torch.long)
    for r in range(rounds):
        a = process.next_round()
        assert a.workers.numel() >= 4 and len(set(a.workers.tolist())) == a.workers.numel()
        assert int(a.staleness.max()) <= max_staleness and a.rejected_stale == 0
        assert a.workers.numel() == 4 + a.waited_for
        counts[a.workers] += 1
        last[a.workers] = r
        assert int((r - last).max()) <= max_staleness  # nobody absent for more than tau+1 rounds
    assert int(counts.min()) >= rounds // (max_staleness + 1)
    if max_staleness == 0:
        assert bool((counts == rounds).all())


def test_anarchic_discarding_can_starve_a_slow_worker():
    # The opt-in discarding with one worker 50x slower than the others: its updates always
    # arrive staler than the bound, so it is never accepted (what waiting prevents).
    step_times = torch.tensor([1.0] * 7 + [50.0], dtype=torch.float64)
    kw = dict(step_times=step_times, max_staleness=5, seed=0)
    discarding = Anarchic(8, 2, 1, discard_stale=True, **kw)
    waiting = Anarchic(8, 2, 1, **kw)
    seen_discard = torch.cat([discarding.next_round().workers for _ in range(300)])
    seen_wait = torch.cat([waiting.next_round().workers for _ in range(300)])
    assert 7 not in seen_discard.tolist() and discarding.rejected_total > 0
    assert int((seen_wait == 7).sum()) >= 300 // 6


def test_anarchic_invariants_and_resume():
    kw = dict(
        local_steps="per_worker",
        step_times=torch.linspace(0.5, 3.0, 12),
        idle_means=torch.full((12,), 2.0),
        max_staleness=3,
    )
    process = Anarchic(12, 4, 5, seed=8, **kw)
    fixed = process.fixed_steps.clone()
    for _ in range(30):
        a = process.next_round()
        # distinct workers; more than m only when the round waited for a worker at the bound
        assert len(set(a.workers.tolist())) == a.workers.numel() == 4 + a.waited_for
        assert torch.equal(a.local_steps, fixed[a.workers])
        assert ((a.local_steps >= 1) & (a.local_steps <= 5)).all()
        assert (a.staleness <= 3).all() and (a.staleness >= 0).all()
    state = _roundtrip(process.state_dict())
    expected = [process.next_round() for _ in range(20)]
    restored = Anarchic(12, 4, 5, seed=123, **kw)
    restored.load_state_dict(state)
    for a, b in zip(expected, [restored.next_round() for _ in range(20)], strict=True):
        assert torch.equal(a.workers, b.workers) and torch.equal(a.staleness, b.staleness)
        assert a.close_time == b.close_time


def test_anarchic_uniform_steps_cover_the_range():
    process = Anarchic(6, 3, 4, seed=9)
    steps = torch.cat([process.next_round().local_steps for _ in range(400)])
    counts = torch.bincount(steps, minlength=5)[1:].double()
    expected = steps.numel() / 4
    assert (torch.abs(counts - expected) <= Z * math.sqrt(expected * 0.75)).all(), counts
