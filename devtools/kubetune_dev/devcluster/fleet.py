"""The simulated GPU fleet: node groups from `devcluster/fleet.yaml` rendered as KWOK Node objects.

The file format (NodeGroup, parse_fleet) is the product's, `kubetune.fleet_file`. `load_fleet(path)`
reads a fleet file, `generate_fleet(n)` makes an n-node fleet that cycles through the default groups
(for benchmarks), `node_manifests(fleet)` renders Node dicts whose
`status.capacity/allocatable` carry `nvidia.com/gpu` and whose labels carry the GPU feature
discovery keys. KWOK manages exactly the nodes labelled `type=kwok` (KWOK_NODE_SELECTOR).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kubetune import fleet_file
from kubetune.fleet_file import GPU_RESOURCE, NodeGroup, parse_fleet

# The fleet file format is the product's (`kubetune estimate --fleet` reads it); here it is a fleet of KWOK nodes.
Fleet = fleet_file.FleetFile

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_FLEET_FILE = REPO_ROOT / "devcluster" / "fleet.yaml"
KWOK_NODE_LABEL = ("type", "kwok")
KWOK_NODE_SELECTOR = f"{KWOK_NODE_LABEL[0]}={KWOK_NODE_LABEL[1]}"
KWOK_ANNOTATIONS = {"kwok.x-k8s.io/node": "fake"}

__all__ = ["DEFAULT_FLEET_FILE", "GPU_RESOURCE", "KWOK_NODE_LABEL", "KWOK_NODE_SELECTOR", "Fleet", "NodeGroup",
           "empty_fleet", "generate_fleet", "load_fleet", "node_manifest", "node_manifests", "parse_fleet"]


def load_fleet(path: str | Path = DEFAULT_FLEET_FILE) -> Fleet:
    """Read and validate a fleet file."""
    return parse_fleet(yaml.safe_load(Path(path).read_text()))


def empty_fleet() -> Fleet:
    """No KWOK nodes (e.g. a demo that only uses process nodes)."""
    return Fleet(())


def generate_fleet(nodes: int, template: Fleet | None = None) -> Fleet:
    """An n-node fleet cycling through the template's groups (default: devcluster/fleet.yaml)."""
    base = template or load_fleet()
    if not base.groups:
        raise ValueError("template fleet has no groups")
    counts = {g.namePrefix: 0 for g in base.groups}
    for g in itertools.islice(itertools.cycle(base.groups), nodes):
        counts[g.namePrefix] += 1
    return Fleet(tuple(replace(g, count=counts[g.namePrefix]) for g in base.groups if counts[g.namePrefix]))


def node_manifest(group: NodeGroup, name: str) -> dict[str, Any]:
    """One KWOK Node as a dict, status included (the apiserver keeps a Node's status on create)."""
    return fleet_file.node_manifest(group, name, extra_labels=dict([KWOK_NODE_LABEL]), annotations=KWOK_ANNOTATIONS)


def node_manifests(fleet: Fleet) -> list[dict[str, Any]]:
    """All KWOK Node dicts of the fleet."""
    return fleet_file.node_manifests(fleet, extra_labels=dict([KWOK_NODE_LABEL]), annotations=KWOK_ANNOTATIONS)
