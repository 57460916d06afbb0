"""Flower integration: FedAUStrategy and run_anarchic against hand-written equations (on an
in-process grid, fast), and end to end in Flower's Ray simulation (extra flower-sim) against
the meanwise simulator on the same client updates."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest
import torch
from torch import nn

flwr = pytest.importorskip("flwr", reason="install the flower extra: pip install '.[flower]'")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid  # noqa: E402

from meanwise.data.federated_split import FederatedDataset  # noqa: E402
from meanwise.engine.layout import ParameterLayout  # noqa: E402
from meanwise.federated import (  # noqa: E402
    AFACD,
    AFACS,
    FedAU,
    FederatedSimulator,
    LocalTraining,
)
from meanwise.federated.flower import (  # noqa: E402
    AnarchicServer,
    ArrayCodec,
    FedAUStrategy,
    local_training_client_app,
    run_anarchic,
)
from meanwise.federated.participation import Anarchic, Arrivals, ParticipationProcess  # noqa: E402
from tests.federated._flower_grid import TickingGrid, to_record, to_vector  # noqa: E402

# --- an in-process Grid: each node is a Python function -------------------------------------


class ScriptedGrid(TickingGrid):
    """Nodes answer through ``handler(node_id, message) -> (reply | None, delay)``: the reply
    becomes visible ``delay`` pulls later; None never arrives (a node that times out)."""

    def __init__(self, node_ids, handler):
        super().__init__()
        self.ids = list(node_ids)
        self.handler = handler

    def get_node_ids(self):
        return list(self.ids)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply, delay = self.handler(msg.metadata.dst_node_id, msg)
            if reply is not None:
                self.pending[msg.metadata.message_id] = (self.tick + delay, reply)
            ids.append(msg.metadata.message_id)
        return ids


def _update(node: int, x: torch.Tensor) -> torch.Tensor:
    """A client's trained vector: a fixed function of its id and the model it received."""
    return x * (1 - 0.1 * (node % 7)) + 0.01 * node + 0.001 * torch.arange(6, dtype=x.dtype)


def _reply(msg: Message, y: torch.Tensor | None, metrics: dict | None = None) -> Message:
    content = {"metrics": MetricRecord(metrics or {"num-examples": 1})}
    if y is not None:
        content["arrays"] = to_record(y)
    return Message(RecordDict(content), reply_to=msg)


# --- FedAUStrategy ------------------------------------------------------------------------------

# behaviour of node i (ids 11, 12, ...) in each round; anything but "ok" must count as absent
SCRIPT = [
    ["ok", "ok", "decline", "ok", "timeout"],
    ["ok", "error", "ok", "ok", "ok"],
    ["decline", "ok", "nan", "ok", "ok"],
    ["ok", "ok", "ok", "badshape", "ok"],
    ["error", "timeout", "decline", "nan", "badshape"],  # nobody: the model stays
    ["ok", "ok", "ok", "ok", "ok"],
    ["ok", "decline", "ok", "ok", "ok"],
]
NODE_IDS = [11, 12, 13, 14, 15]


def _fedau_handler(round_of: Callable[[], int]):
    def handler(node, msg):
        action = SCRIPT[round_of() - 1][NODE_IDS.index(node)]
        x = to_vector(msg.content.array_records["arrays"])
        if action == "timeout":
            return None, 0
        if action == "error":
            return Message(Error(code=0, reason="client crashed"), reply_to=msg), 0
        if action == "decline":
            return _reply(msg, None), 0
        y = _update(node, x)
        if action == "nan":
            y[2] = float("nan")
        if action == "badshape":
            content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3)})})
            return Message(content, reply_to=msg), 0
        return _reply(msg, y), 0

    return handler


def _fedau_by_hand(x: torch.Tensor, rounds: int, server_lr: float) -> torch.Tensor:
    """FedAU's equations, written out: ω_n = mean of n's recorded intervals (1 before any),
    x ← x + η/N Σ_S ω_n Δ_n; a participant records (rounds absent since its last record) + 1."""
    n = len(NODE_IDS)
    intervals: list[list[int]] = [[] for _ in range(n)]
    absent = [0] * n
    for r in range(rounds):
        here = [i for i in range(n) if SCRIPT[r][i] == "ok"]
        direction = torch.zeros_like(x)
        for i in here:
            omega = sum(intervals[i]) / len(intervals[i]) if intervals[i] else 1.0
            direction += omega * (_update(NODE_IDS[i], x) - x)
        for i in range(n):
            if i in here:
                intervals[i].append(absent[i] + 1)
                absent[i] = 0
            else:
                absent[i] += 1
        x = x + server_lr * direction / n
    return x


def test_fedau_strategy_follows_the_equations_and_survives_bad_nodes(server_identity):
    strategy = FedAUStrategy(5, server_lr=0.7, evaluate=False)
    current = {"round": 0}
    original = strategy.configure_train

    def configure(server_round, arrays, config, grid):
        current["round"] = server_round
        return original(server_round, arrays, config, grid)

    strategy.configure_train = configure
    grid = ScriptedGrid(NODE_IDS, _fedau_handler(lambda: current["round"]))
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = strategy.start(grid, to_record(x0), num_rounds=len(SCRIPT))
    expected = _fedau_by_hand(x0, len(SCRIPT), 0.7)
    torch.testing.assert_close(to_vector(result.arrays), expected, rtol=1e-12, atol=1e-12)
    assert strategy.node_ids == NODE_IDS
    assert [h["participants"] for h in strategy.history] == [
        sum(a == "ok" for a in row) for row in SCRIPT
    ]
    assert strategy.aggregator.dropped_nonfinite == 2
    reasons = " ".join(r for h in strategy.history for r in h["reasons"])
    assert "failed: client crashed" in reasons and "declined" in reasons
    assert "malformed" in reasons
    # the interval counters advanced in the empty round 5 as well: node 11 took part in
    # rounds 1, 2, 4, 6, 7 -> intervals 1, 1, 2, 2, 1
    w = strategy.aggregator.weights
    assert float(w.interval_sum[0]) == 7 and int(w.interval_count[0]) == 5


def test_fedau_strategy_rejects_bad_arguments(server_identity):
    with pytest.raises(ValueError, match="n_nodes"):
        FedAUStrategy(0)
    with pytest.raises(ValueError, match="node_ids"):
        FedAUStrategy(3, node_ids=[1, 2, 2])
    with pytest.raises(RuntimeError, match="configure_train"):
        FedAUStrategy(2).aggregate_train(1, [])
    with pytest.raises(TypeError, match="ArrayRecord"):
        ArrayCodec({"w": torch.zeros(2)})
    grid = ScriptedGrid([1], lambda n, m: (None, 0))
    with pytest.raises(RuntimeError, match="only 1 nodes connected.*min_nodes=2"):
        FedAUStrategy(2, wait_for_nodes_s=0.1).configure_train(
            1, to_record(torch.zeros(6)), ConfigRecord(), grid
        )


# --- run_anarchic -------------------------------------------------------------------------------


def _steps(node: int) -> int:
    return 1 + node % 3


def test_run_anarchic_follows_the_equations_with_stale_updates(server_identity):
    # node 3 is slow (its replies take 4 pulls), so its updates arrive on older models; node 4
    # fails once; the rule is AFA-CD: x <- x - eta * eta_L * mean_i G_i,
    # G_i = (x_start_i - y_i) / (eta_L * K_i), x_start_i the (stale) model node i trained on
    calls = {4: 0}

    def handler(node, msg):
        x = to_vector(msg.content.array_records["arrays"])
        if node == 4:
            calls[4] += 1
            if calls[4] == 2:
                return Message(Error(code=0, reason="lost"), reply_to=msg), 1
        metrics = {"num-examples": 1, "local-steps": _steps(node)}
        return _reply(msg, _update(node, x), metrics), 4 if node == 3 else 1

    ids = [1, 2, 3, 4]
    aggregator = AFACD(4, server_lr=0.5, local_lr=0.1, arrivals_per_round=2)
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    result = run_anarchic(
        ScriptedGrid(ids, handler), to_record(x0), aggregator, 8, max_staleness=2, pull_interval=0
    )
    # replies report no partition-id: nodes are bound by node id, in order of arrival
    assert len(result.rounds) == 8 and sorted(result.node_ids) == ids
    stale = [s for r in result.rounds for s in r.staleness]
    assert max(stale) >= 1 and max(stale) <= 2  # stale updates happen, within the bound
    assert sum(r.failed for r in result.rounds) == 1
    # replay the recorded schedule through the equations
    models = [x0]
    for r in result.rounds:
        g = [
            (models[-1 - s] - _update(nid, models[-1 - s])) / (0.1 * k)
            for nid, s, k in zip(r.node_ids, r.staleness, r.local_steps, strict=True)
        ]
        assert r.local_steps == [_steps(n) for n in r.node_ids]
        models.append(models[-1] - 0.5 * 0.1 * torch.stack(g).mean(0))
    torch.testing.assert_close(to_vector(result.arrays), models[-1], rtol=1e-12, atol=1e-12)


def _stale_handler():
    """Node 3 slow (4 pulls), the others 1; K_i = _steps(node)."""

    def handler(node, msg):
        x = to_vector(msg.content.array_records["arrays"])
        metrics = {"num-examples": 1, "local-steps": _steps(node)}
        return _reply(msg, _update(node, x), metrics), 4 if node == 3 else 1

    return handler


def _without_seconds(rounds) -> list[dict]:
    import dataclasses

    return [{k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"} for r in rounds]


def test_anarchic_server_continued_round_by_round_is_one_run(server_identity):
    # the state machine keeps everything a round needs (versions within reach of a stale
    # update, messages in flight, replies pulled early): 3 rounds, then step() twice, then
    # run(3) more are the same 8 rounds as run_anarchic(8) on the same federation
    def fresh():
        aggregator = AFACS(4, server_lr=0.5, local_lr=0.1, arrivals_per_round=2)
        return ScriptedGrid([1, 2, 3, 4], _stale_handler()), aggregator

    grid, aggregator = fresh()
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    whole = run_anarchic(grid, to_record(x0), aggregator, 8, max_staleness=2, pull_interval=0)
    grid, aggregator = fresh()
    server = AnarchicServer(grid, to_record(x0), aggregator, max_staleness=2, pull_interval=0)
    assert len(server.run(3).rounds) == 3
    closed = [server.step(), server.step()]
    assert [r.round for r in closed] == [4, 5] and server.version == 5
    pieces = server.run(3)
    assert _without_seconds(pieces.rounds) == _without_seconds(whole.rounds)
    assert any(s > 0 for r in whole.rounds for s in r.staleness)  # stale updates were used
    assert torch.equal(to_vector(pieces.arrays), to_vector(whole.arrays))
    assert torch.equal(server.aggregator.memory, aggregator.memory)
    with pytest.raises(ValueError, match="num_rounds"):
        server.run(0)


def test_array_codec_is_the_simulators_parameter_layout():
    # a model without buffers: the codec's flat vector is the ParameterLayout row the
    # simulators and the gossip runner use for the same model
    model = _model()
    arrays = ArrayRecord(model.state_dict())
    codec = ArrayCodec(arrays)
    layout = ParameterLayout.of(model)
    assert codec.layout == layout
    flat = layout.flatten({k: v.detach() for k, v in model.named_parameters()})
    assert torch.equal(codec.flatten(arrays), flat)
    back = codec.record(flat * 2, arrays).to_torch_state_dict()
    assert all(torch.equal(back[k], 2 * v) for k, v in model.state_dict().items())


def test_array_codec_mixed_dtypes_scalars_and_integer_buffers():
    arrays = ArrayRecord(
        {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "temperature": torch.tensor(0.5, dtype=torch.float64),  # a 0-dim parameter
            "num_batches_tracked": torch.tensor(7),
            "b": torch.tensor([1.5, -2.0], dtype=torch.float16),
        }
    )
    codec = ArrayCodec(arrays)
    assert codec.dtype == torch.float64 and codec.numel == 6 + 1 + 2
    assert codec.layout.names == ("w", "temperature", "b")  # floating arrays, in key order
    flat = codec.flatten(arrays)
    expected = torch.tensor([0, 1, 2, 3, 4, 5, 0.5, 1.5, -2.0], dtype=torch.float64)
    assert torch.equal(flat, expected)
    back = codec.record(flat + 1, arrays).to_torch_state_dict()
    assert list(back) == ["w", "temperature", "num_batches_tracked", "b"]
    assert back["temperature"].shape == () and float(back["temperature"]) == 1.5
    assert back["b"].dtype == torch.float16 and back["b"].tolist() == [2.5, -1.0]
    assert int(back["num_batches_tracked"]) == 7  # passed through, not averaged
    with pytest.raises(ValueError, match="array 'w' is torch.float64"):
        codec.flatten(ArrayRecord({**back, "w": torch.zeros(2, 3, dtype=torch.float64)}))
    with pytest.raises(ValueError, match="flat must have shape \\[9\\]"):
        codec.record(flat[:4], arrays)


def test_run_anarchic_rejects_bad_arguments():
    grid = ScriptedGrid([1], lambda n, m: (None, 0))
    with pytest.raises(TypeError, match="aggregator"):
        run_anarchic(grid, to_record(torch.zeros(6)), FedAU(1), 1)
    with pytest.raises(ValueError, match="num_rounds"):
        run_anarchic(grid, to_record(torch.zeros(6)), AFACD(1, 1.0, 0.1), 0)


def test_run_anarchic_closes_a_round_on_timeout(server_identity):
    grid = ScriptedGrid([1, 2], lambda n, m: (None, 0))  # nobody ever answers
    x0 = torch.ones(6, dtype=torch.float64)
    out = run_anarchic(
        grid, to_record(x0), AFACS(2, 1.0, 0.1, arrivals_per_round=1), 2, round_timeout=0.05
    )
    assert [r.timed_out for r in out.rounds] == [True, True]
    assert torch.equal(to_vector(out.arrays), x0)


def test_run_anarchic_bounded_delay_waits_and_discarding_is_opt_in(server_identity):
    # node 3 answers 10 pulls after it gets a model, nodes 1 and 2 after 1; one arrival closes
    # a round, so node 3's model is always more than max_staleness = 2 versions old when its
    # reply comes. Default: the round where its model is 2 versions old waits for it (accepted
    # at delay 2, every node arrives). discard_stale=True: it is rejected every time.
    def handler(node, msg):
        x = to_vector(msg.content.array_records["arrays"])
        reply = _reply(msg, _update(node, x), {"num-examples": 1, "local-steps": 1})
        return reply, 10 if node == 3 else 1

    def run(rounds, **kw):
        aggregator = AFACD(3, server_lr=0.5, local_lr=0.1, arrivals_per_round=1)
        x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
        grid = ScriptedGrid([1, 2, 3], handler)
        return run_anarchic(
            grid, to_record(x0), aggregator, rounds, max_staleness=2, pull_interval=0, **kw
        )

    waiting = run(12)
    assert all(max(r.staleness) <= 2 for r in waiting.rounds)
    assert sum(r.rejected_stale for r in waiting.rounds) == 0
    assert {n for r in waiting.rounds for n in r.node_ids} == {1, 2, 3}
    assert any(3 in r.node_ids and len(r.node_ids) > 1 for r in waiting.rounds)  # waited
    discarding = run(40, discard_stale=True)
    assert all(3 not in r.node_ids and len(r.node_ids) == 1 for r in discarding.rounds)
    assert sum(r.rejected_stale for r in discarding.rounds) >= 1


# --- end to end: Flower's Ray simulation vs the meanwise simulator -----------------------------

N_NODES, FEDAU_ROUNDS, AFA_ROUNDS = 4, 4, 4
# which partitions take part in each FedAU round; partition 3 raises in round 2 (a failure)
TAKES_PART = [[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]]
FAILS = (2, 3)


def _node_data(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + partition)
    size = 6 + 5 * partition
    x = torch.randn(size, 5, generator=gen, dtype=torch.float64) + partition
    return x, torch.randint(0, 3, (size,), generator=gen)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


LOCAL = LocalTraining("sgd", lr=0.1, steps=3, batch_size=64)  # >= every node: full batch


class _Replay(ParticipationProcess):
    def __init__(self, masks):
        super().__init__(torch.ones(masks.shape[1]))
        self.masks = masks

    def _draw(self):
        return self.masks[self.round]


class _ReplayArrivals(Anarchic):
    def __init__(self, rounds, n_workers, max_staleness):
        super().__init__(n_workers, 1, 4, max_staleness=max_staleness)
        self.recorded = rounds

    def next_round(self):
        r = self.recorded[self.round]
        self.round += 1
        t = torch.tensor
        return Arrivals(
            t(r["workers"]), t(r["steps"]), t(r["staleness"]), t(r["staleness"]), 0.0, 0
        )


@pytest.fixture(scope="module")
def flower_run():
    pytest.importorskip("ray", reason="Flower's simulation needs the flower-sim extra (Ray)")
    from flwr.clientapp import ClientApp  # noqa: F401 - the extra is installed
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    takes_part, fails = TAKES_PART, FAILS

    def data_fn(context: Context):
        p = int(context.node_config["partition-id"])
        gen = torch.Generator().manual_seed(100 + p)
        size = 6 + 5 * p
        x = torch.randn(size, 5, generator=gen, dtype=torch.float64) + p
        return x, torch.randint(0, 3, (size,), generator=gen)

    def participate(context: Context, server_round: int) -> bool:
        p = int(context.node_config["partition-id"])
        if (server_round, p) == fails:
            raise RuntimeError("this node crashes in this round")
        return bool(takes_part[server_round - 1][p])

    def local_steps(context: Context, version: int) -> int:
        return 1 + int(context.node_config["partition-id"])  # 1..4 steps: heterogeneous

    def model_fn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    client = local_training_client_app(model_fn, data_fn, LOCAL, participate=participate)
    anarchic = local_training_client_app(model_fn, data_fn, LOCAL, local_steps=local_steps)
    # one ClientApp, two behaviours: the AFA phase marks its messages with "model-version"
    both = ClientApp()

    @both.train()
    def train(msg: Message, context: Context) -> Message:
        app = anarchic if "model-version" in msg.content.config_records["config"] else client
        return app(msg, context)

    server = ServerApp()
    out: dict = {}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord(model_fn().state_dict())
        strategy = FedAUStrategy(N_NODES, server_lr=0.8, evaluate=False)
        res = strategy.start(grid, initial, num_rounds=FEDAU_ROUNDS, timeout=120)
        out["fedau"] = (strategy, res.arrays)
        afa = AFACS(N_NODES, server_lr=1.0, local_lr=LOCAL.lr, arrivals_per_round=2)
        out["afa"] = run_anarchic(
            grid, initial, afa, AFA_ROUNDS, max_staleness=3, round_timeout=120
        )

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
    }
    run_simulation(server, both, num_supernodes=N_NODES, backend_name="ray",
                   backend_config=backend)  # fmt: skip
    return out


def _simulator(aggregator, participation) -> FederatedSimulator:
    data = FederatedDataset.from_clients([_node_data(p) for p in range(N_NODES)])
    return FederatedSimulator(_model(), data, aggregator, participation, LOCAL, eval_every=100)


def _partition_of(metrics_by_node: dict) -> dict[int, int]:
    return {int(node): int(m["partition-id"]) for node, m in metrics_by_node.items()}


def test_flower_fedau_equals_the_simulator(flower_run):
    strategy, arrays = flower_run["fedau"]
    masks = torch.tensor(TAKES_PART, dtype=torch.bool)
    masks[FAILS[0] - 1, FAILS[1]] = False  # the crashed node counts as absent
    assert [h["participants"] for h in strategy.history] == masks.sum(1).tolist()
    sim = _simulator(FedAU(N_NODES, server_lr=0.8), _Replay(masks))
    sim.run(FEDAU_ROUNDS)
    got = ArrayCodec(arrays).flatten(arrays)
    assert not torch.equal(got, _simulator(FedAU(N_NODES), _Replay(masks)).x)  # it trained
    torch.testing.assert_close(got, sim.x, rtol=1e-10, atol=1e-12)
    # the same interval statistics per client (Flower's client index is by node id)
    partition = {}
    for h in strategy.history:
        partition.update(_partition_of(h["metrics"]))
    order = [partition[nid] for nid in strategy.node_ids]
    w_flower, w_sim = strategy.aggregator.weights, sim.aggregator.weights
    assert torch.equal(w_flower.interval_sum, w_sim.interval_sum[order])
    assert torch.equal(w_flower.interval_count, w_sim.interval_count[order])


def test_flower_afa_cs_equals_the_simulator(flower_run):
    result = flower_run["afa"]
    rounds = [
        {
            "workers": [int(m["partition-id"]) for m in r.metrics],
            "steps": r.local_steps,
            "staleness": r.staleness,
        }
        for r in result.rounds
    ]
    assert all(len(r["workers"]) == 2 for r in rounds)
    # m = 2 of M = 4: the two workers left out of round 1 arrive on a model one version old
    assert any(s > 0 for r in rounds for s in r["staleness"])
    assert all(r["steps"] == [1 + w for w in r["workers"]] for r in rounds)
    replay = _ReplayArrivals(rounds, N_NODES, max_staleness=3)
    sim = _simulator(AFACS(N_NODES, 1.0, LOCAL.lr, arrivals_per_round=2), replay)
    sim.run(AFA_ROUNDS)
    got = ArrayCodec(result.arrays).flatten(result.arrays)
    torch.testing.assert_close(got, sim.x, rtol=1e-10, atol=1e-12)
