"""The local development control plane (real etcd/apiserver/controller-manager/scheduler + KWOK),
its simulated GPU fleet and the local process node. See cluster.py and cli.py (`kubetune-dev cluster`);
the pytest fixtures that start it are in tests/support/cluster_fixtures.py."""

from .cluster import Cluster, ClusterOptions
from .fleet import Fleet, NodeGroup, empty_fleet, generate_fleet, load_fleet

__all__ = ["Cluster", "ClusterOptions", "Fleet", "NodeGroup", "empty_fleet", "generate_fleet", "load_fleet"]
