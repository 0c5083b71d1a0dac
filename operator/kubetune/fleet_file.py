"""The fleet file (`kind: Fleet`): groups of identical GPU nodes, rendered as Node manifests.

`kubetune estimate --fleet FILE` sizes a job against the nodes such a file describes; the local
development cluster (kubetune_dev) creates the same nodes as simulated KWOK nodes. The format lives
here, in the product, so the product never needs the development tools to read one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

FLEET_API_VERSION = "kubetune.io/devcluster-v1"
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
class FleetFile:
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
        """The fleet in fleet-file form."""
        groups = []
        for g in self.groups:
            d = {k: v for k, v in g.__dict__.items() if v not in ("", {}, 0) or k == "count"}
            groups.append(d)
        return yaml.safe_dump({"apiVersion": FLEET_API_VERSION, "kind": "Fleet", "groups": groups}, sort_keys=False)


def parse_fleet(doc: Mapping[str, Any]) -> FleetFile:
    """Validate a fleet document (as in devcluster/fleet.yaml)."""
    if not isinstance(doc, Mapping) or doc.get("kind") != "Fleet":
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
    return FleetFile(tuple(groups))


def node_manifest(group: NodeGroup, name: str, *, extra_labels: Mapping[str, str] | None = None,
                  annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One Node as a dict, status included: GPU feature discovery labels and allocatable `nvidia.com/gpu`.

    extra_labels come before the group's own labels (which win); annotations go on the metadata."""
    labels = {
        **dict(extra_labels or {}),
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
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": metadata,
        "spec": {},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def node_manifests(fleet: FleetFile, *, extra_labels: Mapping[str, str] | None = None,
                   annotations: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """All Node dicts of the fleet."""
    return [node_manifest(g, n, extra_labels=extra_labels, annotations=annotations)
            for g in fleet.groups for n in g.node_names()]
