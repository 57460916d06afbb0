"""Regression pins: the sha256 of short simulator runs' final parameters (and logged metrics).

The engine refactor (issue 14) moved the layout, local training and run loop shared by the
federated and gossip simulators into ``meanwise.engine``; it must not change one bit of what
they compute. These hashes were recorded on the code *before* that refactor (commit e390d8d)
and pin every path it touched: FedAvg / FedAU / AFA-CS / MIFA, sgd / adam / momentum local
rules, the batched-matmul, vmap and sequential executions, a FederatedSweep, an anarchic run,
a checkpointed resume, and the gossip simulator with plain and corrected merges,
asynchronous and synchronous, stacked and vmap.

Float results depend on the torch build and the CPU's kernels, so the pins hold for the build
they were recorded on (below); elsewhere the test says so and skips. Regenerate with
``python tests/engine/test_pinned_runs.py`` (prints the table) only when a change of numbers
is intended and explained.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable

import pytest
import torch
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.federated import (
    AFACS,
    MIFA,
    Anarchic,
    Bernoulli,
    FedAU,
    FedAvg,
    FederatedSimulator,
    FederatedSweep,
    LocalTraining,
    Markov,
)
from meanwise.gossip import GossipProtocol, GossipSimulator, MergeRule, random_regular, star

RECORDED_ON = ("2.13.0", "x86_64")


def _digest(*tensors: torch.Tensor, metrics: list | None = None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if metrics is not None:
        h.update(json.dumps(metrics, sort_keys=True).encode())
    return h.hexdigest()[:32]  # 128 bits: plenty for a regression pin


def _without_test_loss(metrics: list) -> list:
    # the gossip simulator's test_loss moved to the engine's one evaluation (the mean over
    # nodes of each node's mean per-example loss, as the federated simulator computes it),
    # which rounds differently from F.cross_entropy's own mean: pinned without it
    return [{k: v for k, v in record.items() if k != "test_loss"} for record in metrics]


def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _fl_data(n: int = 8, seed: int = 0, dtype=torch.float64) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(n):
        size = 3 + 7 * (i % 4)  # some clients smaller than the batch
        parts.append(
            (
                torch.randn(size, 6, generator=g, dtype=dtype),
                torch.randint(0, 3, (size,), generator=g),
            )
        )
    return FederatedDataset.from_clients(parts)


def _test_set(seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 6, generator=g, dtype=dtype), torch.randint(0, 3, (40,), generator=g)


def _fed(aggregator, local, vectorize, participation=None, rounds=6, **kw) -> str:
    data = _fl_data()
    participation = Bernoulli([0.6] * 8, seed=3) if participation is None else participation
    sim = FederatedSimulator(
        _mlp(), data, aggregator, participation, local, test=_test_set(), eval_every=2,
        seed=5, vectorize=vectorize, **kw,
    )  # fmt: skip
    sim.run(rounds)
    return _digest(sim.x, metrics=sim.metrics)


SGD = LocalTraining("sgd", lr=0.2, steps=3, batch_size=8, options={"weight_decay": 0.01})
ADAM = LocalTraining("adam", lr=0.02, steps=3, batch_size=8)
MOMENTUM = LocalTraining("momentum", lr=0.1, steps=2, batch_size=8)


def _fed_anarchic() -> str:
    arrivals = Anarchic(8, arrivals_per_round=3, max_local_steps=4, max_staleness=2, seed=2)
    return _fed(AFACS(8, server_lr=1.0, local_lr=0.2, arrivals_per_round=3), SGD, "auto", arrivals)


def _fed_sequential_batchnorm() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    sim = FederatedSimulator(
        model, _fl_data(), FedAvg(8), Bernoulli([0.6] * 8, seed=3), SGD, test=_test_set(),
        eval_every=2, seed=5, vectorize=False,
    )  # fmt: skip
    sim.run(4)
    return _digest(sim.x, *sim.buffers.values(), metrics=sim.metrics)


def _fed_sweep() -> str:
    sweep = FederatedSweep(
        _mlp(), _fl_data(), [FedAvg(8), FedAU(8), FedAvg(8, server_lr=0.5)],
        Markov([0.5] * 8, rate=0.3, seed=1), ADAM, test=_test_set(), eval_every=3, seed=4,
    )  # fmt: skip
    sweep.run(3)
    sweep.stop(1)
    sweep.run(6)
    return _digest(sweep.xs, metrics=sweep.metrics)


def _fed_resume(tmp_path) -> str:
    def make():
        return FederatedSimulator(
            _mlp(), _fl_data(), FedAU(8), Bernoulli([0.6] * 8, seed=3), SGD, test=_test_set(),
            eval_every=2, checkpoint_every=3, checkpoint_path=tmp_path / "ck.pt",
            log_path=tmp_path / "log.jsonl", seed=5,
        )  # fmt: skip

    make().run(3)
    sim = make()
    sim.run(7, resume=True)
    log = json.loads("[" + ",".join((tmp_path / "log.jsonl").read_text().splitlines()) + "]")
    return _digest(sim.x, metrics=[sim.metrics, log])


def _gossip_data(n: int, seed: int = 0) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(n):
        size = 3 + i % 5
        x = torch.randn(size, 4, generator=g, dtype=torch.float64)
        parts.append((x, torch.randint(0, 3, (size,), generator=g)))
    return FederatedDataset.from_clients(parts)


def _gossip_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


GOSSIP_LOCAL = LocalTraining("momentum", lr=0.1, batch_size=5, options={"weight_decay": 1e-3})


def _gossip(protocol, merge, vectorize, ticks=30, topology=None, **kw) -> str:
    topology = random_regular(10, 3, seed=4) if topology is None else topology
    g = torch.Generator().manual_seed(9)
    test = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,))
    sim = GossipSimulator(
        _gossip_net(), topology, _gossip_data(topology.n_nodes - len(protocol.idle_nodes)),
        protocol, GOSSIP_LOCAL, merge=merge, test=test, eval_every=10, seed=7,
        vectorize=vectorize, **kw,
    )  # fmt: skip
    sim.run(ticks)
    return _digest(sim.params, *sim.opt_state, sim.storage, metrics=_without_test_loss(sim.metrics))


def _gossip_resume(tmp_path) -> str:
    protocol = GossipProtocol(train_interval=(2, 4), buffer_size=2)
    rule = MergeRule(correct_variance=True)
    kw = dict(checkpoint_every=7, checkpoint_path=tmp_path / "g.pt", log_path=tmp_path / "g.jsonl")
    top = random_regular(10, 3, seed=4)

    def make():
        return GossipSimulator(
            _gossip_net(), top, _gossip_data(10), protocol, GOSSIP_LOCAL, merge=rule,
            eval_every=5, seed=7, **kw,
        )  # fmt: skip

    make().run(14)
    sim = make()
    sim.run(25, resume=True)
    log = json.loads("[" + ",".join((tmp_path / "g.jsonl").read_text().splitlines()) + "]")
    metrics = [_without_test_loss(sim.metrics), _without_test_loss(log)]
    return _digest(sim.params, *sim.opt_state, metrics=metrics)


ASYNC = GossipProtocol(train_interval=(2, 4), buffer_size=2, local_steps=2)
PLAIN = MergeRule(beta=0.5)
CORRECTED = MergeRule(beta=0.3, correct_variance=True)

RUNS: dict[str, Callable[..., str]] = {
    "fedavg-sgd-stacked": lambda: _fed(FedAvg(8), SGD, "auto"),
    "fedavg-sgd-vmap": lambda: _fed(FedAvg(8), SGD, "vmap"),
    "fedau-adam-stacked": lambda: _fed(FedAU(8), ADAM, "auto"),
    "fedau-adam-vmap": lambda: _fed(FedAU(8), ADAM, "vmap"),
    "mifa-momentum-stacked": lambda: _fed(MIFA(8), MOMENTUM, True),
    "mifa-sgd-vmap-small-chunks": lambda: _fed(MIFA(8), SGD, "vmap", chunk_bytes=2000),
    "afacs-anarchic": _fed_anarchic,
    "fedavg-sequential-batchnorm": _fed_sequential_batchnorm,
    "sweep-adam": _fed_sweep,
    "fedau-resume": _fed_resume,
    "gossip-async-plain-stacked": lambda: _gossip(ASYNC, PLAIN, "stacked"),
    "gossip-async-plain-vmap": lambda: _gossip(ASYNC, PLAIN, "vmap"),
    "gossip-async-corrected-stacked": lambda: _gossip(ASYNC, CORRECTED, "stacked"),
    "gossip-async-corrected-vmap": lambda: _gossip(ASYNC, CORRECTED, "vmap"),
    "gossip-sync-plain": lambda: _gossip(GossipProtocol.synchronous(), PLAIN, "auto", ticks=8),
    "gossip-sync-corrected": lambda: _gossip(
        GossipProtocol.synchronous(local_steps=2), CORRECTED, "auto", ticks=8
    ),
    "gossip-federated-star": lambda: _gossip(
        GossipProtocol.federated(star(7), interval=3),
        MergeRule(beta=0.0),
        "auto",
        topology=star(7),
        eval_nodes=[0],
    ),  # fmt: skip
    "gossip-resume": _gossip_resume,
}

PINS: dict[str, str] = {
    "afacs-anarchic": "61468180f4b307e0fc2fd9edb205fdf6",
    "fedau-adam-stacked": "1d7240fd787c81d697d04f70e0a84722",
    "fedau-adam-vmap": "1d7240fd787c81d697d04f70e0a84722",
    "fedau-resume": "b40421007540bb10b0b1757980f28f11",
    "fedavg-sequential-batchnorm": "c65e07be7fb2ea5e13be8c9041983dd9",
    "fedavg-sgd-stacked": "0f5903856a0b2b61112e86964dff99f2",
    "fedavg-sgd-vmap": "0f5903856a0b2b61112e86964dff99f2",
    "gossip-async-corrected-stacked": "af120abb02f52a0d992c1adbc26f33d0",
    "gossip-async-corrected-vmap": "7ec88de4f92b4d5eaf97c92cb35a6bbf",
    "gossip-async-plain-stacked": "1be890a999a31d61c6aadfe0c473d728",
    "gossip-async-plain-vmap": "1be890a999a31d61c6aadfe0c473d728",
    "gossip-federated-star": "9631d1e68b5c6bf525197902bd53c641",
    "gossip-resume": "a4a732325a422aee9fa7e87924e751c8",
    "gossip-sync-corrected": "8c5d1484eadbbd35f78410d35679f751",
    "gossip-sync-plain": "8f708f5770e3f766eecd535253b30f0b",
    "mifa-momentum-stacked": "9479309455d954c9c3e80d35d50b6d1f",
    "mifa-sgd-vmap-small-chunks": "f1d28f70dab25cbc75d7597c30065b87",
    "sweep-adam": "01b0e0ab7a792370e6684f0c891536b5",
}


def _on_recorded_build() -> bool:
    return (torch.__version__.split("+")[0], platform.machine()) == RECORDED_ON


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_is_bit_identical_to_the_pinned_one(name, tmp_path):
    if not _on_recorded_build():
        pytest.skip(f"pins recorded with torch {RECORDED_ON[0]} on {RECORDED_ON[1]}")
    run = RUNS[name]
    digest = run(tmp_path) if name.endswith("resume") else run()
    assert digest == PINS[name]


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    for name in sorted(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            run = RUNS[name]
            print(f"    {name!r}: {(run(Path(tmp)) if name.endswith('resume') else run())!r},")
