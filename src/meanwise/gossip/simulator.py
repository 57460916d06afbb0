"""The vectorized gossip simulator: every node's model is a row of one tensor.

The :class:`~meanwise.gossip.protocol.Schedule` plans ticks without looking at model values,
so the simulator plans a window of ticks (up to the next evaluation or checkpoint) and runs it
as dependency levels (:mod:`meanwise.gossip.levels`): all trainings of a level as one batched
call, all merges of a level as one batched :func:`~meanwise.gossip.merge.merge_stacked` per
buffer size. Models made of Linear layers and elementwise activations train with batched
matmuls on the flat rows
(:class:`~meanwise.engine.local_training.LocalTrainer`'s ``"stacked"`` execution), others with
``vmap(grad)`` (its ``"vmap"`` execution), both on the nodes' flat rows: vmap's fixed cost
per call dominated the asynchronous protocol's many small levels. With the paper's
asynchronous protocol a tick has only ~5 trainings and ~5 merges among 50 nodes; a level
gathers those of several ticks. Pushed models are kept as snapshots for the window; buffers
carried between windows are stored ragged, one row per slot (node i owns rows
``slot_base[i] .. slot_base[i] + buffer_size[i]``), so a star's centre with 50 slots does not
make every leaf hold 50.

Each node keeps its optimizer state (momentum) across its one-minibatch training events, as a
node running its own ``torch.optim.SGD`` would; merges replace the parameters, not the state.

Evaluation every ``eval_every`` ticks logs the nodes' test accuracy and each parameter
tensor's weight variance (the mean over nodes of the unbiased variance over its elements: the
quantity that vanishes). The engine's :class:`~meanwise.engine.loop.CheckpointedLoop` runs the
ticks; a checkpoint holds everything the next tick depends on, so ``run(..., resume=True)``
continues bit-exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.engine.layout import ParameterLayout, layer_variances
from meanwise.engine.local_training import (
    FlatClientData,
    LocalTrainer,
    LocalTraining,
    data_on,
    stack_blocker,
)
from meanwise.engine.loop import CheckpointedLoop, LoopSettings, evaluate_models
from meanwise.engine.population import Population
from meanwise.gossip.levels import WindowPlan, plan_window
from meanwise.gossip.merge import MergeRule
from meanwise.gossip.protocol import GossipProtocol, Schedule
from meanwise.gossip.topology import Topology

__all__ = ["GossipSimulator", "initial_models", "check_local_training"]

# Rules whose state can persist across training events: the other rules' bias corrections
# need each node's own step count, which one batched call over several nodes cannot give.
_PERSISTENT_RULES = ("sgd", "momentum")

# A window's snapshots (one model per push) are held at once: this bounds their memory.
_WINDOW_BYTES = 64 * 2**20


def _rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for an integer ``index`` of any shape, through index_select (the
    schedule's indices live on the CPU; moving them is a no-op there)."""
    flat = index.reshape(-1).to(table.device)
    return table.index_select(0, flat).view(*index.shape, *table.shape[1:])


def _put(table: Tensor, index: Tensor, rows: Tensor) -> None:
    """``table[index] = rows`` through index_copy_ (``index`` moved to ``table``'s device)."""
    table.index_copy_(0, index.to(table.device), rows)


def check_local_training(local: LocalTraining) -> None:
    if local.rule not in _PERSISTENT_RULES:
        raise ValueError(
            f"local.rule must be one of {_PERSISTENT_RULES} for gossip (node optimizer state "
            f"persists across training events); got {local.rule!r}"
        )
    if local.options.get("dampening", 0.0) != 0.0:
        # zero momentum buffers + step >= 2 equals PyTorch's first step only without dampening
        raise ValueError("local.options['dampening'] must be 0 for gossip training")


def initial_models(
    model: nn.Module, n_nodes: int, layout: ParameterLayout, shared: bool, seed: int
) -> Tensor:
    """``[n_nodes, P]``: ``model``'s own parameters for every node (``shared``), or each node
    re-initialized by its modules' ``reset_parameters`` under its own seed."""
    if shared:
        flat = layout.flatten({k: v.detach() for k, v in model.named_parameters()})
        return flat.expand(n_nodes, -1).clone()
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and not hasattr(
            module, "reset_parameters"
        ):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) has parameters but no "
                "reset_parameters(): independent initialization cannot redraw it"
            )
    seeds = torch.randint(2**62, (n_nodes,), generator=torch.Generator().manual_seed(seed))
    rows = []
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for node_seed in seeds.tolist():
                torch.manual_seed(node_seed)
                for module in model.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                rows.append(layout.flatten({k: v.detach() for k, v in model.named_parameters()}))
    finally:
        model.load_state_dict(saved)
    return torch.stack(rows).clone()


class GossipSimulator(LoopSettings):
    """Simulate gossip learning of ``model`` on ``topology``.

    Args:
        model: the architecture (its buffers are used as they are; parameters only are
            gossiped). With ``protocol.shared_init`` its parameters are every node's start.
        topology: the graph.
        train: one client per training node (node order, idle nodes skipped).
        protocol: the gossip protocol (default: the paper's asynchronous one).
        local: the local training recipe (``steps`` is ignored: ``protocol.local_steps``
            minibatches per training event); rule "sgd" or "momentum".
        merge: the merge rule (default: plain, beta = 0.5).
        test: ``(features, labels)`` for evaluation, or None.
        eval_nodes: the nodes whose accuracy and variance are logged (default: all nodes that
            train; for the FL baseline pass the centre).
        seed: seeds the initialization and the schedule.
        vectorize: how a level's trainings run: ``"auto"`` (batched matmuls through
            :class:`~meanwise.engine.local_training.LocalTrainer` for an
            ``nn.Linear`` or ``nn.Sequential`` of Linear layers and elementwise activations on
            flat features, ``vmap(grad)`` otherwise), ``"stacked"`` (batched matmuls, an error
            for other models) or ``"vmap"`` (always ``vmap(grad)``). Same models up to float
            rounding.
        device, dtype: where and in which floating dtype the nodes' models, optimizer state,
            buffers and data live (the data are copied there once, unless they already are);
            by default those of ``model``'s parameters. The schedule (who trains, merges,
            which minibatches) is drawn on the CPU, so it is the same on every device.
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology,
        train: FlatClientData,
        protocol: GossipProtocol | None = None,
        local: LocalTraining | None = None,
        *,
        merge: MergeRule | None = None,
        test: tuple[Tensor, Tensor] | None = None,
        loss_fn: Callable[..., Tensor] = F.cross_entropy,
        eval_nodes: Sequence[int] | None = None,
        eval_every: int = 10,
        checkpoint_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        seed: int = 0,
        vectorize: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        protocol = GossipProtocol() if protocol is None else protocol
        if vectorize not in ("auto", "stacked", "vmap"):
            raise ValueError(f"vectorize must be 'auto', 'stacked' or 'vmap'; got {vectorize!r}")
        # Linear/activation stacks train with batched matmuls: vmap's fixed cost per call
        # (~8-10 ms for the digits MLP) dominated the async protocol's many small levels
        blocker = stack_blocker(model)
        if blocker is None and train.features.dim() != 2:
            blocker = f"features are {train.features.dim()}-D, not [examples, features]"
        if vectorize == "stacked" and blocker is not None:
            raise ValueError(f"vectorize='stacked' cannot run this model: {blocker}")
        self.stacked = vectorize != "vmap" and blocker is None
        local = LocalTraining(rule="momentum", lr=0.01) if local is None else local
        check_local_training(local)
        self.loop = CheckpointedLoop(
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            checkpoint_path=checkpoint_path,
            log_path=log_path,
        )
        self.model = model
        self.topology = topology
        self.protocol = protocol
        self.local = local
        self.merge = MergeRule() if merge is None else merge
        self.loss_fn = loss_fn
        self.layout = ParameterLayout.of(model)
        if dtype is not None:
            self.layout = self.layout.with_dtype(dtype)
        first = next(model.parameters())
        self.device = first.device if device is None else torch.device(device)
        self.train = data_on(train, self.device, self.layout.dtype)
        self.test = None
        if test is not None:
            features = test[0].to(self.device)
            if features.is_floating_point():
                features = features.to(self.layout.dtype)
            self.test = (features, test[1].to(self.device))
        self.trainer = LocalTrainer(
            model, local, loss_fn, execution="stacked" if self.stacked else "vmap"
        )
        self.schedule = Schedule(protocol, topology, train, local.batch_size, seed)
        n = topology.n_nodes
        if eval_nodes is None:
            eval_nodes = self.schedule.trains.nonzero().flatten().tolist()
        bad = [i for i in eval_nodes if not 0 <= int(i) < n]
        if not eval_nodes or bad:
            raise ValueError(f"eval_nodes must be a non-empty list of node ids < {n}; got {bad}")
        self.eval_nodes = torch.tensor([int(i) for i in eval_nodes], dtype=torch.long)
        self.buffers = {
            k: v.detach().to(self.device, self.layout.dtype if v.is_floating_point() else None)
            for k, v in model.named_buffers()
        }
        self.params = initial_models(model, n, self.layout, protocol.shared_init, seed).to(
            self.device, self.layout.dtype
        )
        # variance of each tensor at initialization, averaged over nodes: the paper's sigma^2
        self.initial_variance = self.layer_variance(self.eval_nodes)
        self.opt_state = [
            torch.zeros_like(self.params) for _ in local.init_state([self.params[:1]])
        ]
        self.storage = self.params.new_zeros(self.schedule.total_slots, self.layout.numel)
        self.storage_variance = self.params.new_zeros(
            self.schedule.total_slots, len(self.layout.names)
        )
        self.trainings = 0
        self.merges = 0

    # -- one tick ----------------------------------------------------------------------------

    @property
    def tick(self) -> int:
        return self.schedule.tick

    def _train(self, nodes: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        """Train ``nodes`` on their minibatches; returns their trained flat models."""
        steps = torch.full((nodes.numel(),), self.protocol.local_steps, dtype=torch.long)
        start = Population(
            self.layout, _rows(self.params, nodes), tuple(_rows(s, nodes) for s in self.opt_state)
        )
        # first_step=2: persistent momentum, never PyTorch's "buffer = grad" first step
        trained = self.trainer.train(
            start, self.train, index, valid, steps, first_step=2, buffers=self.buffers
        )
        flat, state = trained.params, trained.state
        finite = torch.isfinite(flat).all(dim=1)
        if not bool(finite.all()):
            # a non-finite model would spread to every neighbour through the merges: stop
            bad = nodes[~finite.cpu()].tolist()
            raise ValueError(
                f"local training made the models of nodes {bad[:10]} non-finite at tick "
                f"{self.tick} (lr={self.local.lr}); lower the learning rate"
            )
        _put(self.params, nodes, flat)
        for slot, rows in zip(self.opt_state, state, strict=True):
            _put(slot, nodes, rows)
        self.trainings += int(nodes.numel())
        return flat

    def _execute(self, window: WindowPlan) -> None:
        """Run a planned window level by level (see :mod:`meanwise.gossip.levels`).

        Rows move with ``index_select``/``index_copy_``: advanced indexing and index_put cost
        several times more per call on CPU, and a window makes hundreds of these calls.
        """
        params, layout = self.params, self.layout
        correct = self.merge.correct_variance
        snapshots = params.new_empty(window.n_snapshots, layout.numel)
        # each snapshot's layer_variances (for the corrected merge): computed once per pushed
        # model, not once per receiver
        variances = params.new_zeros(window.n_snapshots, len(layout.names)) if correct else None
        if window.storage_rows.numel():
            _put(snapshots, window.from_storage, _rows(self.storage, window.storage_rows))
            if correct:
                stored = _rows(self.storage_variance, window.storage_rows)
                _put(variances, window.from_storage, stored)
        if window.start_nodes.numel():
            start = _rows(params, window.start_nodes)
            _put(snapshots, window.from_start, start)
            if correct:
                _put(variances, window.from_start, layer_variances(start, layout))
        for level in window.levels:
            # a level's events are on distinct nodes and read only lower levels: any order
            if level.trains is not None:
                trains = level.trains
                trained = self._train(trains.nodes, trains.index, trains.valid)
                _put(snapshots, trains.snapshots, trained)
                if correct:
                    _put(variances, trains.snapshots, layer_variances(trained, layout))
            for group in level.merges:
                received_variance = _rows(variances, group.sources) if correct else None
                # gathered as [m, k, P] and viewed as [k, m, P]: the buffer mean contracts the
                # m axis, which then needs no copy to be contiguous
                received = _rows(snapshots, group.sources.t()).transpose(0, 1)
                merged = self.merge(_rows(params, group.nodes), received, layout, received_variance)
                _put(params, group.nodes, merged)
                if group.stored.numel():
                    kept = _rows(merged, group.stored)
                    _put(snapshots, group.stored_as, kept)
                    if correct:
                        _put(variances, group.stored_as, layer_variances(kept, layout))
        if window.slot_rows.numel():
            _put(self.storage, window.slot_rows, _rows(snapshots, window.slot_last))
            if correct:
                last = _rows(variances, window.slot_last)
                _put(self.storage_variance, window.slot_rows, last)
        self.merges += window.merges

    def _advance(self, until: int) -> None:
        """Run ticks up to ``until`` as one window (fewer if its snapshots would exceed
        ``_WINDOW_BYTES``; the cut depends only on the schedule, so a resume cuts alike)."""
        budget = max(1, _WINDOW_BYTES // (self.layout.numel * self.params.element_size()))
        plans, snapshots = [], 0
        while self.tick < until and snapshots < budget:
            plan = self.schedule.next_tick()
            plans.append(plan)
            # a tick's pushes bound its snapshots (plus buffered ones, at most the slots)
            snapshots += sum(int(phase.senders.numel()) for phase in plan.phases)
        sizes = self.schedule.buffer_sizes
        self._execute(plan_window(plans, self.topology.n_nodes, self.schedule.slot_base, sizes))

    def step(self) -> None:
        """Run one tick."""
        self._advance(self.tick + 1)

    # -- evaluation --------------------------------------------------------------------------

    def node_parameters(self, node: int) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.layout.unflatten(self.params[node]).items()}

    def layer_variance(self, nodes: Tensor | None = None) -> dict[str, float]:
        """Per parameter tensor: the mean over ``nodes`` of its unbiased element variance."""
        rows = self.params if nodes is None else self.params[nodes]
        # per node, in float64; each tensor's column averaged contiguously, as it always was
        per_node = layer_variances(rows.double(), self.layout).t().contiguous()
        return {
            name: float(column.mean())
            for name, column in zip(self.layout.names, per_node, strict=True)
        }

    def evaluate(self) -> dict[str, Any]:
        record: dict[str, Any] = {"layer_variance": self.layer_variance(self.eval_nodes)}
        if self.test is None:
            return record
        losses, accuracy = evaluate_models(
            self.model, self.params[self.eval_nodes], self.layout, self.buffers, self.test,
            self.loss_fn, vectorized=True,
        )  # fmt: skip
        record.update(
            mean_accuracy=float(accuracy.mean()),
            min_accuracy=float(accuracy.min()),
            max_accuracy=float(accuracy.max()),
            test_loss=float(losses.double().mean()),
        )
        return record

    # -- checkpoints, logging, the loop --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.state_dict(),
            "params": self.params.clone(),
            "opt_state": [s.clone() for s in self.opt_state],
            "storage": self.storage.clone(),
            "storage_variance": self.storage_variance.clone(),
            "trainings": self.trainings,
            "merges": self.merges,
            "metrics": list(self.loop.metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["params"].shape) != tuple(self.params.shape):
            raise ValueError(
                f"checkpoint holds models {list(state['params'].shape)}; this simulation has "
                f"{list(self.params.shape)} (nodes, parameters)"
            )
        if tuple(state["storage"].shape) != tuple(self.storage.shape):
            raise ValueError("checkpoint buffer storage does not match this protocol's buffers")
        self.schedule.load_state_dict(state["schedule"])
        self.params = state["params"].clone()
        self.opt_state = [s.clone() for s in state["opt_state"]]
        self.storage = state["storage"].clone()
        self.storage_variance = state["storage_variance"].clone()
        self.trainings = int(state["trainings"])
        self.merges = int(state["merges"])
        self.loop.metrics = list(state["metrics"])

    # -- the loop's protocol (meanwise.engine.loop.Checkpointable) ---------------------------

    @property
    def position(self) -> int:
        return self.tick

    def advance(self, until: int) -> dict[str, Any]:
        """Run the ticks up to ``until`` as one window of levels (fewer if its snapshots would
        not fit in memory: the loop then calls again)."""
        self._advance(until)
        return {}

    def record(self, info: dict[str, Any]) -> dict[str, Any]:
        counts = {"tick": self.tick, "trainings": self.trainings, "merges": self.merges}
        return counts | info | self.evaluate()

    def run(
        self, num_ticks: int | None = None, *, resume: bool = False, ticks: int | None = None
    ) -> list[dict[str, Any]]:
        """Simulate until ``num_ticks`` ticks in total have run; returns the logged metrics
        (an evaluation at tick 0, every ``eval_every`` ticks and at the end).

        With ``resume=True`` and an existing checkpoint, continue from it (bit-exactly).
        ``ticks=`` is the deprecated spelling of ``num_ticks=``.
        """
        if ticks is not None:
            if num_ticks is not None:
                raise TypeError("pass num_ticks only (ticks= is its deprecated spelling)")
            warnings.warn(
                "run(ticks=...) is deprecated; use run(num_ticks=...)",
                DeprecationWarning,
                stacklevel=2,
            )
            num_ticks = ticks
        if num_ticks is None:
            raise TypeError("run() needs num_ticks")
        if resume:
            self.loop.resume(self.load_state_dict)
        if self.tick == 0 and not self.metrics:
            self.loop.log(self.record({}))
        return self.loop.run(self, num_ticks)
