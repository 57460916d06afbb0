"""Decentralized gossip learning: topologies and merge rules (variance-corrected averaging)."""

from meanwise.engine.layout import ParameterLayout
from meanwise.gossip.merge import (
    MergeRule,
    corrected_merge,
    merge_stacked,
    merge_state_dicts,
    plain_merge,
)
from meanwise.gossip.protocol import GossipProtocol, Schedule
from meanwise.gossip.simulator import GossipSimulator
from meanwise.gossip.topology import (
    Topology,
    erdos_renyi,
    from_networkx,
    fully_connected,
    random_regular,
    ring,
    star,
    torus,
)

__all__ = [
    "GossipProtocol",
    "GossipSimulator",
    "MergeRule",
    "ParameterLayout",
    "Schedule",
    "merge_stacked",
    "Topology",
    "corrected_merge",
    "erdos_renyi",
    "from_networkx",
    "fully_connected",
    "merge_state_dicts",
    "plain_merge",
    "random_regular",
    "ring",
    "star",
    "torus",
]
