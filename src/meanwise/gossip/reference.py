"""The straightforward gossip implementation: one ``nn.Module`` and one ``torch.optim.SGD`` per
node, messages delivered one at a time into Python lists, merges by ``merge_state_dicts``.

It follows the same protocol schedule (training times and minibatches from
:class:`~meanwise.gossip.protocol.Schedule`) but none of the simulator's machinery: no flat
rows, no slot storage, no waves, no vmap. That makes it the simulator's oracle in the tests
and its per-node-loop baseline in ``benchmarks/gossip_sim.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.engine.local_training import FlatClientData, LocalTraining
from meanwise.gossip.merge import MergeRule, merge_state_dicts
from meanwise.gossip.protocol import GossipProtocol, Schedule
from meanwise.gossip.simulator import check_local_training
from meanwise.gossip.topology import Topology

__all__ = ["PerNodeGossip"]


class PerNodeGossip:
    """Gossip with a Python loop over nodes and messages (see the module docstring).

    ``initial`` is ``[n_nodes, P]`` flat initial models (e.g. the simulator's ``params``) so
    both start identically; the layout is ``model.named_parameters()`` order.
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology,
        train: FlatClientData,
        protocol: GossipProtocol,
        local: LocalTraining,
        merge: MergeRule,
        initial: Tensor,
        *,
        loss_fn: Callable[..., Tensor] = F.cross_entropy,
        seed: int = 0,
    ) -> None:
        check_local_training(local)
        self.schedule = Schedule(protocol, topology, train, local.batch_size, seed)
        self.topology = topology
        self.train = train
        self.merge = merge
        self.loss_fn = loss_fn
        self.local_steps = protocol.local_steps
        self.models: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        options = dict(local.options)
        momentum = options.pop("momentum", 0.9 if local.rule == "momentum" else 0.0)
        for row in initial:
            node = copy.deepcopy(model)
            torch.nn.utils.vector_to_parameters(row.detach().clone(), node.parameters())
            self.models.append(node)
            self.optimizers.append(
                torch.optim.SGD(node.parameters(), lr=local.lr, momentum=momentum, **options)
            )
        self.inboxes: list[list[dict[str, Tensor]]] = [[] for _ in range(topology.n_nodes)]
        self.buffer_sizes = self.schedule.buffer_sizes.tolist()

    def _train(self, node: int, index: Tensor, valid: Tensor) -> None:
        model, optimizer = self.models[node], self.optimizers[node]
        for k in range(index.shape[0]):
            rows = index[k][valid[k]]
            optimizer.zero_grad()
            loss = self.loss_fn(model(self.train.features[rows]), self.train.labels[rows])
            loss.backward()
            optimizer.step()

    def _receive(self, node: int, message: dict[str, Tensor]) -> None:
        inbox = self.inboxes[node]
        inbox.append(message)
        if len(inbox) < self.buffer_sizes[node]:
            return
        own = {k: v.detach() for k, v in self.models[node].named_parameters()}
        merged = merge_state_dicts(
            own,
            inbox,
            self.merge.beta,
            correct_variance=self.merge.correct_variance,
            eps=self.merge.eps,
            include_self_variance=self.merge.include_self_variance,
            rescale_biases=self.merge.rescale_biases,
        )
        with torch.no_grad():
            for name, param in self.models[node].named_parameters():
                param.copy_(merged[name])
        inbox.clear()

    def step(self) -> None:
        plan = self.schedule.next_tick()
        for phase in plan.phases:
            senders = phase.senders.tolist()
            if phase.kind == "train":
                for pos, node in enumerate(senders):
                    self._train(node, phase.index[:, pos], phase.valid[:, pos])
            # every message is the sender's model when the phase's deliveries start
            snapshots = [
                {k: v.detach().clone() for k, v in self.models[s].named_parameters()}
                for s in senders
            ]
            for sender, snapshot in zip(senders, snapshots, strict=True):
                for receiver in self.topology.neighbors[sender]:
                    self._receive(receiver, snapshot)

    def run(self, ticks: int) -> None:
        while self.schedule.tick < ticks:
            self.step()

    def parameters(self) -> Tensor:
        """``[n_nodes, P]``: every node's flat model."""
        return torch.stack(
            [torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in self.models]
        )
