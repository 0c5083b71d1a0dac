"""The simulated GPU fleet: node groups from `devcluster/fleet.yaml` rendered as KWOK Node objects.

`load_fleet(path)` reads a fleet file, `generate_fleet(n)` makes an n-node fleet that cycles
through the default groups (for benchmarks), `node_manifests(fleet)` renders Node dicts whose
`status.capacity/allocatable` carry `nvidia.com/gpu` and whose labels carry the GPU feature
discovery keys. KWOK manages exactly the nodes labelled `type=kwok` (KWOK_NODE_SELECTOR).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_FLEET_FILE = REPO_ROOT / "devcluster" / "fleet.yaml"
KWOK_NODE_LABEL = ("type", "kwok")
KWOK_NODE_SELECTOR = f"{KWOK_NODE_LABEL[0]}={KWOK_NODE_LABEL[1]}"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class NodeGroup:
    """count identical nodes."""

    namePrefix: str
    count: int
    gpuProduct: str = ""
    gpuMemoryMiB: int = 0
    gpusPerNode: int = 0
    gpuFamily: str = ""
    instanceType: str = ""
    cpu: str = "32"
    memory: str = "128Gi"
    ephemeralStorage: str = "1Ti"
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)

    def node_names(self) -> list[str]:
        """Names of this group's nodes."""
        return [f"{self.namePrefix}-{i}" for i in range(self.count)]


@dataclass(frozen=True)
class Fleet:
    """A list of node groups."""

    groups: tuple[NodeGroup, ...]

    @property
    def node_names(self) -> list[str]:
        """All node names, in group order."""
        return [n for g in self.groups for n in g.node_names()]

    @property
    def total_gpus(self) -> int:
        """Sum of nvidia.com/gpu over all nodes."""
        return sum(g.count * g.gpusPerNode for g in self.groups)

    def to_yaml(self) -> str:
        """The fleet in fleet.yaml form."""
        groups = []
        for g in self.groups:
            d = {k: v for k, v in g.__dict__.items() if v not in ("", {}, 0) or k == "count"}
            groups.append(d)
        return yaml.safe_dump({"apiVersion": "kubetune.io/devcluster-v1", "kind": "Fleet", "groups": groups},
                              sort_keys=False)


def parse_fleet(doc: dict[str, Any]) -> Fleet:
    """Validate a fleet document (as in devcluster/fleet.yaml)."""
    if not isinstance(doc, dict) or doc.get("kind") != "Fleet":
        raise ValueError("fleet file must be a mapping with kind: Fleet")
    known = set(NodeGroup.__dataclass_fields__)
    groups = []
    for i, raw in enumerate(doc.get("groups") or []):
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"fleet group {i}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        if "namePrefix" not in raw or "count" not in raw:
            raise ValueError(f"fleet group {i}: namePrefix and count are required")
        groups.append(NodeGroup(**raw))
    names = [n for g in groups for n in g.node_names()]
    if len(names) != len(set(names)):
        raise ValueError("fleet groups produce duplicate node names")
    return Fleet(tuple(groups))


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
    labels = {
        KWOK_NODE_LABEL[0]: KWOK_NODE_LABEL[1],
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubetune.io/node-group": group.namePrefix,
    }
    if group.instanceType:
        labels["node.kubernetes.io/instance-type"] = group.instanceType
    resources = {"cpu": group.cpu, "memory": group.memory, "ephemeral-storage": group.ephemeralStorage,
                 "pods": str(group.pods)}
    if group.gpusPerNode:
        labels.update({
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": group.gpuProduct,
            "nvidia.com/gpu.memory": str(group.gpuMemoryMiB),
            "nvidia.com/gpu.count": str(group.gpusPerNode),
        })
        if group.gpuFamily:
            labels["nvidia.com/gpu.family"] = group.gpuFamily
        resources[GPU_RESOURCE] = str(group.gpusPerNode)
    labels.update(group.labels)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
        "spec": {},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def node_manifests(fleet: Fleet) -> list[dict[str, Any]]:
    """All Node dicts of the fleet."""
    return [node_manifest(g, n) for g in fleet.groups for n in g.node_names()]
