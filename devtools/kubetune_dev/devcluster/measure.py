"""Measure the local control plane: start-up times and peak memory.

    python -m kubetune_dev.devcluster.measure [--runs 3] [--nodes N] [--pods 50]

Starts the cluster `--runs` times (binaries already built, i.e. a warm start), reports the time to
apiserver /readyz and to everything ready (controller-manager, scheduler, KWOK and the fleet's
nodes Ready), then on the last run schedules an Indexed Job of `--pods` pods (1 GPU each) onto
the KWOK fleet, waits until they run, and reports each component's peak RSS (VmHWM from /proc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from .cluster import Cluster, ClusterOptions
from .fleet import generate_fleet, load_fleet


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process in KiB (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise ValueError(f"no VmHWM for pid {pid}")


def _run_job(cluster: Cluster, pods: int) -> float:
    from kubernetes import client

    api = cluster.api_client()
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespace({"metadata": {"name": "measure"}})
    while True:
        try:
            core.read_namespaced_service_account("default", "measure")
            break
        except client.ApiException:
            time.sleep(0.1)
    container = {"name": "main", "image": "unused", "command": ["true"],
                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    t0 = time.monotonic()
    batch.create_namespaced_job("measure", {
        "metadata": {"name": "load"},
        "spec": {"completionMode": "Indexed", "completions": pods, "parallelism": pods,
                 "template": {"spec": {"containers": [container], "restartPolicy": "Never",
                                       "nodeSelector": {"type": "kwok"}}}}})
    while True:
        running = [p for p in core.list_namespaced_pod("measure").items if p.status.phase == "Running"]
        if len(running) >= pods:
            return time.monotonic() - t0
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """Print a JSON report."""
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--nodes", type=int, default=0, help="generated fleet size (0: devcluster/fleet.yaml)")
    p.add_argument("--pods", type=int, default=50)
    args = p.parse_args(argv)
    fleet = generate_fleet(args.nodes) if args.nodes else load_fleet()
    report: dict = {"nodes": len(fleet.node_names), "gpus": fleet.total_gpus, "runs": []}
    for i in range(args.runs):
        cluster = Cluster(ClusterOptions(fleet=fleet))
        t0 = time.monotonic()
        cluster.start()
        run = {"apiserver_ready_s": round(cluster.timings["apiserver_ready_s"], 2),
               "all_ready_s": round(cluster.timings["all_ready_s"], 2), "wall_s": round(time.monotonic() - t0, 2)}
        if i == args.runs - 1:
            run["job_pods_running_s"] = round(_run_job(cluster, min(args.pods, fleet.total_gpus)), 2)
            hwm = {name: vm_hwm_kib(pid) // 1024 for name, pid in cluster.pids.items()}
            report["peak_rss_mib"] = hwm
            report["peak_rss_total_mib"] = sum(hwm.values())
        cluster.stop()
        report["runs"].append(run)
    for key in ("apiserver_ready_s", "all_ready_s"):
        report[f"median_{key}"] = statistics.median(r[key] for r in report["runs"])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
