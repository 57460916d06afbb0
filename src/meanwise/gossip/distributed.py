"""Gossip learning on ``torch.distributed`` (gloo): one process per node.

Each process holds one node's model as a flat vector and exchanges it point-to-point
(``isend``/``irecv``) with its neighbours in the topology. Every process runs the same
:class:`~meanwise.gossip.protocol.Schedule` (seeded, model-independent), so all of them know
without asking who trains, who sends and which message fills which buffer slot in every tick:
a process posts receives exactly for the messages addressed to it, and the run produces the
same models as :class:`~meanwise.gossip.simulator.GossipSimulator` with the same config.

``launch_local`` starts the processes on one machine (loopback); on several machines run
``meanwise gossip run`` once per node with the usual ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK`` and ``WORLD_SIZE`` environment (``WORLD_SIZE`` = the number of nodes).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from meanwise.atomic_io import atomic_torch_save
from meanwise.engine.layout import ParameterLayout, layer_variances
from meanwise.engine.local_training import LocalTraining, train_vectorized_stateful
from meanwise.gossip.merge import MergeRule
from meanwise.gossip.protocol import GossipProtocol, Schedule
from meanwise.gossip.simulator import GossipSimulator, initial_models
from meanwise.gossip.task import MODELS, SPLITS, digits_model, digits_nodes
from meanwise.gossip.topology import (
    Topology,
    erdos_renyi,
    fully_connected,
    random_regular,
    ring,
    torus,
)

__all__ = [
    "GossipRunConfig",
    "TOPOLOGIES",
    "build",
    "simulate",
    "run_node",
    "launch_local",
    "free_port",
    "measure_exchange",
]

TOPOLOGIES = ("regular", "ring", "torus", "complete", "erdos-renyi")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GossipRunConfig:
    """Everything a gossip run depends on; every process builds the same run from it."""

    nodes: int = 8
    topology: str = "regular"
    degree: int = 4
    edge_probability: float = 0.5
    ticks: int = 200
    synchronous: bool = False
    correct_variance: bool = True
    beta: float = 0.5
    model: str = "mlp"
    hidden: int = 32
    split: str = "iid"
    alpha: float = 0.5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16
    shared_init: bool = False
    seed: int = 0
    dtype: str = "float32"
    eval_every: int = 50
    # Longest wait for a neighbour's message (and for the process group to form): a frozen
    # peer otherwise blocks its neighbours forever. Exchanges take milliseconds and a node's
    # training between two of its messages well under a second here.
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes < 2:
            raise ValueError(f"nodes must be an int >= 2; got {self.nodes!r}")
        for name, value, known in (
            ("topology", self.topology, TOPOLOGIES),
            ("model", self.model, MODELS),
            ("split", self.split, SPLITS),
            ("dtype", self.dtype, tuple(_DTYPES)),
        ):
            if value not in known:
                raise ValueError(f"{name} must be one of {known}; got {value!r}")
        if not isinstance(self.ticks, int) or self.ticks < 1:
            raise ValueError(f"ticks must be an int >= 1; got {self.ticks!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be an int >= 1; got {self.eval_every!r}")
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s < float("inf")):
            raise ValueError(f"timeout_s must be a positive number; got {self.timeout_s!r}")

    def build_topology(self) -> Topology:
        if self.topology == "regular":
            return random_regular(self.nodes, self.degree, seed=self.seed)
        if self.topology == "ring":
            return ring(self.nodes)
        if self.topology == "torus":
            rows = int(round(self.nodes**0.5))
            if rows * rows != self.nodes:
                raise ValueError(
                    f"topology 'torus' needs a square number of nodes; got {self.nodes}"
                )
            return torus(rows, rows)
        if self.topology == "complete":
            return fully_connected(self.nodes)
        return erdos_renyi(self.nodes, self.edge_probability, seed=self.seed)


@dataclass
class _Run:
    model: nn.Module
    topology: Topology
    train: Any
    test: tuple[Tensor, Tensor]
    protocol: GossipProtocol
    local: LocalTraining
    merge: MergeRule


def build(config: GossipRunConfig) -> _Run:
    """The model, graph, data, protocol, local training and merge rule of ``config``."""
    dtype = _DTYPES[config.dtype]
    train, test = digits_nodes(
        config.nodes, config.split, config.alpha, config.seed, config.model == "mlp", dtype
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = digits_model(config.model, config.hidden).to(dtype)
    protocol = (
        GossipProtocol.synchronous(shared_init=config.shared_init)
        if config.synchronous
        else GossipProtocol(shared_init=config.shared_init)
    )
    local = LocalTraining(
        rule="momentum",
        lr=config.lr,
        batch_size=config.batch_size,
        options={"momentum": config.momentum, "weight_decay": config.weight_decay},
    )
    merge = MergeRule(beta=config.beta, correct_variance=config.correct_variance)
    return _Run(model, config.build_topology(), train, test, protocol, local, merge)


def simulate(config: GossipRunConfig) -> GossipSimulator:
    """The same run in the vectorized simulator (run to ``config.ticks``)."""
    b = build(config)
    sim = GossipSimulator(
        b.model,
        b.topology,
        b.train,
        b.protocol,
        b.local,
        merge=b.merge,
        test=b.test,
        eval_every=config.eval_every,
        seed=config.seed,
    )
    sim.run(config.ticks)
    return sim


@dataclass
class NodeStats:
    messages_sent: int = 0
    messages_received: int = 0
    merges: int = 0
    trainings: int = 0
    exchange_seconds: float = 0.0  # time from posting a phase's messages to their completion
    seconds: float = 0.0


def run_node(
    config: GossipRunConfig, rank: int, world_size: int, log=print
) -> tuple[Tensor, NodeStats]:
    """One node's gossip in an initialized (gloo) process group; returns its final flat model
    ``[P]`` and its counters. Collective calls (evaluation) happen at the same ticks on all
    ranks, so every rank must run this with the same config."""
    if world_size != config.nodes:
        raise ValueError(f"one process per node: world size {world_size} != nodes {config.nodes}")
    start = time.perf_counter()
    b = build(config)
    layout = ParameterLayout.of(b.model)
    schedule = Schedule(b.protocol, b.topology, b.train, b.local.batch_size, config.seed)
    # every rank draws all initial models (cheap) so node i's equals the simulator's row i
    params = initial_models(b.model, config.nodes, layout, b.protocol.shared_init, config.seed)
    params = params[rank : rank + 1].clone()
    opt_state = [torch.zeros_like(params) for _ in b.local.init_state([params])]
    size = int(schedule.buffer_sizes[rank])
    storage = params.new_zeros(size, layout.numel)
    storage_variance = params.new_zeros(size, len(layout.names))
    neighbours = b.topology.neighbors[rank]
    buffers = {k: v.detach() for k, v in b.model.named_buffers()}
    stats = NodeStats()

    def train(index: Tensor, valid: Tensor) -> None:
        nonlocal params, opt_state
        state = [list(layout.unflatten(s).values()) for s in opt_state]
        steps = torch.full((1,), b.protocol.local_steps, dtype=torch.long)
        trained, state = train_vectorized_stateful(
            b.model,
            layout.unflatten(params),
            state,
            b.train,
            index,
            valid,
            steps,
            b.local,
            torch.nn.functional.cross_entropy,
            first_step=2,
        )
        params = layout.flatten(trained, batch_dims=1)
        if not bool(torch.isfinite(params).all()):
            # sent on, a non-finite model would poison every neighbour through the merges
            raise ValueError(
                f"local training made node {rank}'s model non-finite at tick {schedule.tick} "
                f"(lr={b.local.lr}); lower the learning rate"
            )
        opt_state = [
            layout.flatten(dict(zip(layout.names, s, strict=True)), batch_dims=1) for s in state
        ]
        stats.trainings += 1

    @torch.no_grad()
    def accuracy() -> float:
        x, y = b.test
        out = functional_call(b.model, {**layout.unflatten(params[0]), **buffers}, (x,))
        total = torch.tensor([float((out.argmax(-1) == y).double().mean())], dtype=torch.float64)
        with progress.naming_laggards(f"the evaluation at tick {schedule.tick}"):
            dist.all_reduce(total, async_op=True).wait(timedelta(seconds=config.timeout_s))
        return float(total) / world_size

    progress = _Progress(rank, world_size, config.timeout_s)
    while schedule.tick < config.ticks:
        progress.mark(schedule.tick)
        plan = schedule.next_tick()
        for number, phase in enumerate(plan.phases):
            senders = phase.senders.tolist()
            sending = rank in senders
            if phase.kind == "train" and sending:
                pos = senders.index(rank)
                train(phase.index[:, pos : pos + 1], phase.valid[:, pos : pos + 1])
            tag = 2 * plan.tick + number  # one message per (sender, receiver) per phase
            begin = time.perf_counter()
            requests = []  # (request, peer)
            sent = params[0].clone()
            if sending:
                requests += [(dist.isend(sent, dst=nb, tag=tag), nb) for nb in neighbours]
                stats.messages_sent += len(neighbours)
            inbox = []  # (wave, slot, tensor)
            for w, wave in enumerate(phase.waves):
                mine = (wave.receivers == rank).nonzero().flatten().tolist()
                for j in mine:
                    source = senders[int(wave.sender_pos[j])]
                    tensor = torch.empty_like(sent)
                    requests.append((dist.irecv(tensor, src=source, tag=tag), source))
                    inbox.append((w, int(wave.slots[j]), tensor))
            _wait_all(requests, rank, plan.tick, config.timeout_s)
            stats.exchange_seconds += time.perf_counter() - begin
            stats.messages_received += len(inbox)
            for w, wave in enumerate(phase.waves):
                for wave_index, slot, tensor in inbox:
                    if wave_index == w:
                        storage[slot] = tensor
                        storage_variance[slot] = layer_variances(tensor, layout)
                if bool((wave.mergers == rank).any()):
                    params = b.merge(params, storage[None], layout, storage_variance[None])
                    stats.merges += 1
        t = schedule.tick
        if t % config.eval_every == 0 or t == config.ticks:
            acc = accuracy()
            if rank == 0:
                log(f"tick {t}: mean test accuracy {100 * acc:.1f}%")
    stats.seconds = time.perf_counter() - start
    return params[0], stats


def _wait_all(requests: list, rank: int, tick: int, timeout_s: float) -> None:
    """Wait for each point-to-point request, naming the peer that stays silent too long."""
    limit = timedelta(seconds=timeout_s)
    for request, peer in requests:
        try:
            finished = request.wait(limit)
        except RuntimeError as error:
            raise PeerTimeoutError(
                f"rank {rank}: no exchange with rank {peer} within {timeout_s:g} s at tick "
                f"{tick} (stopped, hung or gone?): {str(error).splitlines()[0]}"
            ) from None
        if finished is False:
            raise PeerTimeoutError(
                f"rank {rank}: no exchange with rank {peer} within {timeout_s:g} s at tick {tick}"
                " (stopped, hung or gone?)"
            )


class PeerTimeoutError(TimeoutError):
    """A neighbour did not send or receive within the run's timeout."""


class _Progress:
    """Each rank's current tick in the process group's key-value store, so that a rank whose
    collective timed out can name the ranks furthest behind (the silent ones)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        try:  # the store env:// or init_process_group made; private, so optional
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - without a store the message names no rank
            self.store = None

    def _key(self, rank: int) -> str:
        return f"meanwise-gossip-progress-{rank}"

    def mark(self, tick: int) -> None:
        if self.store is not None:
            self.store.set(self._key(self.rank), str(tick))

    def laggards(self) -> list[int]:
        if self.store is None:
            return []
        ticks = {}
        for r in range(self.world_size):
            try:
                if self.store.check([self._key(r)]):
                    ticks[r] = int(self.store.get(self._key(r)))
                else:
                    ticks[r] = -1
            except Exception:  # noqa: BLE001 - the store itself may be gone with rank 0
                return []
        lowest = min(ticks.values())
        return [r for r, t in ticks.items() if t == lowest and r != self.rank]

    @contextlib.contextmanager
    def naming_laggards(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as error:
            behind = self.laggards()
            if not behind:
                named = "no rank could be named"
            elif len(behind) == 1:
                named = f"rank {behind[0]} is furthest behind"
            else:
                named = f"ranks {behind} are furthest behind"
            raise PeerTimeoutError(
                f"rank {self.rank}: {what} did not complete within {self.timeout_s:g} s; "
                f"{named} (stopped, hung or gone?): {str(error).splitlines()[0][:200]}"
            ) from None


def init_group(rank: int | None, world_size: int | None, timeout_s: float) -> None:
    """gloo process group with the run's timeout (env:// when rank/world_size are None)."""
    timeout = timedelta(seconds=timeout_s)
    if rank is None:
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read what the OS gave)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, config: GossipRunConfig, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # one process per node: more threads per process only contend
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_group(rank, world_size, config.timeout_s)
    try:
        gather_and_save(config, rank, world_size, out)
    finally:
        dist.destroy_process_group()


def gather_and_save(
    config: GossipRunConfig, rank: int, world_size: int, out: str | None, log=print
) -> dict[str, Any] | None:
    """Run this rank's node, then gather every node's model and counters on rank 0. Rank 0
    returns ``{"params": [n, P], "stats": [...], "config": {...}}`` (saved to ``out`` with
    ``torch.save`` if given); the other ranks return None."""
    params, stats = run_node(config, rank, world_size, log=log)
    progress = _Progress(rank, world_size, config.timeout_s)
    progress.mark(config.ticks + 1)  # finished: never among the laggards
    limit = timedelta(seconds=config.timeout_s)
    gathered = [torch.empty_like(params) for _ in range(world_size)] if rank == 0 else None
    names = list(asdict(stats))
    counters = torch.tensor([float(v) for v in asdict(stats).values()], dtype=torch.float64)
    all_counters = [torch.empty_like(counters) for _ in range(world_size)] if rank == 0 else None
    with progress.naming_laggards("gathering the final models"):
        dist.gather(params, gathered, dst=0, async_op=True).wait(limit)
        dist.gather(counters, all_counters, dst=0, async_op=True).wait(limit)
    if rank != 0:
        return None
    result = {
        "params": torch.stack(gathered),
        "stats": [dict(zip(names, c.tolist(), strict=True)) for c in all_counters],
        "config": asdict(config),
    }
    if out is not None:
        atomic_torch_save(result, out)
    return result


def launch_local(
    config: GossipRunConfig,
    port: int | None = None,
    out: str | os.PathLike | None = None,
    start_method: str = "spawn",
) -> dict[str, Any]:
    """Run ``config.nodes`` processes on this machine (loopback) and return rank 0's result:
    ``{"params": [n, P], "stats": [per-node counters], "config": ...}``.

    ``start_method``: "spawn" (default: fresh interpreters, safe whatever the caller did) or
    "fork" (children inherit the caller's imported modules and caches, which saves seconds per
    process; only safe if the caller has not started threads, e.g. with one torch thread).
    """
    import torch.multiprocessing as mp

    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(
            f"start_method must be 'spawn', 'fork' or 'forkserver'; got {start_method!r}"
        )

    port = free_port() if port is None else _valid_port(port)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.pt") if out is None else str(out)
        try:
            mp.start_processes(
                _worker,
                args=(config, config.nodes, port, path),
                nprocs=config.nodes,
                join=True,
                start_method=start_method,
            )
        except mp.ProcessExitedException as error:
            signal_name = getattr(error, "signal_name", None)
            how = f"was killed by {signal_name}" if signal_name else f"exited ({error.exit_code})"
            raise RuntimeError(f"gossip node (rank) {error.error_index} {how}") from None
        except mp.ProcessRaisedException as error:
            last = [line for line in str(error).strip().splitlines() if line.strip()]
            raise RuntimeError(
                f"gossip node (rank) {error.error_index} failed: {last[-1] if last else error}"
            ) from None
        return torch.load(path, weights_only=True)


def _valid_port(port: int) -> int:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in [1, 65535]; got {port!r}")
    return port


def _exchange_worker(
    rank: int, world_size: int, port: int, degree: int, numel: int, rounds: int, out: str
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        neighbours = random_regular(world_size, degree, seed=0).neighbors[rank]
        model = torch.randn(numel)
        inbox = [torch.empty(numel) for _ in neighbours]

        def exchange(tag: int) -> None:
            requests = [dist.isend(model, dst=nb, tag=tag) for nb in neighbours]
            requests += [
                dist.irecv(box, src=nb, tag=tag) for nb, box in zip(neighbours, inbox, strict=True)
            ]
            for request in requests:
                request.wait()

        exchange(0)  # warm-up: connections are set up lazily
        dist.barrier()
        start = time.perf_counter()
        for r in range(rounds):
            exchange(r + 1)
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            atomic_torch_save({"seconds": seconds}, out)
    finally:
        dist.destroy_process_group()


def measure_exchange(
    nodes: int = 8,
    degree: int = 4,
    numel: int = 10_000,
    rounds: int = 50,
    start_method: str = "spawn",
) -> dict[str, float]:
    """Throughput of the runner's exchange step on loopback: ``nodes`` processes on a random
    ``degree``-regular graph, each round every process sends its flat model (``numel``
    float32) to all neighbours and receives theirs, as ``run_node`` does. Returns the models
    delivered per second (all processes together) and the seconds per round."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "exchange.pt")
        mp.start_processes(
            _exchange_worker,
            args=(nodes, port, degree, numel, rounds, path),
            nprocs=nodes,
            join=True,
            start_method=start_method,
        )
        seconds = float(torch.load(path, weights_only=True)["seconds"])
    delivered = nodes * degree * rounds
    return {
        "models_per_s": delivered / seconds,
        "megabytes_per_s": delivered * numel * 4 / seconds / 1e6,
        "seconds_per_round": seconds / rounds,
    }
