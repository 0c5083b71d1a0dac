"""`kubetune-dev cluster ...`: run the local control plane from a shell.

    kubetune-dev cluster up [--fleet devcluster/fleet.yaml | --nodes N | --no-fleet]
                        [--process-nodes K --data-root DIR] [--env-file PATH] [--no-kwok]
                        [--no-controller-manager] [--no-scheduler] [--keep-work-dir] [--kueue]
        Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK (plus K local
        process nodes named process-node-0..K-1 sharing DIR) and stays in the foreground until
        Ctrl-C / SIGTERM / `kubetune-dev cluster down`, then stops everything (--kueue also runs Kueue's
        controller manager, built from devcluster/kueue/go.mod when needed: docs/kueue.md). Once ready it writes
        the env file (default ~/.cache/kubetune/devcluster/env) with `export KUBECONFIG=...` etc.
        and prints the same lines on stdout:
            kubetune-dev cluster up &                    # or in another terminal
            eval "$(kubetune-dev cluster env --wait 120)"
            kubectl get nodes
    kubetune-dev cluster env [--env-file PATH] [--wait SECONDS]   print the export lines of a running cluster
    kubetune-dev cluster down [--env-file PATH]                   stop the cluster started by `up`
    kubetune-dev cluster fleet --nodes N                          print an N-node fleet file (for benchmarks)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from . import fleet as fleetmod
from .cluster import Cluster, ClusterOptions
from .procs import pid_alive


def default_env_file() -> Path:
    """Where `up` writes, and `env`/`down` read, the cluster's environment."""
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    return cache / "devcluster" / "env"


def _read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune-dev cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane in the foreground")
    group = up.add_mutually_exclusive_group()
    group.add_argument("--fleet", type=Path, default=fleetmod.DEFAULT_FLEET_FILE, help="fleet file")
    group.add_argument("--nodes", type=int, help="generate an N-node fleet instead of reading a file")
    group.add_argument("--no-fleet", action="store_true", help="no KWOK nodes")
    up.add_argument("--no-kwok", action="store_true")
    up.add_argument("--no-controller-manager", action="store_true")
    up.add_argument("--no-scheduler", action="store_true")
    up.add_argument("--process-nodes", type=int, default=0, help="number of local process nodes to run")
    up.add_argument("--data-root", type=Path, help="data root of the process nodes (PVCs under <root>/pvc)")
    up.add_argument("--node-cpu", default="4", help="allocatable cpu of each process node")
    up.add_argument("--node-memory", default="16Gi", help="allocatable memory of each process node")
    up.add_argument("--env-file", type=Path, default=default_env_file())
    up.add_argument("--work-dir", type=Path, help="keep state here instead of a temp dir")
    up.add_argument("--keep-work-dir", action="store_true")
    up.add_argument("--kueue", action="store_true", help="also run Kueue (CRDs, controller manager, webhooks)")
    env = sub.add_parser("env", help="print export lines for the running cluster")
    env.add_argument("--env-file", type=Path, default=default_env_file())
    env.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for the cluster")
    down = sub.add_parser("down", help="stop the cluster started by `up`")
    down.add_argument("--env-file", type=Path, default=default_env_file())
    down.add_argument("--timeout", type=float, default=60)
    fl = sub.add_parser("fleet", help="print a generated fleet file")
    fl.add_argument("--nodes", type=int, required=True)
    return p


def _up(args: argparse.Namespace) -> int:
    if args.no_fleet:
        fleet = fleetmod.empty_fleet()
    elif args.nodes is not None:
        fleet = fleetmod.generate_fleet(args.nodes)
    else:
        fleet = fleetmod.load_fleet(args.fleet)
    if args.process_nodes and not args.data_root:
        print("--process-nodes needs --data-root", file=sys.stderr)
        return 2
    opts = ClusterOptions(fleet=fleet, kwok=not args.no_kwok, controller_manager=not args.no_controller_manager,
                          scheduler=not args.no_scheduler, work_dir=args.work_dir, keep_work_dir=args.keep_work_dir)
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    signal.signal(signal.SIGHUP, lambda *_: stop_requested.append(True))
    cluster = Cluster(opts)
    try:
        cluster.start()
        for i in range(args.process_nodes):
            cluster.start_process_node(f"process-node-{i}", args.data_root, cpu=args.node_cpu, memory=args.node_memory)
        if args.kueue:
            from .kueue import start_kueue

            start_kueue(cluster, remove_crds_on_stop=False)  # stops with the cluster
        lines = [f"export {k}={shlex.quote(v)}" for k, v in cluster.env().items()]
        lines.append(f"export KUBETUNE_CLUSTER_PID={os.getpid()}")
        args.env_file.parent.mkdir(parents=True, exist_ok=True)
        args.env_file.write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        print(f"# ready in {cluster.timings['all_ready_s']:.1f}s (apiserver {cluster.timings['apiserver_ready_s']:.1f}s); "
              f"logs in {cluster.logs_dir}; Ctrl-C or `kubetune-dev cluster down` stops it", file=sys.stderr, flush=True)
        while not stop_requested:
            cluster.procs.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        if args.env_file.exists() and _read_env_file(args.env_file).get("KUBETUNE_CLUSTER_PID") == str(os.getpid()):
            args.env_file.unlink()
    return 0


def _env(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        if args.env_file.exists():
            env = _read_env_file(args.env_file)
            if pid_alive(int(env.get("KUBETUNE_CLUSTER_PID", "0"))):
                print(args.env_file.read_text(), end="")
                return 0
        if time.monotonic() >= deadline:
            print(f"no running cluster (env file {args.env_file}); start one with `kubetune-dev cluster up`",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)


def _down(args: argparse.Namespace) -> int:
    if not args.env_file.exists():
        print(f"no env file {args.env_file}: nothing to stop", file=sys.stderr)
        return 1
    env = _read_env_file(args.env_file)
    pid = int(env.get("KUBETUNE_CLUSTER_PID", "0"))
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            print(f"cluster process {pid} did not stop within {args.timeout}s", file=sys.stderr)
            return 1
    state = Path(env.get("KUBETUNE_CLUSTER_DIR", "/nonexistent")) / "state.json"
    if state.exists():  # owner died without cleaning up (e.g. SIGKILL): kill leftovers
        for name, cpid in json.loads(state.read_text())["pids"].items():
            if pid_alive(cpid):
                os.killpg(cpid, signal.SIGKILL)
    args.env_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kubetune-dev cluster`."""
    args = _parser().parse_args(argv)
    if args.command == "fleet":
        print(fleetmod.generate_fleet(args.nodes).to_yaml(), end="")
        return 0
    return {"up": _up, "env": _env, "down": _down}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
