"""The torch.distributed runner (4 gloo processes on loopback) against the simulator."""

import pytest
import torch

from meanwise.gossip.distributed import GossipRunConfig, free_port, launch_local, simulate


@pytest.mark.parametrize("synchronous", [True, False])
def test_four_processes_give_the_simulators_models(synchronous):
    config = GossipRunConfig(
        nodes=4,
        topology="ring",
        ticks=8 if synchronous else 30,
        synchronous=synchronous,
        correct_variance=True,
        hidden=8,
        dtype="float64",
        eval_every=4,
        seed=3,
    )
    sim = simulate(config)  # first: forked workers then inherit warm imports and caches
    result = launch_local(config, port=free_port(), start_method="fork")
    assert result["params"].dtype == torch.float64
    torch.testing.assert_close(result["params"], sim.params, rtol=1e-9, atol=1e-12)
    stats = result["stats"]
    assert sum(s["merges"] for s in stats) == sim.merges > 0
    assert sum(s["trainings"] for s in stats) == sim.trainings
    assert sum(s["messages_sent"] for s in stats) == sum(s["messages_received"] for s in stats)
    if synchronous:  # every node trains and merges once per round
        assert all(s["merges"] == s["trainings"] == 8 for s in stats)


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="topology"):
        GossipRunConfig(topology="hypercube")
    with pytest.raises(ValueError, match="nodes"):
        GossipRunConfig(nodes=1)
    with pytest.raises(ValueError, match="square"):
        GossipRunConfig(nodes=8, topology="torus").build_topology()


def test_a_finite_but_huge_learning_rate_stops_the_run_naming_the_node():
    """--lr 1e30 is finite, yet one local step makes the models non-finite: the runner must
    stop with the node named (as the simulator does) instead of gossiping NaN to everyone."""
    config = GossipRunConfig(
        nodes=3, topology="ring", ticks=4, synchronous=True, lr=1e30, hidden=4, timeout_s=20
    )
    with pytest.raises(ValueError, match="non-finite"):
        simulate(config)
    with pytest.raises(RuntimeError, match=r"rank\) \d failed: .*node \d's model non-finite"):
        launch_local(config, port=free_port(), start_method="fork")
