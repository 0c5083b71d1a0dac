"""The cluster's GPU fleet: Node objects (k8s JSON) grouped into pools of identical GPUs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import yaml

GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by NVIDIA GPU feature discovery
COUNT_LABEL = "nvidia.com/gpu.count"
MiB = 1024**2

# Memory (MiB, as GPU feature discovery reports it) for products whose nodes lack the memory label.
KNOWN_GPU_MEMORY_MIB = {
    "H200": 143771, "H100-80GB": 81559, "H100-NVL": 95830, "H100-PCIE": 81559, "H100": 81559,
    "A100-SXM4-80GB": 81920, "A100-PCIE-80GB": 81920, "A100-80GB": 81920,
    "A100-SXM4-40GB": 40960, "A100-PCIE-40GB": 40960, "A100-40GB": 40960,
    "L40S": 46068, "L40": 46068, "A6000": 49140, "A40": 46068, "L4": 23034, "A10G": 23028, "A10": 23028,
    "T4": 15360, "V100-SXM2-32GB": 32768, "V100-32GB": 32768, "V100": 16384,
}
NO_BF16 = ("T4", "V100", "P100", "P4", "K80")


@dataclass
class GpuPool:
    """Nodes that carry the same GPU product and memory."""

    product: str
    memory_mib: int
    node_gpus: dict[str, int] = field(default_factory=dict)  # node name -> allocatable GPUs
    node_memory: dict[str, int] = field(default_factory=dict)  # node name -> allocatable host RAM bytes (0 unknown)
    node_used: dict[str, int] = field(default_factory=dict)  # node name -> GPUs requested by pods bound there
    pending: int = 0  # GPUs requested by pods not yet bound that select this product (queued demand)
    avoid: bool = False  # set for a re-size: pods for this product stayed unschedulable

    def free_on(self, node: str) -> int:
        """GPUs of one node no pod has requested yet."""
        return max(0, self.node_gpus.get(node, 0) - self.node_used.get(node, 0))

    @property
    def free_gpus(self) -> int:
        """GPUs of the pool no bound pod has requested, less the queued demand for this product."""
        return max(0, sum(self.free_on(n) for n in self.node_gpus) - self.pending)

    def placeable_now(self, gpus: int, pods: int) -> bool:
        """Whether `pods` pods of `gpus` GPUs each fit in the free GPUs now (one pod per node)."""
        if self.avoid:
            return False
        nodes = sum(1 for n in self.node_gpus if self.free_on(n) >= gpus)
        return nodes >= pods and self.free_gpus >= gpus * pods

    def describe_free(self) -> str:
        """e.g. 'NVIDIA-L4: 0 of 8 GPUs free, 4 queued'."""
        queued = f", {self.pending} requested by pods waiting for it" if self.pending else ""
        return f"{self.product}: {self.free_gpus} of {self.total_gpus} GPUs free{queued}"

    @property
    def host_memory_bytes(self) -> int:
        """Smallest allocatable host RAM of the pool's nodes (0 when unknown): bounds CPU offload."""
        known = [m for m in self.node_memory.values() if m > 0]
        return min(known) if known else 0

    @property
    def memory_bytes(self) -> int:
        """Memory of one GPU in bytes."""
        return self.memory_mib * MiB

    @property
    def gpus_per_node(self) -> int:
        """Largest number of GPUs allocatable on one node of this pool."""
        return max(self.node_gpus.values(), default=0)

    @property
    def total_gpus(self) -> int:
        """All allocatable GPUs of this pool."""
        return sum(self.node_gpus.values())

    def nodes_with(self, gpus: int) -> int:
        """How many pods of `gpus` GPUs each can be placed (one pod per node)."""
        return sum(1 for n in self.node_gpus.values() if n >= gpus)

    @property
    def bf16(self) -> bool:
        """Whether the GPU supports bf16 (Ampere and newer)."""
        return not any(tag in self.product.upper() for tag in NO_BF16)

    def describe(self) -> str:
        """e.g. 'NVIDIA-L4 (22.5 GiB, 4 nodes x 1 GPU)'."""
        return (f"{self.product} ({self.memory_mib / 1024:.1f} GiB, {len(self.node_gpus)} node(s) "
                f"x up to {self.gpus_per_node} GPU(s))")


@dataclass
class Fleet:
    """GPU pools of a cluster, smallest GPU memory first."""

    pools: list[GpuPool] = field(default_factory=list)
    cpu_nodes: int = 0
    skipped: list[str] = field(default_factory=list)  # why some GPU nodes were ignored
    occupancy_known: bool = False  # set by with_occupancy(): the pools' free GPUs are known
    counted_jobs: set[str] = field(default_factory=set)  # UIDs of the Jobs whose GPUs the occupancy counts

    @property
    def has_gpus(self) -> bool:
        """True when at least one schedulable node has an allocatable GPU."""
        return any(p.total_gpus > 0 for p in self.pools)

    def pool(self, product: str) -> GpuPool | None:
        """Pool for a product name (exact, else case-insensitive)."""
        for p in self.pools:
            if p.product == product:
                return p
        for p in self.pools:
            if p.product.lower() == product.lower():
                return p
        return None

    def largest(self) -> GpuPool | None:
        """The pool with the most memory per GPU."""
        return max(self.pools, key=lambda p: p.memory_mib, default=None)

    def describe(self) -> str:
        """One line listing the pools."""
        return "; ".join(p.describe() for p in self.pools) or "no GPU nodes"


def _get(d: Mapping[str, Any], *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return default
        d = d.get(key, d.get(_snake(key)) if _snake(key) != key else None)  # python-client to_dict() keys
        if d is None:
            return default
    return d


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _quantity_int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


def parse_quantity_bytes(text: str) -> int:
    """Kubernetes memory quantity ('64Gi', '512Mi', '8G', '1000') -> bytes; 0 for empty/invalid."""
    text = str(text or "").strip()
    if not text:
        return 0
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 10**3, "K": 10**3,
             "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
    try:
        for suffix in sorted(units, key=len, reverse=True):
            if text.endswith(suffix):
                return int(float(text[: -len(suffix)]) * units[suffix])
        return int(float(text))
    except ValueError:
        return 0


def gpu_memory_from_product(product: str) -> int:
    """Memory in MiB guessed from a product name (known table, else an 'NNGB' in the name); 0 if unknown."""
    up = product.upper().replace("NVIDIA-", "").replace("NVIDIA ", "")
    for key in sorted(KNOWN_GPU_MEMORY_MIB, key=len, reverse=True):
        if key in up:
            return KNOWN_GPU_MEMORY_MIB[key]
    m = re.search(r"(\d+)\s*GB", up)
    return int(m.group(1)) * 1024 if m else 0


def _node_ready(node: Mapping[str, Any]) -> bool:
    for cond in _get(node, "status", "conditions", default=[]) or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status")) != "False"
    return True


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """What `fleet_from_nodes` reads of a Node: its name and labels, whether it is cordoned, its allocatable
    resources and its Ready condition (a few hundred bytes instead of the tens of kilobytes a Node's JSON
    decodes to, most of it images, managed fields and other conditions)."""
    ready = [{"type": "Ready", "status": c.get("status")} for c in _get(node, "status", "conditions", default=[])
             or [] if c.get("type") == "Ready"]
    out: dict[str, Any] = {"metadata": {"name": _get(node, "metadata", "name", default="?"),
                                        "labels": dict(_get(node, "metadata", "labels", default={}) or {})},
                           "status": {"allocatable": dict(_get(node, "status", "allocatable", default={}) or {}),
                                      "conditions": ready}}
    if _get(node, "spec", "unschedulable", default=False):
        out["spec"] = {"unschedulable": True}
    return out


def fleet_from_nodes(nodes: Iterable[Mapping[str, Any]]) -> Fleet:
    """Group Node objects (dicts as the API returns them) into GPU pools.

    GPUs per node come from status.allocatable['nvidia.com/gpu'] (else the gpu.count label);
    memory from the nvidia.com/gpu.memory label (MiB), else from the product name. Unschedulable
    and NotReady nodes are left out.
    """
    pools: dict[tuple[str, int], GpuPool] = {}
    fleet = Fleet()
    for node in nodes:
        name = str(_get(node, "metadata", "name", default="?"))
        labels = _get(node, "metadata", "labels", default={}) or {}
        allocatable = _get(node, "status", "allocatable", default={}) or {}
        gpus = _quantity_int(allocatable.get(GPU_RESOURCE, 0)) if allocatable else 0
        if not gpus and GPU_RESOURCE not in allocatable:
            gpus = _quantity_int(labels.get(COUNT_LABEL, 0))
        if gpus <= 0:
            fleet.cpu_nodes += 1
            continue
        if _get(node, "spec", "unschedulable", default=False) or not _node_ready(node):
            fleet.skipped.append(f"{name}: unschedulable or not ready")
            continue
        product = str(labels.get(PRODUCT_LABEL) or "")
        memory = _quantity_int(labels.get(MEMORY_LABEL, 0)) or gpu_memory_from_product(product)
        if not product or not memory:
            fleet.skipped.append(f"{name}: {gpus} GPU(s) without {PRODUCT_LABEL}/{MEMORY_LABEL} labels")
            continue
        pool = pools.setdefault((product, memory), GpuPool(product, memory))
        pool.node_gpus[name] = gpus
        pool.node_memory[name] = parse_quantity_bytes(str(allocatable.get("memory", "") or ""))
    fleet.pools = sorted(pools.values(), key=lambda p: (p.memory_mib, p.product))
    return fleet


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: the sum over its containers (requests, else limits), or its largest init container."""
    def one(container: Mapping[str, Any]) -> int:
        res = container.get("resources") or {}
        value = (res.get("requests") or {}).get(GPU_RESOURCE, (res.get("limits") or {}).get(GPU_RESOURCE, 0))
        return _quantity_int(value)
    spec = pod.get("spec") or {}
    main = sum(one(c) for c in spec.get("containers") or [])
    init = max((one(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


class GpuHolding(NamedTuple):
    """What an unfinished pod means for occupancy: `gpus` held on `node`, or, not bound yet, asked of the GPU
    `product` it selects (either may be empty); `job`: the UID of the Job the pod belongs to ("" for none)."""

    node: str
    product: str
    gpus: int
    job: str = ""


# The label the Job controller puts on its pods: the UID of their Job (the older unprefixed one before 1.27).
JOB_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")


def gpu_holding(pod: Mapping[str, Any]) -> GpuHolding | None:
    """The pod's GPU holding; None when it finished or requests no GPUs."""
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    gpus = pod_gpu_request(pod)
    if gpus <= 0:
        return None
    spec = pod.get("spec") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    job = next((labels[k] for k in JOB_UID_LABELS if labels.get(k)), "")
    return GpuHolding(spec.get("nodeName") or "", (spec.get("nodeSelector") or {}).get(PRODUCT_LABEL) or "", gpus,
                      job)


def job_pods(job: Mapping[str, Any]) -> int:
    """How many pods a trainer Job runs at once (its parallelism, at least 1)."""
    return max(1, int((job.get("spec") or {}).get("parallelism") or 1))


def job_gpu_holding(job: Mapping[str, Any]) -> GpuHolding | None:
    """What a trainer Job asks of the fleet before any of its pods exists: the GPUs of its pod template times
    its parallelism, on the GPU product its template selects (None without GPUs or a selected product)."""
    spec = job.get("spec") or {}
    template = spec.get("template") or {}
    gpus = pod_gpu_request(template) * job_pods(job)
    product = ((template.get("spec") or {}).get("nodeSelector") or {}).get(PRODUCT_LABEL) or ""
    uid = str((job.get("metadata") or {}).get("uid") or "")
    return GpuHolding("", product, gpus, uid) if gpus > 0 and product else None


def with_occupancy(fleet: Fleet, pods: Iterable[Mapping[str, Any] | GpuHolding]) -> Fleet:
    """The fleet with each pool's GPUs in use: pods bound to a node and not finished hold their GPUs; pods not
    bound yet that select a GPU product (nodeSelector nvidia.com/gpu.product) are queued demand for it.
    `pods`: pod manifests or their `GpuHolding`s. Mutates and returns `fleet` (built per snapshot, never
    shared before this)."""
    by_node = {node: pool for pool in fleet.pools for node in pool.node_gpus}
    for item in pods:
        held = item if isinstance(item, GpuHolding) else gpu_holding(item)
        if held is None:
            continue
        if held.job:
            fleet.counted_jobs.add(held.job)
        if held.node:
            pool = by_node.get(held.node)
            if pool is not None:
                pool.node_used[held.node] = pool.node_used.get(held.node, 0) + held.gpus
            continue
        pool = fleet.pool(held.product) if held.product else None
        if pool is not None:
            pool.pending += held.gpus
    fleet.occupancy_known = True
    return fleet


def parse_gpu_shorthand(text: str) -> list[dict[str, Any]]:
    """Node dicts for `PRODUCT:GPUS[xNODES]`, e.g. `H100-80GB:8` or `NVIDIA-L4:1x4`."""
    m = re.fullmatch(r"\s*([A-Za-z0-9._-]+):(\d+)(?:x(\d+))?\s*", text)
    if not m:
        raise ValueError(f"--gpu {text!r}: expected PRODUCT:GPUS[xNODES], e.g. H100-80GB:8 or NVIDIA-L4:1x4")
    product, gpus, count = m.group(1), int(m.group(2)), int(m.group(3) or 1)
    memory = gpu_memory_from_product(product)
    if not memory:
        raise ValueError(f"--gpu {text!r}: unknown GPU memory for {product}; name it like 'X-48GB'")
    return [{"metadata": {"name": f"{product.lower()}-{i}",
                          "labels": {PRODUCT_LABEL: product, MEMORY_LABEL: str(memory), COUNT_LABEL: str(gpus)}},
             "status": {"allocatable": {GPU_RESOURCE: str(gpus)}}} for i in range(count)]


def nodes_from_file(path: str | Path) -> list[dict[str, Any]]:
    """Node manifests from a YAML/JSON file: a list, a `kind: List`, several documents, or a devcluster
    `kind: Fleet` of node groups."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    nodes: list[dict[str, Any]] = []
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("kind") == "Fleet":
            # devcluster/fleet.yaml: node groups, rendered exactly as the local cluster creates them
            from kubetune.fleet_file import node_manifests, parse_fleet

            nodes.extend(node_manifests(parse_fleet(dict(doc))))
        elif isinstance(doc, list):
            nodes.extend(doc)
        elif isinstance(doc, Mapping) and "items" in doc:
            nodes.extend(doc["items"] or [])
        elif isinstance(doc, Mapping):
            nodes.append(dict(doc))
    return [n for n in nodes if isinstance(n, Mapping) and n.get("kind", "Node") == "Node"]
