"""Operator at scale: N FineTuneJobs applied at once on a simulated GPU fleet, against a direct-Job baseline.

    python bench/operator_scale.py [--nodes 250 --jobs 1000] [--concurrency 16] [--quick] [--no-baseline]
                                   [--apiserver-profile FILE [--apiserver-profile-seconds 45]]
                                   [--peer kubeflow|none] [--peer-order after|before]

Starts the local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK) with a
generated fleet of `--nodes` simulated GPU nodes, then in one run:

1. baseline: creates `--jobs` plain batch/v1 Jobs directly from `--concurrency` client threads (the same
   Job object the operator renders, suspended so it creates no pods) and times until a watch has seen
   every one: the apiserver's own ceiling for Job creation on this machine;
2. kubetune: starts `python -m kubetune operator`, creates `--jobs` FineTuneJobs (a LoRA spec the sizer
   places on GPUs) from the same number of threads, and times until every FineTuneJob has its
   ConfigMap, Service, Job and `status.plan`. Apply-to-Job latency is the time between the watch events
   of the FineTuneJob's and of its Job's creation (wall clock at event arrival, one watcher process);
3. completion: marks every running trainer pod complete through KWOK (kwok.kubetune.io/complete) until
   every FineTuneJob is Succeeded, and times that;
4. the peer (--peer kubeflow, the default; after the kubetune phase unless --peer-order before): starts the
   Kubeflow Trainer v2 and JobSet controller managers (kubetune_dev.devcluster.kubeflow), creates `--jobs`
   TrainJobs of a ClusterTrainingRuntime that runs the same trainer pod (bench/peer_kubeflow.py) and
   measures them as the FineTuneJobs: from the first create until every job's pod exists (throughput,
   apply -> first pod latency, CPU and apiserver requests per job), controller peak RSS, and completion.
   `peer_ratios` holds kubetune / Kubeflow for each figure. Without `go` the peer is skipped with the reason.

Also recorded: operator peak RSS (VmHWM) and CPU time (utime+stime) from /proc, the apiserver's
`apiserver_request_total` delta by verb/resource for each phase, the load average, errors / lost
jobs, CPU seconds per process for each creation phase and, with --apiserver-profile, a CPU profile of
kube-apiserver during the FineTuneJob creation phase with its share by category. Results go to
bench/results/operator_scale-<nodes>n-<jobs>j.json (or --out); a table is printed.

`kill -USR1 <pid of this script>` ends the kubetune phase in progress as if its `--timeout` had passed (the
peer is then skipped) and writes what was measured so far, marked `"stopped": true`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "bench"))

RESULTS_DIR = REPO / "bench" / "results"
FTJ_NS = "bench-kubetune"
DIRECT_NS = "bench-direct"
DIRECT_RUNNING_NS = "bench-direct-running"
KUBEFLOW_NS = "bench-kubeflow"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
MANAGED = "app.kubernetes.io/managed-by=kubetune"
COMPLETE_ANNOTATION = "kwok.kubetune.io/complete"
TERMINAL = ("Succeeded", "Failed")

# A realistic LoRA run the sizer places on one GPU of the fleet (no PVCs: every URI is remote, so the
# scheduler does not wait for volumes that do not exist on the simulated fleet).
FTJ_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
    "dataset": {"uri": "s3://bench/datasets/support-chats.jsonl", "format": "messages"},
    "method": "lora",
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
    "training": {"epochs": 1, "learningRate": "2e-4", "microBatchSize": 1, "gradientAccumulationSteps": 16,
                 "maxSeqLength": 2048, "gradientCheckpointing": True},
    "output": {"uri": "s3://bench/outputs/run"},
}


# ------------------------------------------------------------------------------------------ pure helpers

# Where the apiserver spends its CPU in the kubetune phase (--apiserver-profile): regular expressions
# over function names, each summed with `go tool pprof -focus` (categories overlap; GC is Go's own).
PROFILE_CATEGORIES: dict[str, str] = {
    "custom resource status writes": r"customresource\.\(\*StatusREST\)\.Update",
    "custom resource creates": r"crdHandler\)\.serveResource\.CreateResource",
    "object creates (all kinds)": r"handlers\.CreateResource|registry\.\(\*Store\)\.Create",
    "Job status writes": r"batch/job/storage\.\(\*StatusREST\)\.Update",
    "pod status writes": r"core/pod/storage\.\(\*StatusREST\)\.Update",
    "CEL validation": r"apiserver/schema/cel\.",
    "managed fields": r"util/managedfields",
    "client certificate checks": r"authentication/request/x509",
    "TLS": r"crypto/tls\.",
    "watch serving": r"WatchServer|watchEncoder|cacher\.\(\*cacheWatcher\)",
    "etcd watch decoding": r"etcd3\.\(\*watchChan\)",
    "Go garbage collection": r"runtime\.gcBgMarkWorker",
}


# Set by SIGUSR1: the phase in progress ends as if its deadline had passed, and what was measured so far is
# written (`"stopped": true`); a run too long for the machine it is on still leaves its figures.
STOP = threading.Event()


def running(deadline: float) -> bool:
    """Before the phase's deadline, and not asked to stop."""
    return time.monotonic() < deadline and not STOP.is_set()


def parse_pprof_seconds(text: str) -> tuple[float, float] | None:
    """(focused seconds, total seconds) from `go tool pprof -top -focus=...` output: the total from its
    "Total samples =" line, the focused part from "Showing nodes accounting for" (absent, or a bare 0, when the
    focus matched no sample). None when there is no total (not a profile)."""
    unit = {"ms": 0.001, "s": 1.0, "min": 60.0, "mins": 60.0, "h": 3600.0}
    total = re.search(r"Total samples = ([0-9.]+)(ms|s|mins?|h)\b", text)
    if not total:
        return None
    shown = re.search(r"Showing nodes accounting for ([0-9.]+)(ms|s|mins?|h)?,", text)
    focused = float(shown.group(1)) * unit[shown.group(2)] if shown and shown.group(2) else 0.0
    return focused, float(total.group(1)) * unit[total.group(2)]


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) by linear interpolation; nan for an empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


_METRIC_RE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)$')
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_request_totals(text: str) -> Counter:
    """Sum apiserver_request_total by (verb, resource) from Prometheus text."""
    out: Counter = Counter()
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if not m:
            continue
        labels = dict(_LABEL_RE.findall(m.group("labels")))
        key = f"{labels.get('verb', '?')} {labels.get('resource', '?')}"
        if labels.get("subresource"):
            key += "/" + labels["subresource"]
        out[key] += float(m.group("value"))
    return out


def client_of(user_agent: str) -> str:
    """Which client sent a request, from its user agent: the program, and for a client-go controller its name
    ("kube-controller-manager/v1.33.1 (linux/amd64) kubernetes/abc/generic-garbage-collector" ->
    "kube-controller-manager/generic-garbage-collector")."""
    program = user_agent.split("/", 1)[0].strip() or "?"
    if " kubernetes/" in user_agent:
        tail = user_agent.rsplit(" kubernetes/", 1)[1].split("/")
        if len(tail) > 1 and tail[-1]:
            program += "/" + tail[-1]
    return program


def requests_by_client(lines: Iterable[str], start: float, end: float, top: int = 6) -> dict[str, dict[str, int]]:
    """From apiserver audit log lines (JSON, one event per request): the requests received in [start, end)
    (Unix seconds) per client (`client_of`), largest first, each with its total and its `top` verb/resource
    pairs. What apiserver_request_total cannot say: who sent them."""
    by: dict[str, Counter] = {}
    for line in lines:
        try:
            event = json.loads(line)
            at = dt.datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if not start <= at < end:
            continue
        ref = event.get("objectRef") or {}
        what = f"{event.get('verb', '?')} {ref.get('resource', event.get('requestURI', '?'))}"
        if ref.get("subresource"):
            what += "/" + ref["subresource"]
        by.setdefault(client_of(str(event.get("userAgent") or "")), Counter())[what] += 1
    out = {}
    for client, counts in sorted(by.items(), key=lambda kv: -sum(kv[1].values())):
        out[client] = {"TOTAL": sum(counts.values()), **dict(counts.most_common(top))}
    return out


def audited_requests(cluster: Any, windows: list[tuple[float, float]]) -> list[dict[str, dict[str, int]]] | None:
    """`requests_by_client` of the cluster's audit log for each (start, end) window, read once (None without a
    log); waits a moment for the apiserver's batched writes."""
    if getattr(cluster, "audit_log", None) is None:
        return None
    time.sleep(2.0)
    with open(cluster.audit_log, encoding="utf-8") as f:
        lines = f.readlines()
    return [requests_by_client(lines, start, end) for start, end in windows]


def counter_delta(after: Counter, before: Counter, top: int = 25) -> dict[str, int]:
    """after - before, the `top` largest non-zero entries (largest first) plus a total."""
    delta = {k: int(round(after[k] - before.get(k, 0))) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    ordered = dict(sorted(delta.items(), key=lambda kv: -kv[1])[:top])
    ordered["TOTAL"] = sum(delta.values())
    return ordered


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (seconds) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cpu_by_process(cluster: Any, extra: dict[str, int] | None = None) -> dict[str, float]:
    """CPU seconds used so far by each control-plane process, KWOK, this client and `extra` processes, and
    when they were read ("_at", monotonic seconds)."""
    pids = {**cluster.pids, "bench client": os.getpid(), **(extra or {})}
    out = {"_at": time.monotonic(), "_host": host_busy_seconds()}
    for name, pid in pids.items():
        try:
            out[name] = proc_cpu_seconds(pid)
        except OSError:  # exited
            pass
    return out


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
    """CPU seconds per process between two `cpu_by_process` readings, their total, and the cores that total
    kept busy over the time between the readings."""
    used = {name: round(after[name] - before.get(name, 0.0), 2) for name in after if not name.startswith("_")}
    total = sum(used.values())
    wall = after["_at"] - before["_at"]
    host = after.get("_host", 0.0) - before.get("_host", 0.0)
    return {**dict(sorted(used.items(), key=lambda kv: -kv[1])), "TOTAL": round(total, 2),
            "cores_busy": round(total / wall, 2) if wall > 0 else None,
            # the whole machine, this run's processes included: what other work left to the run
            "host_cores_busy": round(host / wall, 2) if wall > 0 and "_host" in before else None}


def host_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs; /proc/stat minus idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    """A '<key>: N kB' line of /proc/<pid>/status (VmHWM, VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise ValueError(f"no {key} in /proc/{pid}/status")


def loadavg() -> list[float]:
    """1, 5, 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def ftj_manifest(name: str) -> dict[str, Any]:
    """One benchmark FineTuneJob."""
    spec = json.loads(json.dumps(FTJ_SPEC))
    spec["output"]["uri"] = f"s3://bench/outputs/{name}"
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": FTJ_NS}, "spec": spec}


# ------------------------------------------------------------------------------------------ watching

class Watcher(threading.Thread):
    """Streams watch events of one collection and records, per object name, the wall-clock time its
    ADDED event arrived and a small digest of its latest state (digest(obj) -> any)."""

    def __init__(self, api: Any, path: str, digest: Callable[[dict], Any] | None = None,
                 label_selector: str = "") -> None:
        super().__init__(daemon=True, name=f"watch {path}")
        self.api, self.path, self.digest, self.selector = api, path, digest, label_selector
        self.added: dict[str, float] = {}
        self.state: dict[str, Any] = {}
        self.last: dict[str, Any] = {}  # the latest digest of every object seen, deleted ones included
        self.deleted: set[str] = set()
        self.finished_at: dict[str, float] = {}  # when each object's digest first showed a terminal phase
        self.errors: list[str] = []
        self.ready = threading.Event()
        self.stopping = False
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # noqa: BLE001 - recorded; wait_until() then stops waiting
            self.errors.append(f"watcher died: {type(exc).__name__}: {exc}")
            with self.changed:
                self.changed.notify_all()
            raise

    def _get(self, query: list[tuple[str, str]], stream: bool, read_timeout: float) -> Any:
        """GET this collection through the ApiClient's own urllib3 pool (admin client certificate)."""
        import urllib.parse

        import urllib3

        url = self.api.configuration.host + self.path + ("?" + urllib.parse.urlencode(query) if query else "")
        resp = self.api.rest_client.pool_manager.request(
            "GET", url, preload_content=not stream, timeout=urllib3.Timeout(connect=10, read=read_timeout))
        if resp.status != 200:
            body = resp.data if not stream else resp.read()
            raise RuntimeError(f"GET {url}: HTTP {resp.status}: {body[:300]!r}")
        return resp

    @staticmethod
    def _lines(resp: Any):
        buf = b""
        for chunk in resp.stream(65536):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line

    def _watch(self) -> None:
        rv = self._list()
        while not self.stopping:
            query = [("watch", "true"), ("resourceVersion", rv), ("allowWatchBookmarks", "true"),
                     ("timeoutSeconds", "3600")]
            if self.selector:
                query.append(("labelSelector", self.selector))
            try:
                resp = self._get(query, stream=True, read_timeout=3700)
                for line in self._lines(resp):
                    ev = json.loads(line)
                    now = time.time()
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        self.errors.append(str(obj.get("message")))
                        rv = self._list()
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if ev.get("type") == "BOOKMARK":
                        continue
                    self._record(ev["type"], obj, now)
            except Exception as exc:  # noqa: BLE001 - reconnect and keep watching
                if self.stopping:
                    return
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def _list(self) -> str:
        query = [("labelSelector", self.selector)] if self.selector else []
        data = json.loads(self._get(query, stream=False, read_timeout=120).data)
        now = time.time()
        for obj in data.get("items") or []:
            self._record("ADDED", obj, now)
        self.ready.set()
        return data["metadata"]["resourceVersion"]

    def _record(self, etype: str, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        with self.changed:
            if etype == "DELETED":
                self.deleted.add(name)
                self.state.pop(name, None)
                # A Job of the same name created again (a move) is a new object: its outcome counts, not the
                # verdict the Job controller gave the deleted one when its pods were killed.
                self.finished_at.pop(name, None)
            else:
                self.added.setdefault(name, now)
                if self.digest is not None:
                    digest = self.state[name] = self.last[name] = self.digest(obj)
                    if isinstance(digest, dict) and digest.get("phase") in TERMINAL:
                        self.finished_at.setdefault(name, now)
            self.changed.notify_all()

    def wait_until(self, predicate: Callable[["Watcher"], bool], timeout: float) -> bool:
        """Block until predicate(self) (checked under the lock after every event) or timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                if not self.is_alive():
                    raise RuntimeError(f"watcher of {self.path} stopped: {self.errors[-3:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every `interval` s: the peak per phase (mark() returns the peak since the
    previous mark) and a coarse timeline (one sample per `every` s), to see when memory grows."""

    def __init__(self, pid: int, interval: float = 0.5, every: float = 5.0) -> None:
        super().__init__(daemon=True, name=f"rss {pid}")
        self.pid, self.interval, self.every = pid, interval, every
        self.peak_kib = 0
        self.timeline: list[tuple[float, float]] = []
        self.stopping = False
        self._t0 = time.monotonic()

    def run(self) -> None:
        next_point = 0.0
        while not self.stopping:
            try:
                kib = proc_status_kib(self.pid, "VmRSS")
            except (OSError, ValueError):
                return
            self.peak_kib = max(self.peak_kib, kib)
            elapsed = time.monotonic() - self._t0
            if elapsed >= next_point:
                self.timeline.append((round(elapsed, 1), round(kib / 1024, 1)))
                next_point += self.every
            time.sleep(self.interval)

    def mark(self) -> float:
        """Peak RSS (MiB) since the previous mark."""
        peak, self.peak_kib = self.peak_kib, 0
        return round(peak / 1024, 1)


def ftj_digest(obj: dict) -> dict[str, Any]:
    """What the benchmark needs of a FineTuneJob: phase, reason and whether status.plan is set."""
    st = obj.get("status") or {}
    return {"phase": st.get("phase") or "", "reason": st.get("reason") or "", "plan": bool(st.get("plan")),
            "message": (st.get("message") or "")[:200]}


def job_digest(obj: dict) -> dict[str, Any]:
    """A batch Job's outcome as a phase, as soon as the Job controller has decided it (SuccessCriteriaMet or
    Complete: Succeeded; FailureTarget or Failed: Failed)."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("SuccessCriteriaMet", "Complete"):
            return {"phase": "Succeeded"}
        if cond.get("status") == "True" and cond.get("type") in ("FailureTarget", "Failed"):
            return {"phase": "Failed"}
    return {"phase": ""}


def pod_digest(obj: dict) -> dict[str, Any]:
    """A trainer pod's phase, node, workload (Job or JobSet) and whether completion was requested."""
    from peer_kubeflow import pod_owner

    return {"phase": (obj.get("status") or {}).get("phase") or "Pending",
            "owner": pod_owner((obj.get("metadata") or {}).get("labels") or {}),
            "node": (obj.get("spec") or {}).get("nodeName") or "",
            "completing": COMPLETE_ANNOTATION in ((obj.get("metadata") or {}).get("annotations") or {}),
            "deleting": bool(obj["metadata"].get("deletionTimestamp"))}


# ------------------------------------------------------------------------------------------ cluster I/O

def ssl_context(cluster: Any) -> ssl.SSLContext:
    """Admin client-certificate TLS context for the devcluster apiserver."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_crt))
    ctx.load_cert_chain(str(cluster.pki.admin_crt), str(cluster.pki.admin_key))
    return ctx


def request_totals(cluster: Any) -> Counter:
    """The apiserver's apiserver_request_total by verb/resource right now."""
    with urllib.request.urlopen(cluster.server + "/metrics", context=ssl_context(cluster), timeout=30) as r:
        return parse_request_totals(r.read().decode())


def make_api(cluster: Any, pool: int) -> Any:
    """An ApiClient whose connection pool fits `pool` concurrent threads."""
    from kubernetes import client, config as kconfig

    cfg = client.Configuration()
    kconfig.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = max(pool, 4)
    return client.ApiClient(cfg)


def create_namespace(api: Any, name: str) -> None:
    """Create a namespace and wait for its default service account."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            return
        except client.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def create_all(n: int, concurrency: int, create: Callable[[int], None]) -> tuple[float, float, list[str]]:
    """Call create(i) for i in range(n) from `concurrency` threads; (start, end, errors)."""
    errors: list[str] = []
    t0 = time.time()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for fut in cf.as_completed([pool.submit(create, i) for i in range(n)]):
            exc = fut.exception()
            if exc is not None:
                errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    return t0, time.time(), errors


def baseline_job(cluster: Any, spec_dict: dict[str, Any], suspend: bool = True) -> dict[str, Any]:
    """The Job the operator would render for FTJ_SPEC on this fleet, without owner (suspended: no pods)."""
    from kubetune.api import parse_spec
    from kubetune.builders import BuildConfig, JobRef, build_children
    from kubetune_dev.devcluster.fleet import node_manifests
    from kubetune.sizing.layout import size_job_layout

    spec = parse_spec(spec_dict)
    outcome = size_job_layout(spec, node_manifests(cluster.fleet))
    if not outcome.fits or outcome.layout is None:
        raise SystemExit(f"the benchmark spec does not fit the fleet: {outcome.message}")
    job = build_children(JobRef("direct", DIRECT_NS, "00000000-0000-0000-0000-000000000000"), spec_dict, spec,
                         outcome.layout, BuildConfig())[-1]
    job["metadata"].pop("ownerReferences", None)
    job["spec"]["suspend"] = suspend
    return job


def bench_layout_pods(cluster: Any, spec_dict: dict[str, Any]) -> int:
    """How many pods the sizer gives FTJ_SPEC on this fleet (a Service is a child only when > 1)."""
    from kubetune.api import parse_spec
    from kubetune_dev.devcluster.fleet import node_manifests
    from kubetune.sizing.layout import size_job_layout

    outcome = size_job_layout(parse_spec(spec_dict), node_manifests(cluster.fleet))
    return outcome.layout.pods if outcome.layout is not None else 0


DRAIN_PAGE = 500  # Jobs per collection delete when a phase's Jobs are removed


def clear_workloads(api: Any, ns: str, resource: tuple[str, str, str], timeout: float) -> float:
    """Delete every custom resource (group, version, plural) in ns, their children by garbage collection, and wait
    until no Job and no pod is left in ns; returns the seconds taken. Run between the kubetune and the Kubeflow
    phases, so the second one starts on a cluster as empty as the first one did."""
    from kubernetes import client

    t0 = time.monotonic()
    client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(*resource[:2], ns, resource[2],
                                                                           propagation_policy="Background")
    if wait_until_empty(api, ns, t0 + timeout, delete_jobs=False):
        return round(time.monotonic() - t0, 1)
    raise RuntimeError(f"jobs or pods of {ns} still there {timeout}s after deleting its {resource[2]}")


def drain_namespace(api: Any, ns: str, timeout: float) -> float:
    """Delete every Job in ns (pods with them) and wait until no pod is left; returns the seconds taken."""
    t0 = time.monotonic()
    if wait_until_empty(api, ns, t0 + timeout, delete_jobs=True):
        return round(time.monotonic() - t0, 1)
    raise RuntimeError(f"pods of {ns} still there after {timeout}s")


def wait_until_empty(api: Any, ns: str, deadline: float, delete_jobs: bool) -> bool:
    """Poll until ns has no Job and no pod (True), or time.monotonic() passes deadline (False). With delete_jobs,
    the Jobs still there are deleted a page at a time: one collection delete of 10,000 Jobs outlasts the
    apiserver's request timeout."""
    from kubernetes import client

    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    while time.monotonic() < deadline:
        if batch.list_namespaced_job(ns, limit=1).items:
            if delete_jobs:
                batch.delete_collection_namespaced_job(ns, propagation_policy="Background", limit=DRAIN_PAGE,
                                                       _preload_content=False).data
                continue
        elif not core.list_namespaced_pod(ns, limit=1).items:
            return True
        time.sleep(1.0)
    return False


def defaulted_spec(api: Any) -> dict[str, Any]:
    """FTJ_SPEC with the CRD's defaults applied by the apiserver (dry-run create)."""
    from kubernetes import client

    obj = ftj_manifest("defaults")
    obj["metadata"]["namespace"] = DIRECT_NS
    out = client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, DIRECT_NS, PLURAL, obj,
                                                                       dry_run="All")
    return out["spec"]


# ------------------------------------------------------------------------------------------ phases

def run_baseline(cluster: Any, api: Any, n: int, concurrency: int, spec_dict: dict, timeout: float,
                 ns: str = DIRECT_NS, suspend: bool = True) -> dict:
    """Create n plain Jobs directly in ns; time until the watch saw them all. Suspended Jobs cost the
    apiserver one write each; running ones also bring their pods (scheduling, KWOK status, Events), as the
    operator's Jobs do."""
    from kubernetes import client

    template = baseline_job(cluster, spec_dict, suspend)
    batch = client.BatchV1Api(api)
    watcher = Watcher(api, f"/apis/batch/v1/namespaces/{ns}/jobs")
    watcher.start()
    watcher.ready.wait(60)
    before = request_totals(cluster)
    cpu_before = cpu_by_process(cluster)

    def create(i: int) -> None:
        body = json.loads(json.dumps(template))
        body["metadata"]["name"] = f"direct-{i:05d}-trainer"
        body["metadata"]["namespace"] = ns
        batch.create_namespaced_job(ns, body, _preload_content=False).data

    t0, t_return, errors = create_all(n, concurrency, create)
    ok = watcher.wait_until(lambda w: len(w.added) >= n, timeout)
    after = request_totals(cluster)
    cpu_after = cpu_by_process(cluster)
    watcher.stopping = True
    t_end = max(watcher.added.values()) if watcher.added else time.time()
    wall = t_end - t0
    requests = counter_delta(after, before)
    return {"jobs": n, "suspended": suspend, "created": len(watcher.added), "complete": ok, "errors": errors[:10],
            "error_count": len(errors), "wall_s": round(wall, 3), "client_return_s": round(t_return - t0, 3),
            "throughput_per_s": round(n / wall, 2) if wall > 0 else None,
            "apiserver_requests": requests, **request_rates(requests, n, wall),
            "cpu_s_by_process": cpu_delta(cpu_after, cpu_before)}


def request_rates(requests: dict[str, int], n: int, wall: float) -> dict[str, float | None]:
    """Apiserver requests per job and per second over a phase (the apiserver's load, whoever sent them)."""
    total = requests.get("TOTAL", 0)
    return {"apiserver_requests_per_job": round(total / n, 2) if n else None,
            "apiserver_requests_per_s": round(total / wall, 1) if wall > 0 else None}


def completion_lags(pods: Watcher, jobs: Watcher, names: list[str], owner_of: Callable[[str], str]) -> list[float]:
    """Per job: seconds from its last pod's Succeeded/Failed (as the watch saw it) to the job's own terminal
    phase: what the controllers add after the training processes exit."""
    with pods.lock:
        pod_done: dict[str, float] = {}
        for pod, at in pods.finished_at.items():
            owner = (pods.last.get(pod) or {}).get("owner") or ""
            pod_done[owner] = max(pod_done.get(owner, 0.0), at)
    return [jobs.finished_at[nm] - pod_done[owner_of(nm)] for nm in names
            if nm in jobs.finished_at and owner_of(nm) in pod_done]


def spread(values: list[float], quantiles: tuple[int, ...] = (50, 99)) -> dict[str, float]:
    """The given percentiles (p50, p99, ...), the max, and how many values there were: per-job latencies and lags."""
    out: dict[str, float] = {f"p{q}": round(percentile(values, q), 3) for q in quantiles}
    return {**out, "max": round(max(values, default=0), 3), "samples": len(values)}


def drive_to_completion(api: Any, pods: Watcher, ftjs: Watcher, names: list[str], concurrency: int,
                        timeout: float, ns: str = FTJ_NS, owner_of: Callable[[str], str] = lambda nm: nm) -> dict:
    """Complete every Running trainer pod in ns (KWOK) until every job watched by `ftjs` (FineTuneJobs, or
    TrainJobs with a digest of the same shape) is Succeeded or Failed."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    patched: set[str] = set()
    errors: list[str] = []
    t0 = time.time()
    deadline = time.monotonic() + timeout

    def complete(name: str) -> None:
        core.patch_namespaced_pod(name, ns, {"metadata": {"annotations": {
            COMPLETE_ANNOTATION: "succeeded", "kwok.kubetune.io/exit-code": "0"}}}, _preload_content=False)

    def terminal(w: Watcher) -> bool:
        return all(w.state.get(n, {}).get("phase") in ("Succeeded", "Failed") for n in names)

    with cf.ThreadPoolExecutor(concurrency) as pool:
        while running(deadline):
            with pods.lock:
                todo = [n for n, d in pods.state.items()
                        if d["phase"] == "Running" and not d["completing"] and not d["deleting"] and n not in patched]
            futures = {pool.submit(complete, n): n for n in todo}
            for fut in cf.as_completed(futures):
                if fut.exception() is not None:
                    errors.append(f"{futures[fut]}: {fut.exception()}"[:300])
                else:
                    patched.add(futures[fut])
            if ftjs.wait_until(terminal, 0.5 if todo else 1.0):
                break
    done = time.time()
    phases = Counter(ftjs.state.get(n, {}).get("phase") or "?" for n in names)
    return {"wall_s": round(done - t0, 3), "pods_completed": len(patched), "phases": dict(phases),
            "pod_to_job_done_s": spread(completion_lags(pods, ftjs, names, owner_of)),
            "all_succeeded": phases.get("Succeeded", 0) == len(names), "errors": errors[:10],
            "error_count": len(errors)}


def events_by_source(api: Any, ns: str) -> dict[str, int]:
    """Events in ns counted by "<reporting component> <reason>" (who writes the `POST events` requests)."""
    from kubernetes import client

    items = client.CoreV1Api(api).list_namespaced_event(ns).items
    counts = Counter(f"{e.reporting_component or (e.source.component if e.source else '') or '?'} {e.reason}"
                     for e in items)
    return dict(counts.most_common())


def node_health(api: Any) -> dict[str, int]:
    """How often the simulated nodes were taken for dead: NodeNotReady Events, and pods the taint manager
    evicted from NotReady nodes (both mean KWOK's lease renewals fell behind the controller-manager's grace)."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    node_events = Counter(e.reason for e in core.list_namespaced_event("default").items)
    evictions = sum(1 for e in core.list_event_for_all_namespaces(field_selector="reason=TaintManagerEviction").items
                    if (e.message or "").startswith("Marking for deletion"))
    return {"node_not_ready_events": node_events.get("NodeNotReady", 0), "taint_manager_evictions": evictions}


def first_pod_times(pods: Watcher) -> dict[str, float]:
    """Owner (Job or JobSet name) -> when the watch first saw one of its pods (deleted since or not)."""
    out: dict[str, float] = {}
    with pods.lock:
        for name, seen in pods.added.items():
            owner = (pods.last.get(name) or {}).get("owner")
            if owner:
                out[owner] = min(seen, out.get(owner, seen))
    return out


def wait_for_pods(pods: Watcher, owners: list[str], deadline: float, alive: Callable[[], bool]) -> bool:
    """Until every owner has had a pod (or the deadline passes, or `alive()` turns false). Had, not has: while
    the fleet is oversubscribed, jobs keep moving (a moved job's pod is deleted before its new Job's pod is
    created), and at 10,000 jobs there was no moment at which every job had one."""
    wanted = set(owners)

    def every_owner(w: Watcher) -> bool:
        return wanted <= {d.get("owner") for d in w.last.values()}
    while running(deadline) and alive():
        if pods.wait_until(every_owner, 1.0):
            return True
    return False


def to_pods_summary(*, names: list[str], owner_of: Callable[[str], str], applied: Watcher, pods: Watcher, t0: float,
                    complete: bool, requests: dict[str, int], cpu: dict[str, Any], controllers: list[str]) -> dict:
    """One side of the peer comparison, from the start of creation until every job's pods exist: throughput,
    apply -> first pod latency (watch event times), apiserver requests and CPU per job."""
    from peer_kubeflow import cpu_per_job

    first_pod = first_pod_times(pods)
    latencies = [first_pod[owner_of(nm)] - applied.added[nm] for nm in names
                 if owner_of(nm) in first_pod and nm in applied.added]
    last = max((first_pod[owner_of(nm)] for nm in names if owner_of(nm) in first_pod), default=None)
    wall = (last - t0) if last else 0.0
    n = len(names)
    return {"complete": complete, "with_pods": len(latencies), "wall_s": round(wall, 3),
            "throughput_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
            "latency_s": spread(latencies, (50, 95, 99)),
            "apiserver_requests": requests, **request_rates(requests, n, wall),
            "cpu_s_by_process": cpu, "controllers": controllers,
            "cpu_s_per_job": cpu_per_job(cpu, controllers, n)}


class ApiserverProfile(threading.Thread):
    """Fetch a CPU profile of kube-apiserver (/debug/pprof/profile, admin client certificate) into `path`
    while the phase it was started in runs."""

    def __init__(self, cluster: Any, path: Path, seconds: float) -> None:
        super().__init__(daemon=True, name="apiserver-profile")
        self.url = f"{cluster.server}/debug/pprof/profile?seconds={int(seconds)}"
        self.context, self.path, self.seconds = ssl_context(cluster), path, seconds
        self.error = ""

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, context=self.context, timeout=self.seconds + 60) as r:
                data = r.read()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(data)
        except Exception as exc:  # recorded in the result, the benchmark goes on
            self.error = f"{type(exc).__name__}: {exc}"

    def result(self, binary: Path) -> dict[str, Any]:
        """Wait for the profile; summarise it by PROFILE_CATEGORIES when `go` is on PATH."""
        self.join(self.seconds + 90)
        out: dict[str, Any] = {"path": str(self.path), "seconds": self.seconds}
        if self.error or not self.path.is_file():
            out["error"] = self.error or "no profile was written"
            return out
        out["bytes"] = self.path.stat().st_size
        go = shutil.which("go")
        if not go:
            out["summary_error"] = "go is not on PATH: summarise with go tool pprof -top"
            return out
        # Go 1.24+ builds `go tool pprof` on first use (over 2 minutes on a busy 2-core machine): once, untimed per
        # category.
        subprocess.run([go, "tool", "pprof", "-h"], capture_output=True, timeout=900)
        shares: dict[str, float] = {}
        for name, regex in PROFILE_CATEGORIES.items():
            proc = subprocess.run([go, "tool", "pprof", "-top", "-nodecount=1000000", "-nodefraction=0", f"-focus={regex}",
                                   str(binary), str(self.path)], capture_output=True, text=True, timeout=120)
            parsed = parse_pprof_seconds(proc.stdout + proc.stderr)
            if parsed is None:
                out["summary_error"] = f"go tool pprof: {(proc.stderr or proc.stdout)[-300:]}"
                return out
            out["total_cpu_s"] = round(parsed[1], 2)
            shares[name] = round(parsed[0] / parsed[1], 4) if parsed[1] else 0.0
        out["share_by_category"] = shares
        return out


def run_kubetune(cluster: Any, api: Any, n: int, concurrency: int, timeout: float, workdir: Path,
                 operator_args: list[str], services_expected: int,
                 profile: tuple[Path, float] | None = None, clear: bool = False) -> dict:
    """Start the operator, create n FineTuneJobs, time children + status.plan, then completion. `clear`: delete
    the FineTuneJobs and wait until their pods are gone before the operator stops (another phase follows)."""
    from kubernetes import client

    from kubetune_dev.operator_process import OperatorProcess

    objects = client.CustomObjectsApi(api)
    ftjs = Watcher(api, f"/apis/{GROUP}/{VERSION}/namespaces/{FTJ_NS}/{PLURAL}", ftj_digest)
    jobs = Watcher(api, f"/apis/batch/v1/namespaces/{FTJ_NS}/jobs", job_digest, label_selector=MANAGED)
    cms = Watcher(api, f"/api/v1/namespaces/{FTJ_NS}/configmaps", label_selector=MANAGED)
    svcs = Watcher(api, f"/api/v1/namespaces/{FTJ_NS}/services", label_selector=MANAGED)
    pods = Watcher(api, f"/api/v1/namespaces/{FTJ_NS}/pods", pod_digest, label_selector=MANAGED)
    for w in (ftjs, jobs, cms, svcs, pods):
        w.start()
        w.ready.wait(60)

    log_path = workdir / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, ["--namespace", FTJ_NS, "--metrics-port", "0", "--liveness-port", "0",
                                              *operator_args], log_path)
    op.start()
    try:
        if "--no-leader-election" not in operator_args:
            op.wait_for_log("leading as", timeout=600)  # slow with --trace-memory
        time.sleep(3.0)  # let kopf start its watches
        cpu0 = proc_cpu_seconds(op.pid)
        rss = RssSampler(op.pid)
        rss.start()
        rss_idle = proc_status_kib(op.pid, "VmRSS")
        before = request_totals(cluster)
        t_before = time.time()
        cpu_before = cpu_by_process(cluster, {"operator": op.pid})
        names = [f"ftj-{i:05d}" for i in range(n)]

        def create(i: int) -> None:
            objects.create_namespaced_custom_object(GROUP, VERSION, FTJ_NS, PLURAL, ftj_manifest(names[i]),
                                                    _preload_content=False)

        profiler = ApiserverProfile(cluster, *profile) if profile else None
        if profiler:
            profiler.start()
        t0, t_return, errors = create_all(n, concurrency, create)

        def all_children(_: Watcher) -> bool:
            return (len(jobs.added) >= n and len(cms.added) >= n and len(svcs.added) >= services_expected
                    and sum(1 for d in ftjs.state.values() if d["plan"]) >= n)

        deadline = time.monotonic() + timeout
        ok = False
        while running(deadline) and op.alive():
            if jobs.wait_until(all_children, 1.0) and all_children(jobs):
                ok = True
                break
        t_children = time.time()
        t_jobs = max(jobs.added.values()) if jobs.added else t_children
        t_ready = max([t_jobs, max(cms.added.values(), default=t0), max(svcs.added.values(), default=t0)])
        after = request_totals(cluster)
        t_after = time.time()
        cpu_after = cpu_by_process(cluster, {"operator": op.pid})
        cpu1 = proc_cpu_seconds(op.pid) if op.alive() else float("nan")
        # The peer comparison's window: until every FineTuneJob's trainer pod exists (measured as for TrainJobs).
        pods_ok = ok and wait_for_pods(pods, [f"{nm}-trainer" for nm in names], deadline, op.alive)
        to_pods = to_pods_summary(names=names, owner_of=lambda nm: f"{nm}-trainer", applied=ftjs, pods=pods, t0=t0,
                                  complete=pods_ok, requests=counter_delta(request_totals(cluster), before),
                                  cpu=cpu_delta(cpu_by_process(cluster, {"operator": op.pid}), cpu_before),
                                  controllers=["operator"])
        latencies = [jobs.added[f"{nm}-trainer"] - ftjs.added[nm] for nm in names
                     if f"{nm}-trainer" in jobs.added and nm in ftjs.added]
        with_plan = sum(1 for nm in names if ftjs.state.get(nm, {}).get("plan"))
        lost = [nm for nm in names if f"{nm}-trainer" not in jobs.added or not ftjs.state.get(nm, {}).get("plan")]
        wall = t_jobs - t0
        requests = counter_delta(after, before)
        creation = {
            "jobs": n, "complete": ok, "create_errors": errors[:10], "create_error_count": len(errors),
            "client_return_s": round(t_return - t0, 3), "wall_to_last_job_s": round(wall, 3),
            "wall_to_all_children_and_plan_s": round(max(t_ready, t_children if ok else t_ready) - t0, 3),
            "throughput_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
            "latency_s": spread(latencies, (50, 95, 99)),
            "with_jobs": len(jobs.added), "with_configmaps": len(cms.added), "with_services": len(svcs.added),
            "with_plan": with_plan, "lost": lost[:20], "lost_count": len(lost),
            "phases": dict(Counter(ftjs.state.get(nm, {}).get("phase") or "?" for nm in names)),
            "operator_cpu_s": round(cpu1 - cpu0, 2),
            "apiserver_requests": requests,
            **request_rates(requests, n, wall),
            "services_expected": services_expected,
            "cpu_s_by_process": cpu_delta(cpu_after, cpu_before),
            "to_pods": to_pods,
        }
        if profiler:
            creation["apiserver_profile"] = profiler.result(cluster.bin_dir / "kube-apiserver")
        creation["operator_rss_peak_mib"] = rss.mark()
        completion = (drive_to_completion(api, pods, ftjs, names, concurrency, timeout,
                                          owner_of=lambda nm: f"{nm}-trainer") if ok else {"skipped": True})
        completion["operator_rss_peak_mib"] = rss.mark()
        # Where the lag after the pods goes: the Job controller deciding the trainer Job, then the operator.
        trainer_jobs = [f"{nm}-trainer" for nm in names]
        completion["pod_to_trainer_job_done_s"] = spread(completion_lags(pods, jobs, trainer_jobs, lambda j: j))
        completion["trainer_job_done_to_ftj_done_s"] = spread([
            ftjs.finished_at[nm] - jobs.finished_at[f"{nm}-trainer"] for nm in names
            if nm in ftjs.finished_at and f"{nm}-trainer" in jobs.finished_at])
        rss.stopping = True
        completion["apiserver_requests"] = counter_delta(request_totals(cluster), after)
        t_end = time.time()
        by_client = audited_requests(cluster, [(t_before, t_after), (t_after, t_end)])
        if by_client is not None:
            creation["apiserver_requests_by_client"], completion["apiserver_requests_by_client"] = by_client
        alive = op.alive()
        creation["operator_peak_rss_mib"] = round(proc_status_kib(op.pid, "VmHWM") / 1024, 1) if alive else None
        operator = {"alive_at_end": alive, "idle_rss_mib": round(rss_idle / 1024, 1),
                    "peak_rss_mib": creation["operator_peak_rss_mib"],
                    "rss_timeline_mib": rss.timeline,
                    "cpu_s_total": round(proc_cpu_seconds(op.pid) - cpu0, 2) if alive else None,
                    "log_errors": sum(1 for line in op.log_text().splitlines() if " ERROR " in line),
                    "log_error_samples": [line[:300] for line in op.log_text().splitlines() if " ERROR " in line][:5],
                    "args": operator_args}
        failed = [(nm, ftjs.state[nm]["reason"], ftjs.state[nm]["message"]) for nm in names
                  if ftjs.state.get(nm, {}).get("phase") == "Failed"][:5]
        completion["failed_samples"] = failed
        completion["events_by_source"] = events_by_source(api, FTJ_NS)
        out = {"creation": creation, "completion": completion, "operator": operator,
               "controller_peak_rss_mib": operator["peak_rss_mib"],
               "watch_errors": sum(len(w.errors) for w in (ftjs, jobs, cms, svcs, pods))}
        if clear:
            out["cleared_s"] = clear_workloads(api, FTJ_NS, (GROUP, VERSION, PLURAL), timeout)
        return out
    finally:
        for w in (ftjs, jobs, cms, svcs, pods):
            w.stopping = True
        op.stop()


def create_runtime(api: Any, runtime: dict, timeout: float = 60.0) -> None:
    """Create the ClusterTrainingRuntime, retrying while the Trainer's validating webhook is not reachable yet."""
    from kubernetes import client

    objects = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while True:
        try:
            objects.create_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes",
                                                 runtime)
            return
        except client.ApiException as exc:
            if exc.status == 409:
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_kubeflow(cluster: Any, api: Any, n: int, concurrency: int, timeout: float, spec_dict: dict,
                 clear: bool = False) -> dict:
    """Start the Kubeflow Trainer and JobSet managers, create n TrainJobs of a ClusterTrainingRuntime equivalent
    to the benchmark's kubetune Job, time until every TrainJob's pod exists, then drive the pods to Succeeded
    (KWOK) and time until every TrainJob is Complete. Measured as the kubetune phase is. `clear`: delete the
    TrainJobs and wait until their pods are gone before the managers stop (another phase follows)."""
    from kubernetes import client

    from kubetune_dev.devcluster.kubeflow import JOBSET_NAME, TRAINER_NAME, build_kubeflow, start_kubeflow
    from peer_kubeflow import JOBSET_NAME_LABEL, runtime_from_job, trainjob_digest, trainjob_manifest

    t_build = time.monotonic()
    build_dir = build_kubeflow()
    build_s = round(time.monotonic() - t_build, 1)
    create_namespace(api, KUBEFLOW_NS)
    peer = start_kubeflow(cluster, build_dir)
    controllers = [TRAINER_NAME, JOBSET_NAME]
    plural = "trainjobs"
    trainjobs = Watcher(api, f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{KUBEFLOW_NS}/{plural}",
                        trainjob_digest)
    jobsets = Watcher(api, f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{KUBEFLOW_NS}/jobsets")
    jobs = Watcher(api, f"/apis/batch/v1/namespaces/{KUBEFLOW_NS}/jobs", label_selector=JOBSET_NAME_LABEL)
    pods = Watcher(api, f"/api/v1/namespaces/{KUBEFLOW_NS}/pods", pod_digest, label_selector=JOBSET_NAME_LABEL)
    watchers = (trainjobs, jobsets, jobs, pods)
    try:
        runtime = runtime_from_job(baseline_job(cluster, spec_dict, suspend=False))
        create_runtime(api, runtime)
        peer.wait_webhooks(KUBEFLOW_NS)
        for w in watchers:
            w.start()
            w.ready.wait(60)
        time.sleep(3.0)  # as for the operator: let the managers' informers settle
        pids = peer.pids
        rss = {name: RssSampler(pid) for name, pid in pids.items()}
        for sampler in rss.values():
            sampler.start()
        idle_rss = {name: round(proc_status_kib(pid, "VmRSS") / 1024, 1) for name, pid in pids.items()}
        log_errors_before = {k: len(v) for k, v in peer.log_error_lines().items()}
        before = request_totals(cluster)
        cpu_before = cpu_by_process(cluster)
        names = [f"tj-{i:05d}" for i in range(n)]
        objects = client.CustomObjectsApi(api)

        def create(i: int) -> None:
            objects.create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", KUBEFLOW_NS, plural,
                trainjob_manifest(names[i], KUBEFLOW_NS, f"s3://bench/outputs/{names[i]}"), _preload_content=False)

        def alive() -> bool:
            return all(cluster.procs.get(name).proc.poll() is None for name in controllers)

        t0, t_return, errors = create_all(n, concurrency, create)
        deadline = time.monotonic() + timeout
        pods_ok = wait_for_pods(pods, names, deadline, alive)
        to_pods = to_pods_summary(names=names, owner_of=lambda nm: nm, applied=trainjobs, pods=pods, t0=t0,
                                  complete=pods_ok, requests=counter_delta(request_totals(cluster), before),
                                  cpu=cpu_delta(cpu_by_process(cluster), cpu_before), controllers=controllers)
        after = request_totals(cluster)
        with_pods = set(first_pod_times(pods))
        lost = [nm for nm in names if nm not in with_pods]
        creation = {"jobs": n, "create_errors": errors[:10], "create_error_count": len(errors),
                    "client_return_s": round(t_return - t0, 3), "with_jobsets": len(jobsets.added),
                    "with_jobs": len(jobs.added), "lost": lost[:20], "lost_count": len(lost), "to_pods": to_pods,
                    "controllers_rss_peak_mib": {name: r.mark() for name, r in rss.items()}}
        completion = (drive_to_completion(api, pods, trainjobs, names, concurrency, timeout, ns=KUBEFLOW_NS)
                      if pods_ok else {"skipped": True})
        completion["controllers_rss_peak_mib"] = {name: r.mark() for name, r in rss.items()}
        completion["apiserver_requests"] = counter_delta(request_totals(cluster), after)
        for sampler in rss.values():
            sampler.stopping = True
        up = alive()
        peak = {name: round(proc_status_kib(pid, "VmHWM") / 1024, 1) for name, pid in pids.items()} if up else {}
        log_errors = {k: v[log_errors_before.get(k, 0):] for k, v in peer.log_error_lines().items()}
        failed = [(nm, trainjobs.state[nm]["reason"], trainjobs.state[nm]["message"]) for nm in names
                  if trainjobs.state.get(nm, {}).get("phase") == "Failed"][:5]
        completion["failed_samples"] = failed
        completion["events_by_source"] = events_by_source(api, KUBEFLOW_NS)
        out = {"creation": creation, "completion": completion,
                "controllers": {"alive_at_end": up, "idle_rss_mib": idle_rss, "peak_rss_mib": peak,
                                "start_s": peer.timings.get("start_s"), "build_s": build_s,
                                "log_errors": sum(len(v) for v in log_errors.values()),
                                "log_error_samples": [log_error_digest(line) for v in log_errors.values()
                                                      for line in v][:5]},
                "controller_peak_rss_mib": round(sum(peak.values()), 1) if peak else None,
                "runtime": RUNTIME_NOTE, "watch_errors": sum(len(w.errors) for w in watchers)}
        if clear:
            out["cleared_s"] = clear_workloads(api, KUBEFLOW_NS, ("trainer.kubeflow.org", "v1alpha1", plural),
                                               timeout)
        return out
    finally:
        for w in watchers:
            w.stopping = True
        peer.stop()


def log_error_digest(line: str) -> str:
    """A manager's error log line, short: message, object and error of a zap JSON line, else the line's start."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line[:300]
    return " ".join(str(entry.get(k, "")) for k in ("msg", "controller", "name", "error"))[:400]


RUNTIME_NOTE = ("ClusterTrainingRuntime with one 'node' replicated Job: the kubetune trainer pod of this run "
                "(image, command, env, GPU/CPU/memory requests, node selector, tolerations) without the plan "
                "ConfigMap; mlPolicy numNodes 1 (plain ML policy)")


# ------------------------------------------------------------------------------------------ report

def table(result: dict) -> str:
    """The printed summary."""
    b, br, c = result["baseline"], result["baseline_running"], result["kubetune"]["creation"]
    comp, op = result["kubetune"]["completion"], result["kubetune"]["operator"]
    rows = [
        ("fleet", f"{result['nodes']} KWOK nodes, {result['gpus']} GPUs"),
        ("jobs / client concurrency", f"{result['jobs']} / {result['concurrency']}"),
    ]
    if "skipped" in b:
        rows.append(("direct-Job baselines", f"skipped ({b['skipped']})"))
    else:
        rows += [
            ("direct Jobs/s, suspended (baseline)", f"{b['throughput_per_s']}  ({b['wall_s']} s)"),
            ("direct Jobs/s, running (pods too)", f"{br['throughput_per_s']}  ({br['wall_s']} s)"),
        ]
    rows.append(("kubetune FTJ->Job/s", f"{c['throughput_per_s']}  ({c['wall_to_last_job_s']} s)"))
    if "skipped" not in b:
        rows += [
            ("ratio kubetune/direct suspended", f"{result['ratio']}  (target >= 0.5)"),
            ("ratio kubetune/direct running", f"{result['ratio_vs_running_jobs']}"),
            ("apiserver req/job, req/s", f"suspended {b['apiserver_requests_per_job']}, "
                                         f"{b['apiserver_requests_per_s']}; running {br['apiserver_requests_per_job']}, "
                                         f"{br['apiserver_requests_per_s']}; kubetune {c['apiserver_requests_per_job']}, "
                                         f"{c['apiserver_requests_per_s']}"),
        ]
    rows += [
        ("all children + status.plan", f"{c['wall_to_all_children_and_plan_s']} s"),
        ("apply->Job latency p50/p95/p99", f"{c['latency_s']['p50']} / {c['latency_s']['p95']} / "
                                           f"{c['latency_s']['p99']} s"),
        ("all FTJs Succeeded after", f"{comp.get('wall_s')} s  (phases {comp.get('phases')})"),
        ("last pod done -> FTJ done p50/p99", f"{comp.get('pod_to_job_done_s', {}).get('p50')} / "
                                              f"{comp.get('pod_to_job_done_s', {}).get('p99')} s  (pod -> Job "
                                              f"{comp.get('pod_to_trainer_job_done_s', {}).get('p50')}, Job -> "
                                              f"FTJ {comp.get('trainer_job_done_to_ftj_done_s', {}).get('p50')} "
                                              "at p50)"),
        ("operator peak RSS", f"{op['peak_rss_mib']} MiB  (idle {op['idle_rss_mib']} MiB; creation "
                              f"{c.get('operator_rss_peak_mib')}, completion {comp.get('operator_rss_peak_mib')}; "
                              "target < 300)"),
        ("operator CPU (creation/total)", f"{c['operator_cpu_s']} s / {op['cpu_s_total']} s"),
        ("CPU s by process (creation phases)", "; ".join(
            f"{label}: " + ", ".join(f"{k}={v}" for k, v in phase.get("cpu_s_by_process", {}).items())
            for label, phase in (("suspended", b), ("kubetune", c)) if "skipped" not in phase)),
        ("apiserver requests (creation)", f"{c['apiserver_requests'].get('TOTAL')} "
                                          f"({c['apiserver_requests'].get('TOTAL', 0) / max(1, result['jobs']):.1f}/job)"),
        ("errors / lost jobs", f"create {c['create_error_count']}, operator log {op['log_errors']}, "
                               f"complete {comp.get('error_count', 0)} / lost {c['lost_count']}"),
        ("node health", f"{result.get('node_health', {}).get('node_not_ready_events', '?')} NodeNotReady events, "
                        f"{result.get('node_health', {}).get('taint_manager_evictions', '?')} pods evicted "
                        f"(node lease {result.get('node_lease_seconds', 40)} s)"),
        ("load average before/after", f"{result['loadavg_before']} / {result['loadavg_after']}"),
    ]
    peer = result.get("kubeflow")
    if peer and "skipped" in peer:
        rows.append(("Kubeflow Trainer peer", f"skipped: {peer['skipped']}"))
    elif peer:
        rows.extend(peer_rows(result, peer))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    top = list(c["apiserver_requests"].items())[:8]
    lines.append("apiserver requests by verb/resource (creation phase): "
                 + ", ".join(f"{k}={v}" for k, v in top if k != "TOTAL"))
    for label, phase in (("creation", c), ("completion", comp)):
        if phase.get("apiserver_requests_by_client"):
            lines.append(f"apiserver requests by client ({label} phase, audit log): " + "; ".join(
                f"{client} {counts['TOTAL']} (" + ", ".join(f"{k}={v}" for k, v in counts.items() if k != "TOTAL")
                + ")" for client, counts in list(phase["apiserver_requests_by_client"].items())[:6]))
    prof = c.get("apiserver_profile")
    if prof:
        shares = prof.get("share_by_category")
        detail = (", ".join(f"{k} {v:.1%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
                  if shares else prof.get("error") or prof.get("summary_error", ""))
        lines.append(f"apiserver CPU profile ({prof['path']}, {prof.get('total_cpu_s', '?')} CPU s): {detail}")
    return "\n".join(lines)


def peer_rows(result: dict, peer: dict) -> list[tuple[str, str]]:
    """Table rows of the Kubeflow Trainer comparison: both sides and kubetune/Kubeflow for each figure."""
    kt, kf = result["kubetune"]["creation"]["to_pods"], peer["creation"]["to_pods"]
    pc, ctl = peer["creation"], peer["controllers"]
    rows = [
        ("Kubeflow TrainJob->pod/s", f"{kf['throughput_per_s']}  ({kf['wall_s']} s; kubetune FTJ->pod/s "
                                     f"{kt['throughput_per_s']}, {kt['wall_s']} s)"),
        ("Kubeflow apply->pod p50/p99", f"{kf['latency_s']['p50']} / {kf['latency_s']['p99']} s  (kubetune "
                                        f"{kt['latency_s']['p50']} / {kt['latency_s']['p99']} s)"),
        ("Kubeflow CPU s/job ctl/apiserver/etcd", " / ".join(str(v) for v in kf["cpu_s_per_job"].values())
         + "  (kubetune " + " / ".join(str(v) for v in kt["cpu_s_per_job"].values()) + ")"),
        ("cores busy: run / whole host", f"Kubeflow {kf['cpu_s_by_process'].get('cores_busy')} / "
                                         f"{kf['cpu_s_by_process'].get('host_cores_busy')}; kubetune "
                                         f"{kt['cpu_s_by_process'].get('cores_busy')} / "
                                         f"{kt['cpu_s_by_process'].get('host_cores_busy')}"),
        ("Kubeflow apiserver req/job", f"{kf['apiserver_requests_per_job']}  (kubetune "
                                       f"{kt['apiserver_requests_per_job']})"),
        ("Kubeflow controllers peak RSS", f"{peer['controller_peak_rss_mib']} MiB  {ctl['peak_rss_mib']}"),
        ("Kubeflow all TrainJobs Complete after", f"{peer['completion'].get('wall_s')} s  "
                                                  f"(phases {peer['completion'].get('phases')})"),
        ("Kubeflow errors / lost", f"create {pc['create_error_count']}, manager logs {ctl['log_errors']}, "
                                   f"complete {peer['completion'].get('error_count', 0)} / lost {pc['lost_count']}"),
    ]
    for key, r in result.get("peer_ratios", {}).items():
        verdict = {True: "kubetune at least as good", False: "kubetune worse", None: "n/a"}[
            r["kubetune_at_least_as_good"]]
        rows.append((f"ratio kubetune/Kubeflow {key}", f"{r['ratio']}  ({verdict})"))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON result, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=250)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16, help="client threads creating objects (both phases)")
    p.add_argument("--quick", action="store_true", help="20 nodes, 50 jobs (smoke test)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per phase")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/...)")
    p.add_argument("--apiserver-profile", type=Path, default=None, metavar="FILE",
                   help="write a CPU profile of kube-apiserver, taken from the start of the FineTuneJob creation "
                        "phase, to FILE, and record its share by category (needs `go` to summarise)")
    p.add_argument("--apiserver-profile-seconds", type=float, default=45.0)
    p.add_argument("--audit", action="store_true",
                   help="keep the apiserver's audit log and count each phase's requests by client (user agent): "
                        "the operator, kopf, each controller of the controller-manager, KWOK, this client")
    p.add_argument("--operator-arg", action="append", default=[],
                   help="extra flag for `kubetune operator` (repeatable)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the direct-Job baselines (at 10,000 jobs they take ~13 min before the operator starts)")
    p.add_argument("--peer", choices=("kubeflow", "none"), default="kubeflow",
                   help="after the kubetune phase, run the same number of Kubeflow Trainer v2 TrainJobs on the same "
                        "fleet and compare (built from devcluster/kubeflow/go.mod; skipped with a reason without go)")
    p.add_argument("--node-lease-seconds", type=int, default=40,
                   help="KWOK node lease (renewed every quarter of it; the controller-manager's NotReady grace is "
                        "1.25x); 40 is a kubelet's. At 1,000 nodes, 240 cuts lease renewals from ~100/s to ~17/s")
    p.add_argument("--peer-order", choices=("after", "before"), default="after",
                   help="run the Kubeflow Trainer phase after (default) or before the kubetune phase")
    args = p.parse_args(argv)
    signal.signal(signal.SIGUSR1, lambda *_: STOP.set())
    if args.quick:
        args.nodes, args.jobs = 20, 50
    from kubetune_dev.devcluster import Cluster, ClusterOptions, generate_fleet
    from kubetune_dev.operator_process import install_crds

    fleet = generate_fleet(args.nodes)
    out = args.out or RESULTS_DIR / f"operator_scale-{'quick' if args.quick else f'{args.nodes}n-{args.jobs}j'}.json"
    result: dict[str, Any] = {
        "benchmark": "operator_scale", "command": " ".join(["bench/operator_scale.py", *(argv or sys.argv[1:])]),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nodes": len(fleet.node_names), "gpus": fleet.total_gpus, "jobs": args.jobs,
        "concurrency": args.concurrency, "quick": args.quick, "host": {"cpus": os.cpu_count(),
                                                                        "python": platform.python_version()},
        "loadavg_before": loadavg(),
        "note": "2-core machine shared with other processes: absolute numbers are noisy; the ratio is measured "
                "in the same run. Operator reads /progress from 127.0.0.1:<closed port> because KWOK pod IPs "
                "are not routable here.",
    }
    t_start = time.time()
    closed_port = _closed_port()
    # KWOK pods run no preflight (it is a CPU process on real nodes): the benchmark measures the trainer Job path.
    operator_args = ["--progress-host", "127.0.0.1", "--progress-port", str(closed_port), "--no-preflight",
                     *args.operator_arg]
    result["node_lease_seconds"] = args.node_lease_seconds
    with Cluster(ClusterOptions(fleet=fleet, apiserver_profiling=args.apiserver_profile is not None,
                                node_lease_seconds=args.node_lease_seconds, audit=args.audit)) as cluster:
        result["cluster_start_s"] = round(cluster.timings.get("all_ready_s", 0), 2)
        install_crds(cluster.kubectl)
        api = make_api(cluster, args.concurrency + 8)
        create_namespace(api, DIRECT_NS)
        create_namespace(api, FTJ_NS)
        spec_dict = defaulted_spec(api)
        if args.no_baseline:
            result["baseline"] = result["baseline_running"] = {"skipped": "--no-baseline"}
        else:
            result["baseline"] = run_baseline(cluster, api, args.jobs, args.concurrency, spec_dict, args.timeout)
            create_namespace(api, DIRECT_RUNNING_NS)
            result["baseline_running"] = run_baseline(cluster, api, args.jobs, args.concurrency, spec_dict,
                                                      args.timeout, ns=DIRECT_RUNNING_NS, suspend=False)
            result["baseline_running"]["drain_s"] = drain_namespace(api, DIRECT_RUNNING_NS, args.timeout)
        workdir = Path(cluster.work_dir)
        pods = bench_layout_pods(cluster, spec_dict)
        peer_first = args.peer == "kubeflow" and args.peer_order == "before" and shutil.which("go") is not None
        peer_after = args.peer == "kubeflow" and args.peer_order == "after" and shutil.which("go") is not None
        if peer_first:
            result["kubeflow"] = run_kubeflow(cluster, api, args.jobs, args.concurrency, args.timeout, spec_dict,
                                              clear=True)
        result["kubetune"] = run_kubetune(cluster, api, args.jobs, args.concurrency, args.timeout, workdir,
                                          operator_args, services_expected=args.jobs if pods > 1 else 0,
                                          profile=(args.apiserver_profile, args.apiserver_profile_seconds)
                                          if args.apiserver_profile else None, clear=peer_after)
        if args.peer == "kubeflow" and shutil.which("go") is None:
            result["kubeflow"] = {"skipped": "go is not installed: Kubeflow Trainer and JobSet are built from "
                                             "devcluster/kubeflow/go.mod"}
        elif args.peer == "kubeflow" and STOP.is_set():
            result["kubeflow"] = {"skipped": "stopped by SIGUSR1 during the kubetune phase"}
        elif args.peer == "kubeflow" and not peer_first:
            result["kubeflow"] = run_kubeflow(cluster, api, args.jobs, args.concurrency, args.timeout, spec_dict)
        result["node_health"] = node_health(api)
        result["peak_rss_mib"] = {name: round(proc_status_kib(pid, "VmHWM") / 1024, 1)
                                  for name, pid in cluster.pids.items()}
    b, c = result["baseline"], result["kubetune"]["creation"]
    result["ratio"] = ratio(c, b)
    result["ratio_vs_running_jobs"] = ratio(c, result["baseline_running"])
    result["loadavg_after"] = loadavg()
    result["wall_s"] = round(time.time() - t_start, 1)
    result["stopped"] = STOP.is_set()
    comp = result["kubetune"]["completion"]
    result["ok"] = bool(c["complete"] and c["lost_count"] == 0 and c["create_error_count"] == 0
                        and b.get("error_count", 0) == 0 and result["baseline_running"].get("error_count", 0) == 0
                        and comp.get("all_succeeded")
                        and result["kubetune"]["operator"]["alive_at_end"])
    peer = result.get("kubeflow")
    if peer and "skipped" not in peer:
        from peer_kubeflow import peer_ratios

        result["peer_order"] = (f"Kubeflow Trainer phase {args.peer_order} the kubetune phase, on the same cluster "
                                "and fleet")
        result["peer_ratios"] = peer_ratios(result["kubetune"], peer)
        pc = peer["creation"]
        result["peer_ok"] = bool(pc["to_pods"]["complete"] and pc["lost_count"] == 0 and pc["create_error_count"] == 0
                                 and peer["completion"].get("all_succeeded") and peer["controllers"]["alive_at_end"])
        result["ok"] = result["ok"] and result["peer_ok"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"result: {out}")
    return 0 if result["ok"] else 1


def ratio(kubetune: dict, baseline: dict) -> float | None:
    """kubetune's FineTuneJob->Job throughput over a baseline's Job throughput."""
    if kubetune.get("throughput_per_s") and baseline.get("throughput_per_s"):
        return round(kubetune["throughput_per_s"] / baseline["throughput_per_s"], 3)
    return None


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
