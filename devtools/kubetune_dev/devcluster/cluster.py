"""A real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK (simulated GPU nodes), as child processes on free loopback ports.

    from kubetune_dev.devcluster import Cluster
    with Cluster() as cluster:                 # default fleet: devcluster/fleet.yaml
        cluster.kubectl("get", "nodes")
        core = kubernetes.client.CoreV1Api(cluster.api_client())

Everything lives in a temporary work dir (certificates, etcd data, logs under `logs/`, the
admin kubeconfig `kubeconfig`). `stop()` (also run from atexit, on SIGTERM/SIGHUP and on
exceptions inside `with`) stops components in reverse start order and waits until their
process groups are gone; each child also dies with its parent (pdeathsig).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import binaries, fleet as fleetmod
from .certs import ClusterPKI, generate_pki
from .procs import ComponentExited, ProcessSet

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_STAGES_FILE = fleetmod.REPO_ROOT / "devcluster" / "kwok-stages.yaml"
# A kubelet's node lease (40 s, renewed every 10 s) and the controller-manager's grace before NotReady (50 s).
DEFAULT_NODE_LEASE_SECONDS = 40
DEFAULT_NODE_MONITOR_GRACE_SECONDS = 50

_live: list[Any] = []  # clusters, and processes started against them (anything with stop()), stopped last first
_live_lock = threading.Lock()


def track_live(thing: Any) -> None:
    """Stop `thing` (it has stop()) with the live clusters at exit or on SIGTERM/SIGHUP, before them."""
    with _live_lock:
        _live.append(thing)


def untrack_live(thing: Any) -> None:
    """`thing` was stopped."""
    with _live_lock:
        if thing in _live:
            _live.remove(thing)


def node_monitor_flags(lease_seconds: int) -> list[str]:
    """controller-manager flags for KWOK node leases of `lease_seconds`: none for the kubelet's 40 s (its default
    50 s grace applies); for longer leases a grace of the same 1.25 ratio, so a node renewing every quarter of
    its lease is not marked NotReady between renewals. Benchmarks at 1,000 nodes lengthen the lease: renewals
    every 10 s are ~100 requests/s, the apiserver's largest load on a small machine."""
    if lease_seconds < 10:
        raise ValueError(f"node lease of {lease_seconds} s: at least 10 s")
    if lease_seconds <= DEFAULT_NODE_LEASE_SECONDS:
        return []
    grace = max(DEFAULT_NODE_MONITOR_GRACE_SECONDS, (lease_seconds * 5 + 3) // 4)
    return [f"--node-monitor-grace-period={grace}s"]


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_all_live() -> None:
    with _live_lock:
        things = list(reversed(_live))
    for thing in things:
        try:
            thing.stop()
        except Exception:  # noqa: BLE001 - stop the rest
            pass


atexit.register(_stop_all_live)


def _on_fatal_signal(signum: int, _frame: Any) -> None:
    _stop_all_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_signal_handlers() -> None:
    """Stop live clusters on SIGTERM/SIGHUP (SIGINT already raises KeyboardInterrupt); main thread only,
    and only where no other handler was installed."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_fatal_signal)


# Metadata of every request once it completed (the user agent says which client, and which controller of the
# controller-manager, sent it).
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
"""


@dataclass
class ClusterOptions:
    """What to start."""

    fleet: fleetmod.Fleet | None = None          # None: devcluster/fleet.yaml
    controller_manager: bool = True
    scheduler: bool = True
    kwok: bool = True
    bin_dir: Path | None = None                   # None: binaries.find_bin_dir()
    work_dir: Path | None = None                  # None: a fresh temp dir, removed on stop
    keep_work_dir: bool = False
    startup_timeout: float = 120.0
    verbosity: int = 1
    kwok_stages_file: Path = KWOK_STAGES_FILE
    apiserver_profiling: bool = False             # serve /debug/pprof (benchmarks profile the apiserver)
    audit: bool = False                           # audit log of every request's metadata (Cluster.audit_log)
    node_lease_seconds: int = DEFAULT_NODE_LEASE_SECONDS  # KWOK node lease; renewed every quarter of it


@dataclass
class Cluster:
    """The running control plane; use as a context manager or call start()/stop()."""

    options: ClusterOptions = field(default_factory=ClusterOptions)
    procs: ProcessSet = field(default_factory=ProcessSet)
    timings: dict[str, float] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    process_nodes: list[Any] = field(default_factory=list)
    work_dir: Path | None = None
    bin_dir: Path | None = None          # where the component binaries (and helm) are
    pki: ClusterPKI | None = None
    _stopped: bool = False
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)

    # ----------------------------------------------------------------- properties
    @property
    def fleet(self) -> fleetmod.Fleet:
        """The simulated GPU fleet loaded into this cluster."""
        return self.options.fleet if self.options.fleet is not None else fleetmod.load_fleet()

    @property
    def server(self) -> str:
        """The apiserver URL."""
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (system:masters, certificates embedded)."""
        return self._dir / "kubeconfig"

    @property
    def audit_log(self) -> Path | None:
        """The apiserver's audit log (JSON lines, one per request, metadata only: who, what, when), when
        `ClusterOptions.audit` is set."""
        return self._dir / "audit.log" if self.options.audit else None

    @property
    def logs_dir(self) -> Path:
        """Component logs: <work_dir>/logs/<component>.log."""
        return self._dir / "logs"

    @property
    def pids(self) -> dict[str, int]:
        """Component name -> pid of the running control-plane processes."""
        return {c.name: c.pid for c in self.procs.children}

    @property
    def _dir(self) -> Path:
        if self.work_dir is None:
            raise RuntimeError("cluster not started")
        return self.work_dir

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "Cluster":
        """Start all components and wait until they are ready; stops everything if any step fails."""
        t0 = time.monotonic()
        opts = self.options
        bin_dir = self.bin_dir = opts.bin_dir or binaries.find_bin_dir()
        self.work_dir = Path(opts.work_dir or tempfile.mkdtemp(prefix="kubetune-cluster-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        track_live(self)
        install_signal_handlers()
        try:
            for attempt in (1, 2):
                try:
                    self._start(bin_dir, t0)
                    break
                except ComponentExited:
                    if attempt == 2:
                        raise
                    # most likely a port taken between free_port() and the bind: retry on new ports
                    self.procs.stop()
                    self.ports.clear()
                    shutil.rmtree(self._dir / "etcd", ignore_errors=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, bin_dir: Path, t0: float) -> None:
        d, opts = self._dir, self.options
        self.pki = generate_pki(d / "pki", service_ip=SERVICE_IP)
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            self.ports[name] = free_port()
        self._write_kubeconfig()
        self.timings["pki_s"] = time.monotonic() - t0

        self._start_etcd(bin_dir)
        self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{self.ports['etcd']}/health"), opts.startup_timeout)
        self._start_apiserver(bin_dir)
        self._wait("kube-apiserver", lambda: self._api_get("/readyz") == 200, opts.startup_timeout)
        self.timings["apiserver_ready_s"] = time.monotonic() - t0

        waits: list[tuple[str, Callable[[], bool]]] = []
        if opts.controller_manager:
            self._start_controller_manager(bin_dir)
            port = self.ports["controller-manager"]
            waits.append(("kube-controller-manager", lambda: _https_ok_insecure(f"https://127.0.0.1:{port}/healthz")))
            waits.append(("default service account", self._default_sa_exists))
        if opts.scheduler:
            self._start_scheduler(bin_dir)
            sport = self.ports["scheduler"]
            waits.append(("kube-scheduler", lambda: _https_ok_insecure(f"https://127.0.0.1:{sport}/healthz")))
        if opts.kwok:
            self._start_kwok(bin_dir)
            kport = self.ports["kwok"]
            waits.append(("kwok", lambda: _http_ok(f"http://127.0.0.1:{kport}/healthz")))
        if opts.kwok and self.fleet.groups:
            self.apply_fleet(self.fleet)
            waits.append(("fleet nodes Ready", self._fleet_ready))
        for what, check in waits:
            self._wait(what, check, opts.startup_timeout)
        self.timings["all_ready_s"] = time.monotonic() - t0
        self._write_state()

    def stop(self) -> None:
        """Stop process nodes, then KWOK, scheduler, controller-manager, apiserver, etcd; remove the work dir."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        for node in reversed(self.process_nodes):
            try:
                node.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass
        self.process_nodes.clear()
        self.procs.stop()
        untrack_live(self)
        if self.work_dir and not self.options.keep_work_dir and self.options.work_dir is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    # ----------------------------------------------------------------- components
    def _start_etcd(self, bin_dir: Path) -> None:
        d = self._dir
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self.procs.start("etcd", [
            str(bin_dir / "etcd"), "--name=kubetune", f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubetune={peer}", "--unsafe-no-fsync", "--log-level=warn",
            "--quota-backend-bytes=4294967296",
        ], self.logs_dir / "etcd.log")

    def _start_apiserver(self, bin_dir: Path) -> None:
        p = self.pki
        assert p is not None
        self.procs.start("kube-apiserver", [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={p.apiserver_crt}", f"--tls-private-key-file={p.apiserver_key}",
            f"--client-ca-file={p.ca_crt}",
            f"--service-account-issuer={SA_ISSUER}", f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
            "--allow-privileged=true", "--enable-priority-and-fairness=false",
            f"--profiling={str(self.options.apiserver_profiling).lower()}",
            "--event-ttl=1h", f"--cert-dir={self._dir / 'apiserver-certs'}", f"--v={self.options.verbosity}",
            *self._audit_flags(),
        ], self.logs_dir / "kube-apiserver.log")

    def _audit_flags(self) -> list[str]:
        if self.audit_log is None:
            return []
        policy = self._dir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        # batch mode: requests do not wait for the log write
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-mode=batch"]

    def _start_controller_manager(self, bin_dir: Path) -> None:
        p = self.pki
        assert p is not None
        kc = self.kubeconfig
        self.procs.start("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self._dir / 'kcm-certs'}", "--controllers=*", "--leader-elect=false",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={p.sa_key}", f"--root-ca-file={p.ca_crt}",
            f"--cluster-signing-cert-file={p.ca_crt}", f"--cluster-signing-key-file={p.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--cluster-name=kubetune-dev",
            "--kube-api-qps=100", "--kube-api-burst=200", "--profiling=false", f"--v={self.options.verbosity}",
            *node_monitor_flags(self.options.node_lease_seconds),
        ], self.logs_dir / "kube-controller-manager.log")

    def _start_scheduler(self, bin_dir: Path) -> None:
        kc = self.kubeconfig
        config = self._dir / "scheduler-config.yaml"
        config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {json.dumps(str(kc))}\n  qps: 100\n  burst: 200\n"
            "leaderElection:\n  leaderElect: false\n")
        self.procs.start("kube-scheduler", [
            str(bin_dir / "kube-scheduler"), f"--config={config}",
            f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self._dir / 'scheduler-certs'}", f"--v={self.options.verbosity}",
        ], self.logs_dir / "kube-scheduler.log")

    def _start_kwok(self, bin_dir: Path) -> None:
        self.procs.start("kwok", [
            str(bin_dir / "kwok"), f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
            f"--manage-nodes-with-label-selector={fleetmod.KWOK_NODE_SELECTOR}",
            f"--config={self.options.kwok_stages_file}", f"--server-address=127.0.0.1:{self.ports['kwok']}",
            "--cidr=10.244.0.1/16", "--node-ip=10.250.0.1",
            # liveness by lease; see devcluster/kwok-stages.yaml
            f"--node-lease-duration-seconds={self.options.node_lease_seconds}",
        ], self.logs_dir / "kwok.log")

    # ----------------------------------------------------------------- clients
    def api_client(self) -> Any:
        """A new kubernetes.client.ApiClient for this cluster (admin)."""
        from kubernetes import config as kconfig

        return kconfig.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the real kubectl against this cluster; raises with stderr when check and it fails."""
        result = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def env(self) -> dict[str, str]:
        """Environment for tools that talk to this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig), "KUBETUNE_CLUSTER_SERVER": self.server,
                "KUBETUNE_CLUSTER_DIR": str(self._dir)}

    def apply_fleet(self, fleet: fleetmod.Fleet) -> None:
        """Create (or replace the labels/status of) the fleet's KWOK nodes."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            for manifest in fleetmod.node_manifests(fleet):
                try:
                    core.create_node(manifest)
                except ApiException as e:
                    if e.status != 409:
                        raise
                    core.patch_node(manifest["metadata"]["name"], {"metadata": manifest["metadata"]})

    def start_process_node(self, name: str, data_root: str | Path, **kwargs: Any) -> Any:
        """Start a process node (runs pods bound to it as local processes) in a background thread."""
        from .process_node import ProcessNode, ProcessNodeConfig

        node = ProcessNode(ProcessNodeConfig(name=name, data_root=Path(data_root), **kwargs),
                           api_client_factory=self.api_client)
        node.start()
        self.process_nodes.append(node)
        return node

    # ----------------------------------------------------------------- helpers
    def _write_kubeconfig(self) -> None:
        p = self.pki
        assert p is not None

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubetune",
            "clusters": [{"name": "kubetune", "cluster": {"server": self.server,
                                                          "certificate-authority-data": b64(p.ca_crt)}}],
            "users": [{"name": "kubetune-admin", "user": {"client-certificate-data": b64(p.admin_crt),
                                                          "client-key-data": b64(p.admin_key)}}],
            "contexts": [{"name": "kubetune", "context": {"cluster": "kubetune", "user": "kubetune-admin"}}],
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=1))
        self.kubeconfig.chmod(0o600)

    def _write_state(self) -> None:
        state = {"server": self.server, "kubeconfig": str(self.kubeconfig), "pids": self.pids,
                 "ports": self.ports, "owner_pid": os.getpid(), "timings": self.timings}
        (self._dir / "state.json").write_text(json.dumps(state, indent=1))

    def _ssl_context(self) -> ssl.SSLContext:
        p = self.pki
        assert p is not None
        ctx = ssl.create_default_context(cafile=str(p.ca_crt))
        ctx.load_cert_chain(str(p.admin_crt), str(p.admin_key))
        return ctx

    def _api_get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl_context(), timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, ssl.SSLError):
            return 0

    def _default_sa_exists(self) -> bool:
        return self._api_get("/api/v1/namespaces/default/serviceaccounts/default") == 200

    def _fleet_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.server + "/api/v1/nodes?labelSelector=" + fleetmod.KWOK_NODE_SELECTOR,
                                        context=self._ssl_context(), timeout=5) as r:
                items = json.load(r)["items"]
        except (OSError, ValueError):
            return False
        ready = {n["metadata"]["name"] for n in items
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))}
        return set(self.fleet.node_names) <= ready

    def _wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.procs.check_alive()
            if check():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail(15)}" for c in self.procs.children)
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
            time.sleep(0.1)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _https_ok_insecure(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False
