"""The local development control plane (real etcd/apiserver/controller-manager/scheduler + KWOK),
its simulated GPU fleet, test helpers and the local process node. See cluster.py and cli.py."""

from .cluster import Cluster, ClusterOptions
from .fleet import Fleet, NodeGroup, empty_fleet, generate_fleet, load_fleet

__all__ = ["Cluster", "ClusterOptions", "Fleet", "NodeGroup", "empty_fleet", "generate_fleet", "load_fleet"]
