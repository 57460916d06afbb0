"""Decentralized gossip learning: topologies and merge rules (variance-corrected averaging)."""

from meanwise.gossip.merge import corrected_merge, merge_state_dicts, plain_merge
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
