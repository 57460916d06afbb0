"""The vectorized gossip simulator against a per-node loop, closed forms and a resume."""

import pytest
import torch
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.engine.layout import layer_variances
from meanwise.engine.local_training import LocalTraining
from meanwise.gossip import (
    GossipProtocol,
    GossipSimulator,
    MergeRule,
    ParameterLayout,
    merge_stacked,
    merge_state_dicts,
    random_regular,
    star,
)
from meanwise.gossip.reference import PerNodeGossip
from tests.engine._helpers import device  # noqa: F401  (the fixture)


def _net(width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).double()


def _data(n_clients: int, seed: int = 0) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(n_clients):
        size = 3 + i % 5  # some nodes smaller than the batch: padded and masked
        x = torch.randn(size, 4, generator=g, dtype=torch.float64)
        parts.append((x, torch.randint(0, 3, (size,), generator=g)))
    return FederatedDataset.from_clients(parts)


LOCAL = LocalTraining(rule="momentum", lr=0.1, batch_size=5, options={"weight_decay": 1e-3})


@pytest.mark.parametrize(
    "rule",
    [
        MergeRule(beta=0.5),
        MergeRule(beta=0.3, correct_variance=True),
        MergeRule(
            beta=0.5, correct_variance=True, include_self_variance=True, rescale_biases=False
        ),
    ],
)
@pytest.mark.parametrize("vectorize", ["stacked", "vmap"])
def test_simulator_equals_a_per_node_loop(rule, vectorize):
    # oracle: one nn.Module + torch.optim.SGD per node, messages one by one, merge_state_dicts
    top = random_regular(10, 3, seed=4)
    protocol = GossipProtocol(train_interval=(2, 4), buffer_size=2, local_steps=2)
    sim = GossipSimulator(
        _net(), top, _data(10), protocol, LOCAL, merge=rule, seed=7, vectorize=vectorize
    )
    assert sim.stacked == (vectorize == "stacked")
    ref = PerNodeGossip(_net(), top, _data(10), protocol, LOCAL, rule, sim.params, seed=7)
    sim.run(40)
    ref.run(40)
    assert sim.merges > 20
    torch.testing.assert_close(sim.params, ref.parameters(), rtol=1e-10, atol=1e-12)


def test_stacked_and_vmap_training_give_the_same_models():
    # the async protocol with momentum and corrected merges; "auto" takes batched matmuls for
    # a Linear/Tanh stack and vmap for anything else
    top = random_regular(12, 3, seed=1)
    protocol = GossipProtocol(train_interval=(2, 5))
    rule = MergeRule(correct_variance=True)
    sims = {
        how: GossipSimulator(_net(), top, _data(12), protocol, LOCAL, merge=rule, vectorize=how)
        for how in ("auto", "vmap")
    }
    assert sims["auto"].stacked and not sims["vmap"].stacked
    for sim in sims.values():
        sim.run(40)
    close = {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(sims["auto"].params, sims["vmap"].params, **close)
    for a, b in zip(sims["auto"].opt_state, sims["vmap"].opt_state, strict=True):
        torch.testing.assert_close(a, b, **close)
    conv = nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3))
    assert not GossipSimulator(conv.double(), top, _data(12), protocol, LOCAL).stacked
    with pytest.raises(ValueError, match="not a Linear layer"):
        GossipSimulator(conv.double(), top, _data(12), protocol, LOCAL, vectorize="stacked")
    with pytest.raises(ValueError, match="vectorize"):
        GossipSimulator(_net(), top, _data(12), protocol, LOCAL, vectorize=True)


def test_federated_star_leaves_adopt_the_average_of_the_leaves():
    top = star(6)
    sim = GossipSimulator(
        _net(),
        top,
        _data(6),
        GossipProtocol.federated(top, interval=4),
        LOCAL,
        merge=MergeRule(beta=0.0),
        seed=1,
    )
    sim.run(1)  # the centre's initial model reaches every leaf
    assert all(torch.equal(sim.params[i], sim.params[0]) for i in range(7))
    sim.run(4)  # leaves train once and the centre averages them (beta = 0)
    torch.testing.assert_close(sim.params[0], sim.params[1:].mean(0), rtol=1e-12, atol=1e-14)
    assert not torch.equal(sim.params[1], sim.params[2])
    sim.run(5)  # and sends the average back
    assert all(torch.equal(sim.params[i], sim.params[0]) for i in range(7))


def _wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).double()


@pytest.mark.parametrize("correct", [False, True])
def test_first_merge_of_independent_models_shrinks_variance_as_predicted(correct):
    # synchronous rounds, learning rate ~0: one merge of m + 1 independent models
    n, m, beta = 40, 8, 0.5
    top = random_regular(n, m, seed=0)
    local = LocalTraining(rule="sgd", lr=1e-300, batch_size=5)
    parts = [(torch.randn(4, 64, dtype=torch.float64), torch.zeros(4, dtype=torch.long))] * n
    sim = GossipSimulator(
        _wide_net(),
        top,
        FederatedDataset.from_clients(parts),
        GossipProtocol.synchronous(),
        local,
        merge=MergeRule(beta=beta, correct_variance=correct, eps=1e-12),
        seed=0,
    )
    sigma2 = sim.initial_variance["0.weight"]
    # PyTorch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in)
    assert sigma2 == pytest.approx(1 / (3 * 64), rel=0.01)
    sim.run(1)
    after = sim.layer_variance()["0.weight"]
    if correct:  # the received models' mean variance (eps negligible), i.e. sigma^2
        assert after == pytest.approx(sigma2, rel=0.01)
    else:
        predicted = (beta**2 + (1 - beta) ** 2 / m) * sigma2
        assert MergeRule(beta=beta).predicted_variance_ratio(m) == pytest.approx(0.28125)
        assert after == pytest.approx(predicted, rel=0.03)


def test_shared_and_independent_initialization():
    top = random_regular(6, 3)
    shared = GossipSimulator(_net(), top, _data(6), GossipProtocol(shared_init=True), LOCAL)
    assert all(torch.equal(shared.params[i], shared.params[0]) for i in range(6))
    model = _net()
    flat = ParameterLayout.of(model).flatten(dict(model.named_parameters()))
    torch.testing.assert_close(shared.params[0], flat.detach())
    own = GossipSimulator(_net(), top, _data(6), GossipProtocol(), LOCAL, seed=3)
    assert len({tuple(r.tolist()) for r in own.params}) == 6
    again = GossipSimulator(_net(), top, _data(6), GossipProtocol(), LOCAL, seed=3)
    assert torch.equal(own.params, again.params)  # seeded
    torch.testing.assert_close(
        torch.nn.utils.parameters_to_vector(model.parameters()), flat
    )  # the model passed in is left as it was


def test_resume_is_bit_exact(tmp_path):
    top = random_regular(8, 3)
    protocol = GossipProtocol(train_interval=(2, 4))
    rule = MergeRule(correct_variance=True)
    test = (torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,)))

    def make(path, log):
        return GossipSimulator(
            _net(),
            top,
            _data(8),
            protocol,
            LOCAL,
            merge=rule,
            test=test,
            eval_every=5,
            checkpoint_every=15,
            checkpoint_path=path,
            log_path=log,
            seed=2,
        )

    straight = make(tmp_path / "a.pt", tmp_path / "a.jsonl")
    straight.run(60)
    first = make(tmp_path / "b.pt", tmp_path / "b.jsonl")
    first.run(30)
    first.step()  # past the checkpoint: a resume must discard this tick and its log
    second = make(tmp_path / "b.pt", tmp_path / "b.jsonl")
    second.run(60, resume=True)
    assert torch.equal(straight.params, second.params)
    assert all(torch.equal(a, b) for a, b in zip(straight.opt_state, second.opt_state, strict=True))
    assert torch.equal(straight.storage, second.storage)
    assert straight.metrics == second.metrics
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    other = GossipSimulator(nn.Linear(4, 3).double(), top, _data(8), protocol, LOCAL)
    with pytest.raises(ValueError, match="checkpoint holds models"):
        other.load_state_dict(straight.state_dict())


def test_merge_stacked_matches_state_dict_merges():
    net = _net()
    layout = ParameterLayout.of(net)
    rows = torch.randn(2 + 2 * 5, layout.numel, dtype=torch.float64)
    own, received = rows[:2], rows[2:].reshape(2, 5, -1)
    for kw in (
        {},
        {"correct_variance": True},
        {"correct_variance": True, "include_self_variance": True, "rescale_biases": False},
    ):
        got = merge_stacked(own, received, layout, 0.4, **kw)
        for k in range(2):
            want = merge_state_dicts(
                layout.unflatten(own[k]), [layout.unflatten(r) for r in received[k]], 0.4, **kw
            )
            torch.testing.assert_close(got[k], layout.flatten(want), rtol=1e-12, atol=1e-14)
    # variances precomputed by the senders give the same merge
    precomputed = layer_variances(received, layout)
    for name, piece, _ in layout.entries():
        j = layout.names.index(name)
        torch.testing.assert_close(precomputed[1, 3, j], received[1, 3, piece].var())
    kw = {"correct_variance": True, "include_self_variance": True}
    torch.testing.assert_close(
        merge_stacked(own, received, layout, 0.4, received_variance=precomputed, **kw),
        merge_stacked(own, received, layout, 0.4, **kw),
    )
    with pytest.raises(ValueError, match="own must be"):
        merge_stacked(own[0], received, layout)
    with pytest.raises(ValueError, match="received_variance"):
        merge_stacked(
            own, received, layout, correct_variance=True, received_variance=precomputed[0]
        )


def test_errors_name_the_argument(tmp_path):
    top = random_regular(6, 3)
    with pytest.raises(ValueError, match="local.rule"):
        GossipSimulator(_net(), top, _data(6), local=LocalTraining(rule="adam", lr=0.01))
    with pytest.raises(ValueError, match="dampening"):
        GossipSimulator(
            _net(),
            top,
            _data(6),
            local=LocalTraining(rule="momentum", lr=0.1, options={"dampening": 0.5}),
        )
    with pytest.raises(ValueError, match="eval_nodes"):
        GossipSimulator(_net(), top, _data(6), eval_nodes=[9])
    with pytest.raises(ValueError, match="checkpoint_path"):
        GossipSimulator(_net(), top, _data(6), checkpoint_every=5)
    with pytest.raises(ValueError, match="beta"):
        MergeRule(beta=1.0)
    with pytest.raises(ValueError, match="reset_parameters"):

        class Bare(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.zeros(4, 3))

            def forward(self, x):
                return x @ self.w

        GossipSimulator(Bare(), top, _data(6))


def test_a_learning_rate_that_blows_up_stops_with_the_nodes_named():
    """Issue 16: `gossip --lr 1e30` gave all-NaN node models without a word."""
    from meanwise.engine.local_training import LocalTraining
    from meanwise.gossip import GossipProtocol, GossipSimulator, MergeRule, random_regular
    from meanwise.gossip.task import digits_model, digits_nodes

    train, test = digits_nodes(6, "iid")
    sim = GossipSimulator(
        digits_model("mlp"), random_regular(6, 2), train, GossipProtocol(),
        LocalTraining("sgd", lr=1e30, batch_size=8), merge=MergeRule(beta=0.5), test=test,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"nodes \[.*\] non-finite.*lr=1e\+30"):
        sim.run(40)
    with pytest.raises(ValueError, match="positive finite"):
        LocalTraining("sgd", lr=float("inf"))


@pytest.mark.parametrize("vectorize", ["stacked", "vmap"])
def test_a_short_run_on_each_device(device, vectorize):  # noqa: F811
    # on the CPU, device= changes nothing (bit-exact); on CUDA every node's model, state,
    # buffer and the data live there and the run is the CPU's up to float rounding (the same
    # schedule and minibatches: drawn on the CPU)
    top = random_regular(10, 3, seed=4)
    protocol = GossipProtocol(train_interval=(2, 4), buffer_size=2, local_steps=2)
    g = torch.Generator().manual_seed(9)
    test = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,))

    def run(where):
        sim = GossipSimulator(
            _net(), top, _data(10), protocol, LOCAL, merge=MergeRule(correct_variance=True),
            test=test, eval_every=10, seed=7, vectorize=vectorize, device=where,
        )  # fmt: skip
        sim.run(num_ticks=30)
        return sim

    reference, sim = run(None), run(device)
    assert sim.params.device.type == device.type and sim.storage.device.type == device.type
    if device.type == "cpu":
        assert torch.equal(sim.params, reference.params)
        assert torch.equal(sim.opt_state[0], reference.opt_state[0])
    else:
        torch.testing.assert_close(sim.params.cpu(), reference.params, rtol=1e-9, atol=1e-11)
    assert sim.merges == reference.merges and sim.trainings == reference.trainings


def test_run_takes_num_ticks_and_the_old_keyword_with_a_warning():
    sim = GossipSimulator(_net(), random_regular(6, 2, seed=1), _data(6), local=LOCAL, seed=1)
    with pytest.warns(DeprecationWarning, match=r"run\(ticks=...\) is deprecated"):
        sim.run(ticks=3)
    assert sim.tick == 3
    with pytest.raises(TypeError, match="num_ticks only"):
        sim.run(4, ticks=4)
    sim.run(5)
    assert sim.tick == 5
