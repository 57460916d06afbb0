"""What a real deployment does to the Flower strategies, on a fake Grid that behaves like the
SuperLink: nodes restart with new ids (and rejoin their slots by partition-id), the SuperLink
answers for lost nodes with src_node_id=1, nodes time out, fewer nodes than needed connect,
finite updates overflow. Checked against FedAU's / AFA's equations written out."""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("flwr", reason="install the flower extra: pip install '.[flower]'")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.server.superlink.linkstate.utils import (  # noqa: E402
    create_message_error_unavailable_res_message,
)

from meanwise.federated import AFACS  # noqa: E402
from meanwise.federated.flower import (  # noqa: E402
    FedAUStrategy,
    NodeSlots,
    run_anarchic,
    wait_for_nodes,
)
from tests.federated._flower_grid import TickingGrid, to_record, to_vector  # noqa: E402


@pytest.fixture
def flwr_log(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


class FakeSuperLink(TickingGrid):
    """``nodes[node_id] = (partition, behaviour)`` with behaviour(msg) -> reply | None, or the
    strings "lost" (the SuperLink answers for it: node unavailable, src_node_id=1) and
    "silent" (no reply at all: a time-out). ``online`` is what get_node_ids lists. Replies are
    visible ``delay(node)`` pulls after the push."""

    def __init__(self, nodes, delay: Callable[[int], int] = lambda node: 1):
        super().__init__()
        self.nodes = dict(nodes)
        self.online = set(self.nodes)
        self.delay = delay
        self.received: dict[int, int] = {}  # node -> messages delivered to it
        self.node_id_calls = 0

    def get_node_ids(self):
        self.node_id_calls += 1
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            behaviour = self.nodes[node][1] if node in self.nodes else "lost"
            if behaviour == "lost":
                reply = create_message_error_unavailable_res_message(msg.metadata, "node")
            elif behaviour == "silent":
                continue
            else:
                self.received[node] = self.received.get(node, 0) + 1
                reply = behaviour(msg)
                if reply is None:
                    continue
            self.pending[msg.metadata.message_id] = (self.tick + self.delay(node), reply)
        return ids


def _update(partition: int, x: torch.Tensor) -> torch.Tensor:
    """A partition's trained vector: a fixed function of its data (partition) and the model."""
    return x * (1 - 0.1 * (partition + 1)) + 0.01 * (partition + 1) + 0.001 * torch.arange(6.0)


def trains(partition: int, **extra):
    """A node holding ``partition`` that trains and reports its partition-id."""

    def behaviour(msg: Message) -> Message:
        x = to_vector(msg.content.array_records["arrays"])
        metrics = {"num-examples": 10, "partition-id": partition, "local-steps": 1, **extra}
        content = {"arrays": to_record(_update(partition, x)), "metrics": MetricRecord(metrics)}
        return Message(RecordDict(content), reply_to=msg)

    return behaviour


def _fedau_by_hand(x, masks, server_lr=1.0):
    """FedAU written out: ω_n = mean of n's recorded intervals (1 before any),
    x ← x + η/N Σ_S ω_n Δ_n; a participant records (rounds absent since its last record) + 1.
    ``masks[r]`` lists the partitions whose update counted in round r."""
    n = len(masks[0])
    intervals: list[list[int]] = [[] for _ in range(n)]
    absent = [0] * n
    for mask in masks:
        direction = torch.zeros_like(x)
        for p in range(n):
            if mask[p]:
                omega = sum(intervals[p]) / len(intervals[p]) if intervals[p] else 1.0
                direction += omega * (_update(p, x) - x)
        for p in range(n):
            if mask[p]:
                intervals[p].append(absent[p] + 1)
                absent[p] = 0
            else:
                absent[p] += 1
        x = x + server_lr * direction / n
    return x


def _run_rounds(strategy, grid, x0, script: list[Callable[[FakeSuperLink], None]]):
    """Run one Flower round per entry; ``script[r](grid)`` changes the federation first."""
    arrays = to_record(x0)
    for r, change in enumerate(script, start=1):
        change(grid)
        replies = grid.send_and_receive(strategy.configure_train(r, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(r, replies)
    return arrays


# --- FedAU: rejoin by partition-id, right reasons ---------------------------------------------


def test_fedau_restarted_node_rejoins_its_slot_and_reasons_name_it(server_identity, flwr_log):
    grid = FakeSuperLink({101: (0, trains(0)), 102: (1, trains(1)), 103: (2, trains(2))})

    def nothing(g):
        pass

    def kill_102(g):  # killed: still listed until its heartbeat expires, the SuperLink answers
        g.nodes[102] = (1, "lost")

    def restart_102_as_202_and_add_a_fourth(g):
        g.online.discard(102)
        g.nodes[202] = (1, trains(1))  # the same --node-config, a new random node id
        g.nodes[301] = (3, trains(3))  # a partition the federation has no slot for
        g.online |= {202, 301}

    def slow_103(g):
        g.nodes[103] = (2, "silent")

    def fast_103(g):
        g.nodes[103] = (2, trains(2))

    strategy = FedAUStrategy(3, evaluate=False, server_lr=0.9)
    script = [nothing, kill_102, restart_102_as_202_and_add_a_fourth, slow_103, fast_103]
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    final = _run_rounds(strategy, grid, x0, script)

    masks = [[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    expected = _fedau_by_hand(x0, masks, server_lr=0.9)
    torch.testing.assert_close(to_vector(final), expected, rtol=1e-12, atol=1e-12)
    # the restarted node holds partition 1's slot; its old id is sent nothing more
    slot_of_p1 = strategy.slots.slot_key.index(1)
    assert strategy.node_ids[slot_of_p1] == 202
    assert [h["participants"] for h in strategy.history] == [sum(m) for m in masks]
    assert 202 in strategy.history[2]["nodes"] and 202 in strategy.history[4]["nodes"]
    # round 2: the SuperLink's error reply (src_node_id=1) is the lost node's, not node 1's
    (lost,) = strategy.history[1]["reasons"]
    assert lost.startswith(f"node 102 (slot {slot_of_p1}, partition-id=1) failed")
    assert "Node Unavailable" in lost
    assert not any("node 1 " in r for h in strategy.history for r in h["reasons"])
    # round 3: the fourth partition is ignored (no free slot), logged, and messaged only once
    assert any("node 301" in r and "all n_nodes=3 slots are taken" in r
               for r in strategy.history[2]["reasons"])  # fmt: skip
    assert grid.received[301] == 1
    assert "node 202 rejoined as slot" in flwr_log.text and "replacing node 102" in flwr_log.text
    # round 4: a time-out is logged and recorded, naming the node
    slot_of_p2 = strategy.slots.slot_key.index(2)
    assert strategy.history[3]["reasons"] == [
        f"node 103 (slot {slot_of_p2}, partition-id=2) timed out: no reply within the round"
    ]
    assert "node 103 (slot" in flwr_log.text and "timed out" in flwr_log.text


def test_fedau_metrics_average_only_the_replies_that_are_kept(server_identity):
    def nan_update(msg):
        reply = trains(1, **{"train-loss": 100.0})(msg)
        reply.content.array_records["arrays"]["b"] = ArrayRecord(
            {"b": torch.full((2,), float("nan"), dtype=torch.float64)}
        )["b"]
        return reply

    grid = FakeSuperLink(
        {1: (0, trains(0, **{"train-loss": 1.0})), 2: (1, nan_update),
         3: (2, trains(2, **{"train-loss": 3.0}))}
    )  # fmt: skip
    strategy = FedAUStrategy(3, evaluate=False)
    arrays = to_record(torch.zeros(6, dtype=torch.float64))
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["train-loss"] == pytest.approx(2.0)  # (1 + 3) / 2: the NaN reply is out
    assert metrics["participants"] == 2 and metrics["dropped-nonfinite"] == 1
    assert any("node 2" in r and "non-finite" in r for r in strategy.history[0]["reasons"])


def test_node_slots_rules():
    slots = NodeSlots(2, "partition-id")
    assert slots.bind(7, 0) == (0, "node 7 bound to slot 0 (partition-id=0)")
    assert slots.bind(7, 0) == (0, None)
    assert slots.bind(8, None)[0] == 1  # no key reported: bound by its node id
    slot, note = slots.bind(9, 0)  # node 7 restarted as node 9
    assert slot == 0 and "replacing node 7" in note
    assert slots.targets([7, 8, 9]) == [8, 9]  # the replaced id is sent nothing more
    assert slots.bind(10, 5) == (None, "node 10 ignored: partition-id=5 has no slot and all "
                                       "n_nodes=2 slots are taken")  # fmt: skip
    assert slots.targets([8, 9, 10]) == [8, 9]
    twin = NodeSlots(2, "partition-id")
    twin.load_state_dict(slots.state_dict())
    assert twin.node_of_slot == [9, 8] and twin.bind(11, 0)[0] == 0
    given = NodeSlots(2, "partition-id", node_ids=[5, 6])
    assert given.bind(6, 3) == (1, None) and given.slot_key == [None, 3]  # learned
    with pytest.raises(ValueError, match="node_ids"):
        NodeSlots(2, node_ids=[1, 1])
    with pytest.raises(ValueError, match="slot_key"):
        NodeSlots(2, key="")
    with pytest.raises(ValueError, match="n_slots must be a positive int; got 0"):
        NodeSlots(0)


# --- start-up: min_nodes ------------------------------------------------------------------------


class SlowStart(FakeSuperLink):
    """Nodes connect one by one, one per ``every`` calls of get_node_ids."""

    def __init__(self, nodes, every=3):
        super().__init__(nodes)
        self.every = every

    def get_node_ids(self):
        self.node_id_calls += 1
        return sorted(self.nodes)[: self.node_id_calls // self.every]


def test_min_nodes_waits_for_that_many_then_asks_whoever_is_connected(server_identity):
    grid = SlowStart({1: (0, trains(0)), 2: (1, trains(1)), 3: (2, trains(2))})
    strategy = FedAUStrategy(3, min_nodes=2, evaluate=False)
    messages = strategy.configure_train(1, to_record(torch.zeros(6)), ConfigRecord(), grid)
    assert len(grid.get_node_ids()) >= 2
    assert {m.metadata.dst_node_id for m in messages} <= {1, 2, 3}
    assert len(messages) >= 2


def test_too_few_nodes_is_a_clear_error(server_identity, flwr_log):
    grid = FakeSuperLink({1: (0, trains(0))})
    with pytest.raises(RuntimeError, match="only 1 nodes connected within 0.1 s; min_nodes=3"):
        FedAUStrategy(3, wait_for_nodes_s=0.1).configure_train(
            1, to_record(torch.zeros(6)), ConfigRecord(), grid
        )
    assert any(r.levelno == logging.ERROR and "min_nodes=3" in r.getMessage()
               for r in flwr_log.records)  # fmt: skip
    with pytest.raises(RuntimeError, match="min_nodes=2"):
        run_anarchic(grid, to_record(torch.zeros(6)), AFACS(2, 1.0, 0.1), 1, wait_for_nodes_s=0.1)
    with pytest.raises(ValueError, match="min_nodes"):
        FedAUStrategy(3, min_nodes=-1)
    with pytest.raises(ValueError, match="timeout"):
        wait_for_nodes(grid, 1, timeout=-1.0)


# --- AFA: rejoin and reasons --------------------------------------------------------------------


def test_afa_restarted_worker_rejoins_its_slot(server_identity, flwr_log):
    # AFA-CS, m = 2 of M = 3; node 12 (partition 1) is lost after its first arrival and comes
    # back as node 22 after round 2. AFA-CS keeps every slot's latest G_i: the rejoined node
    # must overwrite partition 1's entry, not take a new one.
    grid = FakeSuperLink({11: (0, trains(0)), 12: (1, trains(1)), 13: (2, trains(2))})
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    seen = {"arrivals": 0}
    original = grid.pull_messages

    def pull(ids):
        replies = original(ids)
        for reply in replies:
            if not reply.has_error() and reply.metadata.src_node_id == 12:
                grid.nodes[12] = (1, "lost")
        seen["arrivals"] += len(replies)
        if seen["arrivals"] >= 6 and 22 not in grid.online:
            grid.online.discard(12)
            grid.nodes[22] = (1, trains(1))
            grid.online.add(22)
        return replies

    grid.pull_messages = pull
    aggregator = AFACS(3, server_lr=0.5, local_lr=0.1, arrivals_per_round=2)
    result = run_anarchic(grid, to_record(x0), aggregator, 6, max_staleness=3, pull_interval=0)
    slot_of_p1 = result.slots.slot_key.index(1)
    assert result.node_ids[slot_of_p1] == 22
    assert any(22 in r.node_ids for r in result.rounds[2:])
    lost = [reason for r in result.rounds for reason in r.reasons]
    assert lost and all(x.startswith(f"node 12 (slot {slot_of_p1}") for x in lost)
    assert "node 22 rejoined as slot" in flwr_log.text
    # replay through AFA-CS's equations: memory[slot] = G of its latest arrival
    keys = result.slots.slot_key
    models, memory = [x0], torch.zeros(3, 6, dtype=torch.float64)
    for r in result.rounds:
        for slot, s in zip(r.clients, r.staleness, strict=True):
            start = models[-1 - s]
            memory[slot] = (start - _update(keys[slot], start)) / (0.1 * 1)
        models.append(models[-1] - 0.5 * 0.1 * memory.mean(0))
    torch.testing.assert_close(to_vector(result.arrays), models[-1], rtol=1e-12, atol=1e-12)


def test_afa_timeout_names_the_awaited_nodes(server_identity, flwr_log):
    grid = FakeSuperLink({1: (0, trains(0)), 2: (1, "silent")})
    aggregator = AFACS(2, 1.0, 0.1, arrivals_per_round=2)
    out = run_anarchic(grid, to_record(torch.zeros(6)), aggregator, 1, round_timeout=0.05)
    (r,) = out.rounds
    assert r.timed_out and r.node_ids == [1]
    assert r.reasons == ["node 2 (no slot yet) timed out: no reply yet"]
    assert "no reply from node 2" in flwr_log.text


# --- finite updates that overflow, through the Flower strategies (issue 16) ----------------------


def _huge(partition: int):
    def behaviour(msg):
        x = to_vector(msg.content.array_records["arrays"])
        y = x.clone()
        y[0] = 3e38
        metrics = {"partition-id": partition, "local-steps": 1}
        content = {"arrays": to_record(y), "metrics": MetricRecord(metrics)}
        return Message(RecordDict(content), reply_to=msg)

    return behaviour


@pytest.mark.parametrize("server_lr", [1.0, 2.0])
def test_fedau_strategy_keeps_the_model_finite_on_huge_finite_updates(
    server_identity, flwr_log, server_lr
):
    # float32 model at 0, two nodes send 3e38 in one entry (finite): the average is 3e38
    # (finite, computed overflow-safe); at server_lr 2 the new model 6e38 is not a float32, so
    # the round is refused as a whole and the model stays, logged with the nodes named
    grid = FakeSuperLink({1: (0, _huge(0)), 2: (1, _huge(1))})
    strategy = FedAUStrategy(2, evaluate=False, server_lr=server_lr)
    x = torch.zeros(6)
    replies = grid.send_and_receive(strategy.configure_train(1, to_record(x), ConfigRecord(), grid))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays, metrics = strategy.aggregate_train(1, replies)
    got = to_vector(arrays)
    assert torch.isfinite(got).all()
    if server_lr == 1.0:
        assert float(got[0]) == pytest.approx(3e38, rel=1e-6) and not metrics["refused"]
        assert not strategy.history[0]["refused"]
    else:
        assert torch.equal(got, x)
        assert strategy.history[0]["refused"] and metrics["refused"] == 1
        assert any("refused round" in str(w.message) for w in caught)
        assert "refused the aggregate of node 1 (slot 0, partition-id=0), node 2" in flwr_log.text


def test_run_anarchic_keeps_the_model_finite_on_huge_finite_updates(server_identity, flwr_log):
    # AFA-CS normalizes by η_L K: G = -3e38 / 0.1 is not a float32; the round is refused
    grid = FakeSuperLink({1: (0, _huge(0)), 2: (1, _huge(1))})
    x = torch.zeros(6)
    aggregator = AFACS(2, 1.0, 0.1, arrivals_per_round=2)
    with pytest.warns(RuntimeWarning, match="refused round"):
        out = run_anarchic(grid, to_record(x), aggregator, 1, pull_interval=0)
    assert torch.equal(to_vector(out.arrays), x) and out.rounds[0].refused
    assert "AFA round 1: refused the aggregate of node 1" in flwr_log.text


def test_fedau_state_restores_the_binding_and_afa_continues_it(server_identity):
    def federation():
        return FakeSuperLink({1: (0, trains(0)), 2: (1, trains(1)), 3: (2, trains(2))})

    def rejoin(g):
        g.online.discard(2)
        g.nodes[9] = (1, trains(1))
        g.online.add(9)

    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    grid = federation()
    strategy = FedAUStrategy(3, evaluate=False)
    arrays = _run_rounds(strategy, grid, x0, [lambda g: None, rejoin])
    # a restarted server: the same binding and intervals, so round 3 is the same
    twin = FedAUStrategy(3, evaluate=False)
    twin.load_state_dict(strategy.state_dict())
    assert twin.node_ids == strategy.node_ids == [1, 9, 3]
    outs = []
    for s in (strategy, twin):
        replies = grid.send_and_receive(s.configure_train(3, arrays, ConfigRecord(), grid))
        outs.append(to_vector(s.aggregate_train(3, replies)[0]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # AFA continues FedAU's binding: node 2 (replaced) is sent nothing, node 9 keeps slot 1
    grid.online.add(2)  # even if the SuperLink still lists it
    before = dict(grid.received)
    aggregator = AFACS(3, 1.0, 0.1, arrivals_per_round=3)
    out = run_anarchic(grid, arrays, aggregator, 1, slots=strategy.slots, pull_interval=0)
    assert grid.received.get(2, 0) == before.get(2, 0)
    assert sorted(out.rounds[0].clients) == [0, 1, 2] and out.node_ids == [1, 9, 3]
    with pytest.raises(ValueError, match="slots must be a NodeSlots"):
        run_anarchic(grid, arrays, AFACS(2, 1.0, 0.1), 1, slots=strategy.slots)


def test_a_bound_node_that_left_is_named(server_identity):
    grid = FakeSuperLink({1: (0, trains(0)), 2: (1, trains(1))})
    strategy = FedAUStrategy(2, evaluate=False)

    def leave(g):
        g.online.discard(2)  # its heartbeat expired: the SuperLink no longer lists it

    _run_rounds(strategy, grid, torch.zeros(6), [lambda g: None, leave])
    assert strategy.history[1]["reasons"] == ["node 2 (slot 1, partition-id=1) is not connected"]
    assert strategy.history[1]["slots"] == [0]
