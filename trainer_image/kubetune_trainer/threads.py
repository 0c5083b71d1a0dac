"""How many CPU threads a training process uses: its share of the pod's CPU request. Pure."""

from __future__ import annotations


def cpu_threads(cpus: str | None, procs_per_node: int, host_cpus: int | None) -> int | None:
    """CPU threads per training process: the pod's CPU request ($KUBETUNE_CPUS, from the downward API) shared by
    the node's processes, at least 1 and at most the host's cores; None without a request (torch's default).
    A container sees all of the host's cores, so torch's default (one thread per core) oversubscribes a pod's
    share on a large node, and its threads stall each other when another process takes one of them."""
    try:
        total = int(float(cpus)) if cpus else 0
    except ValueError:
        return None
    if total <= 0:
        return None
    per_process = max(1, total // max(procs_per_node, 1))
    return min(per_process, host_cpus) if host_cpus else per_process
