"""Windows of ticks run as dependency levels: the plan's structure, and the simulator that runs
it against the per-node loop (tick by tick, message by message) across cuts and a resume."""

import pytest
import torch
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.engine.local_training import LocalTraining
from meanwise.gossip import (
    GossipProtocol,
    GossipSimulator,
    MergeRule,
    Schedule,
    random_regular,
    star,
)
from meanwise.gossip import simulator as simulator_module
from meanwise.gossip.levels import plan_window
from meanwise.gossip.reference import PerNodeGossip


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n_clients: int) -> FederatedDataset:
    g = torch.Generator().manual_seed(1)
    parts = []
    for i in range(n_clients):
        size = 3 + i % 5  # some nodes smaller than the batch: padded and masked
        x = torch.randn(size, 4, generator=g, dtype=torch.float64)
        parts.append((x, torch.randint(0, 3, (size,), generator=g)))
    return FederatedDataset.from_clients(parts)


LOCAL = LocalTraining(
    rule="momentum", lr=0.1, batch_size=5, options={"momentum": 0.9, "weight_decay": 1e-3}
)
TEST = (torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,)))


def test_a_window_batches_events_of_many_ticks_and_keeps_each_nodes_order():
    top = random_regular(20, 4, seed=1)
    schedule = Schedule(GossipProtocol(), top, _data(20), batch_size=5, seed=0)
    plans = [schedule.next_tick() for _ in range(60)]
    window = plan_window(plans, 20, schedule.slot_base, schedule.buffer_sizes)
    trainings = sum(p.senders.numel() for t in plans for p in t.phases if p.kind == "train")
    merges = sum(w.mergers.numel() for t in plans for p in t.phases for w in p.waves)
    assert (window.trainings, window.merges) == (trainings, merges)
    # tick by tick: one training call per tick with trainers; as levels: far fewer calls
    ticks_with_trainers = sum(any(p.kind == "train" for p in t.phases) for t in plans)
    train_calls = sum(level.trains is not None for level in window.levels)
    assert train_calls < 0.7 * ticks_with_trainers
    # each node's events in tick order, one per level at most
    events: dict[int, list[tuple[int, str]]] = {}
    for number, level in enumerate(window.levels):
        nodes = [] if level.trains is None else level.trains.nodes.tolist()
        nodes += [n for group in level.merges for n in group.nodes.tolist()]
        assert len(nodes) == len(set(nodes))
        for n in nodes:
            events.setdefault(n, []).append(number)
    assert all(levels == sorted(levels) for levels in events.values())
    # a merge reads only snapshots made at lower levels or before the window
    made = {int(s): -1 for s in torch.cat([window.from_storage, window.from_start]).tolist()}
    for number, level in enumerate(window.levels):
        for group in level.merges:
            assert all(made[s] < number for s in group.sources.flatten().tolist())
        if level.trains is not None:
            made.update({s: number for s in level.trains.snapshots.tolist()})
        for group in level.merges:
            made.update({s: number for s in group.stored_as.tolist()})
    assert sorted(made) == list(range(window.n_snapshots))


def _gossip(
    tmp_path, name: str, protocol: GossipProtocol, rule: MergeRule, top, vectorize: str = "auto"
) -> GossipSimulator:
    return GossipSimulator(
        _net(),
        top,
        _data(len(top.neighbors) - len(protocol.idle_nodes)),
        protocol,
        LOCAL,
        merge=rule,
        test=TEST,
        eval_every=7,  # windows are cut at evaluations (7, 14, ...) and checkpoints (20, 40)
        checkpoint_every=20,
        checkpoint_path=tmp_path / f"{name}.pt",
        seed=3,
        vectorize=vectorize,
    )


@pytest.mark.parametrize("setting", ["async", "async-vmap", "star"])
def test_level_windows_equal_the_per_node_loop_across_cuts_and_a_resume(tmp_path, setting):
    # "auto" trains this Linear/Tanh stack with batched matmuls; "async-vmap" forces vmap
    vectorize = "vmap" if setting == "async-vmap" else "auto"
    if setting.startswith(
        "async"
    ):  # the paper's protocol: momentum, corrected merges, buffer = degree
        top = random_regular(12, 3, seed=5)
        protocol = GossipProtocol(train_interval=(2, 5))
        rule = MergeRule(beta=0.4, correct_variance=True)
    else:  # relays: the centre pushes merged models, and its initial one from the start
        top = star(6)
        protocol = GossipProtocol.federated(top, interval=3)
        rule = MergeRule(beta=0.0, correct_variance=True)
    sim = _gossip(tmp_path, "a", protocol, rule, top, vectorize)
    ref = PerNodeGossip(_net(), top, sim.train, protocol, LOCAL, rule, sim.params, seed=3)
    sim.run(30)
    ref.run(30)
    assert sim.merges > 20
    torch.testing.assert_close(sim.params, ref.parameters(), rtol=1e-10, atol=1e-12)
    # resume from the checkpoint at tick 20 (buffers part full, messages in flight)
    resumed = _gossip(tmp_path, "a", protocol, rule, top, vectorize)
    resumed.run(55, resume=True)
    sim.run(55)
    ref.run(55)
    torch.testing.assert_close(sim.params, ref.parameters(), rtol=1e-10, atol=1e-12)
    assert torch.equal(resumed.params, sim.params)
    assert resumed.metrics == [m for m in sim.metrics if m["tick"] != 30]  # 30: run(30)'s end
    # one tick per window: the same state up to rounding (torch's var rounds a row differently
    # in batches of different sizes, so the corrected merge is not bit-identical)
    stepwise = _gossip(tmp_path, "b", protocol, rule, top, vectorize)
    for _ in range(55):
        stepwise.step()
    close = {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(stepwise.params, sim.params, **close)
    torch.testing.assert_close(stepwise.storage, sim.storage, **close)
    torch.testing.assert_close(stepwise.storage_variance, sim.storage_variance, **close)
    for a, b in zip(stepwise.opt_state, sim.opt_state, strict=True):
        torch.testing.assert_close(a, b, **close)
    assert (stepwise.trainings, stepwise.merges) == (sim.trainings, sim.merges)


def test_windows_cut_by_the_snapshot_budget_resume_bit_exactly(tmp_path, monkeypatch):
    top = random_regular(12, 3, seed=5)
    protocol = GossipProtocol(train_interval=(2, 5))
    rule = MergeRule(correct_variance=True)
    whole = _gossip(tmp_path, "a", protocol, rule, top)
    whole.run(50)
    # room for ~3 snapshots: windows end after a tick or two, wherever the schedule says
    monkeypatch.setattr(simulator_module, "_WINDOW_BYTES", 3 * whole.layout.numel * 8)
    cut = _gossip(tmp_path, "b", protocol, rule, top)
    cut.run(50)
    torch.testing.assert_close(cut.params, whole.params, rtol=1e-12, atol=1e-14)
    interrupted = _gossip(tmp_path, "c", protocol, rule, top)
    interrupted.run(27)  # checkpoint at 20; ticks 21..27 are lost
    resumed = _gossip(tmp_path, "c", protocol, rule, top)
    resumed.run(50, resume=True)
    assert torch.equal(resumed.params, cut.params)
    assert torch.equal(resumed.storage, cut.storage)
    assert resumed.metrics == cut.metrics
