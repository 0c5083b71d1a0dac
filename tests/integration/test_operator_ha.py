"""High availability and restart safety of the operator on the real local control plane.

Operators run as real subprocesses (`python -m kubetune operator`) with leader election on a
coordination.k8s.io Lease in the test namespace; crashes are SIGKILL (no Lease release, no
cleanup). KWOK pods are driven to completion with `complete_pod`.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from kubetune.builders import JOB_NAME_LABEL
from kubetune_dev.devcluster.binaries import helm_binary
from kubetune_dev.operator_process import OperatorProcess, install_crds
from tests.support.cluster_helpers import complete_pod, wait_for
from tests.support.finetunejobs import FtjClient, ProgressServer, free_port, ftj_manifest, summary_json, wait_phase

pytestmark = pytest.mark.integration

LEASE_SECONDS = 4  # short, so a takeover after a crash is quick; the standby polls every 1.33 s
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"




class Replicas:
    """Starts operator replicas for one namespace/Lease and stops every one of them at the end."""

    def __init__(self, cluster: Any, namespace: str, logs: Path, progress_port: int) -> None:
        self.cluster, self.namespace, self.logs = cluster, namespace, logs
        self.progress_port = progress_port
        self.lease = f"ha-{uuid.uuid4().hex[:6]}"
        self.started: list[OperatorProcess] = []

    def start(self, pod_name: str, metrics_port: int = 0, liveness_port: int = 0,
              extra_args: tuple[str, ...] = (), args: list[str] | None = None) -> OperatorProcess:
        """Start one replica whose POD_NAME (Lease identity prefix, Event reportingInstance) is pod_name;
        `args` replaces the default flags (this namespace and Lease, short timings) when given."""
        if args is None:
            args = [
                "--namespace", self.namespace, "--lease-namespace", self.namespace, "--lease-name", self.lease,
                "--lease-seconds", str(LEASE_SECONDS), "--resync-seconds", "1", "--progress-seconds", "1", "--liveness-port", str(liveness_port),
                "--metrics-port", str(metrics_port), "--progress-host", "127.0.0.1",
                "--progress-port", str(self.progress_port), "--no-preflight",  # KWOK pods run no preflight
            ]
        op = OperatorProcess(self.cluster.kubeconfig, [*args, *extra_args], self.logs / f"{pod_name}.log",
                             env={"POD_NAME": pod_name})
        op.pod_name, op.metrics_port, op.liveness_port = pod_name, metrics_port, liveness_port
        self.started.append(op.start())
        return op

    def stop_all(self) -> None:
        """SIGTERM (then SIGKILL) every replica still running; print the log tails."""
        for op in self.started:
            op.stop()
            print(f"--- {op.pod_name} log tail ---\n{op.log_text()[-2500:]}")


@pytest.fixture(scope="module")
def progress() -> Iterator[ProgressServer]:
    """A /progress endpoint answering 404 (no trainer progress), so passes never wait on pod IPs."""
    server = ProgressServer().start()
    yield server
    server.stop()


@pytest.fixture
def replicas(cluster, namespace, progress, tmp_path) -> Iterator[Replicas]:
    install_crds(cluster.kubectl)
    r = Replicas(cluster, namespace, tmp_path, progress.port)
    try:
        yield r
    finally:
        r.stop_all()


@pytest.fixture
def ftj(k8s) -> FtjClient:
    return FtjClient(k8s)


# --- helpers -------------------------------------------------------------------------------------

def read_lease(k8s: Any, ns: str, name: str) -> Any:
    """The Lease object."""
    return client.CoordinationV1Api(k8s).read_namespaced_lease(name, ns)




def wait_running_pods(ftj: FtjClient, ns: str, name: str, count: int, timeout: float = 40) -> list:
    """The Running trainer pods by completion index, once `count` of them run."""
    def check():
        pods = [ftj.running_pod(ns, name, i) for i in range(count)]
        return pods if all(pods) else None
    return wait_for(check, timeout, f"{count} running trainer pods of {ns}/{name}")


def children(ftj: FtjClient, ns: str, name: str) -> dict[str, list[tuple[str, str]]]:
    """(name, uid) of every Job, ConfigMap and Service labelled as a child of the FineTuneJob."""
    sel = f"{JOB_NAME_LABEL}={name}"
    return {
        "Job": [(j.metadata.name, j.metadata.uid) for j in ftj.batch.list_namespaced_job(ns, label_selector=sel).items],
        "ConfigMap": [(c.metadata.name, c.metadata.uid)
                      for c in ftj.core.list_namespaced_config_map(ns, label_selector=sel).items],
        "Service": [(s.metadata.name, s.metadata.uid)
                    for s in ftj.core.list_namespaced_service(ns, label_selector=sel).items],
    }


def assert_one_set_of_children(ftj: FtjClient, ns: str, name: str) -> dict[str, tuple[str, str]]:
    """Exactly one Job, ConfigMap and (multi-pod runs only) Service with the contract names; returns them
    with UIDs."""
    found = children(ftj, ns, name)
    multi_pod = int(ftj.status(ns, name)["layout"]["pods"]) > 1
    assert [n for n, _ in found["Job"]] == [f"{name}-trainer"], found
    assert [n for n, _ in found["ConfigMap"]] == [f"{name}-plan"], found
    assert [n for n, _ in found["Service"]] == ([f"{name}-trainer"] if multi_pod else []), found
    # No other Job (under any name) is owned by this FineTuneJob either.
    uid = ftj.get(ns, name)["metadata"]["uid"]
    owned = [j.metadata.name for j in ftj.jobs(ns)
             if any(o.uid == uid for o in j.metadata.owner_references or [])]
    assert owned == [f"{name}-trainer"], owned
    return {kind: items[0] for kind, items in found.items() if items}


def ftj_events(ftj: FtjClient, ns: str, name: str) -> list[Any]:
    """core/v1 Events about the FineTuneJob."""
    return ftj.core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob").items


def reason_counts(events: list[Any]) -> dict[str, int]:
    """How many Events per reason."""
    out: dict[str, int] = {}
    for e in events:
        out[e.reason] = out.get(e.reason, 0) + (e.count or 1)
    return out


def finish(ftj: FtjClient, k8s: Any, ns: str, name: str, pods: int) -> dict:
    """Complete every trainer pod (rank 0 last, with a summary) and wait for Succeeded."""
    running = wait_running_pods(ftj, ns, name, pods)
    for pod in running[1:]:
        complete_pod(k8s, ns, pod.metadata.name)
    complete_pod(k8s, ns, running[0].metadata.name, message=summary_json(name))
    return wait_phase(ftj, ns, name, "Succeeded")


def scrape(op: OperatorProcess) -> dict[str, float]:
    """The operator's /metrics as {'name{k="v",...}': value} (labels sorted)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def healthz(op: OperatorProcess) -> tuple[int, str]:
    """GET /healthz on the replica's liveness port: (HTTP status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.liveness_port}/healthz", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def reconcile_lines(op: OperatorProcess, ns: str) -> list[str]:
    """Log lines of the operator about FineTuneJobs in ns (child creation, Events)."""
    return [line for line in op.log_text().splitlines() if f": {ns}/" in line]


# --- tests ---------------------------------------------------------------------------------------

def test_two_replicas_one_leader_then_failover_after_sigkill(replicas, ftj, k8s, namespace):
    ns = namespace
    a = replicas.start("replica-a", liveness_port=free_port())
    b = replicas.start("replica-b", liveness_port=free_port())

    def leader_pair():
        holder = read_lease(k8s, ns, replicas.lease).spec.holder_identity or ""
        for op, other in ((a, b), (b, a)):
            if holder.startswith(f"{op.pod_name}-") and "leading as" in op.log_text():
                return op, other
        return None

    leader, standby = wait_for(leader_pair, 60, "one replica leading and holding the Lease")
    standby.wait_for_log("waiting to become the leader", 30)
    assert standby.alive() and "leading as" not in standby.log_text()
    # Both pass their health probes (a standby that failed them would be restarted by the kubelet).
    # kopf serves the probe a moment after the replica leads (seconds on a loaded machine).
    wait_for(lambda: healthz(leader)[0] == 200, 15, lambda: "the leader's /healthz 200")
    status, body = wait_for(lambda: (h := healthz(standby))[0] == 200 and h, 15, "standby /healthz 200")
    assert "standby" in body

    # One FineTuneJob, two pods: exactly one set of children, made by the leader only.
    ftj.create(ns, ftj_manifest("first", pods=2))
    wait_phase(ftj, ns, "first", "Running")
    wait_running_pods(ftj, ns, "first", 2)
    first = assert_one_set_of_children(ftj, ns, "first")
    events = ftj_events(ftj, ns, "first")
    assert {e.reporting_instance for e in events} == {leader.pod_name}, [(e.reason, e.reporting_instance) for e in events]
    assert reason_counts(events).get("ChildrenCreated") == 1
    assert reconcile_lines(leader, ns) and not reconcile_lines(standby, ns), standby.log_text()[-2000:]
    assert "leading as" not in standby.log_text()

    # The leader crashes: the standby takes over once the Lease expires, not before.
    before = read_lease(k8s, ns, replicas.lease).spec
    leader.kill()
    killed = time.monotonic()
    standby.wait_for_log("leading as", LEASE_SECONDS + 20)
    takeover = time.monotonic() - killed
    after = read_lease(k8s, ns, replicas.lease).spec
    print(f"takeover after SIGKILL: {takeover:.1f}s (lease {LEASE_SECONDS}s)")
    assert after.holder_identity.startswith(f"{standby.pod_name}-")
    assert after.lease_transitions == (before.lease_transitions or 0) + 1
    assert after.acquire_time >= before.renew_time + dt.timedelta(seconds=LEASE_SECONDS), (before, after)
    # Poll period is lease/3: expiry + one poll + process slack on 2 busy cores.
    assert takeover <= LEASE_SECONDS + LEASE_SECONDS / 3 + 4
    # kopf's own liveness endpoint took over the port from the standby one.
    wait_for(lambda: (h := healthz(standby))[0] == 200 and "standby" not in h[1], 15,
             lambda: f"kopf's /healthz on the new leader; last: {healthz(standby)}")

    # The new leader finishes the job the old one started (same children) and runs a new one.
    ftj.create(ns, ftj_manifest("second"))
    st = finish(ftj, k8s, ns, "first", pods=2)
    assert st["artifacts"]["adapter"] == "s3://outputs/first/final/adapter"
    assert assert_one_set_of_children(ftj, ns, "first") == first
    wait_phase(ftj, ns, "second", "Running")
    st = finish(ftj, k8s, ns, "second", pods=1)
    assert st["reason"] == "Completed"
    assert_one_set_of_children(ftj, ns, "second")
    second_events = ftj_events(ftj, ns, "second")
    assert {e.reporting_instance for e in second_events} == {standby.pod_name}
    assert reason_counts(second_events).get("ChildrenCreated") == 1
    assert reason_counts(ftj_events(ftj, ns, "first")).get("ChildrenCreated") == 1

    # A graceful stop (SIGTERM) releases the Lease: a fresh standby takes over well before expiry.
    c = replicas.start("replica-c")
    c.wait_for_log("waiting to become the leader", 60)
    assert "leading as" not in c.log_text()
    stopped = time.monotonic()
    assert standby.stop() == 0
    c.wait_for_log("leading as", LEASE_SECONDS + 20)
    handover = time.monotonic() - stopped
    print(f"handover after SIGTERM: {handover:.1f}s")
    assert handover < LEASE_SECONDS, "a released Lease should be taken at the next poll, not after expiry"
    assert read_lease(k8s, ns, replicas.lease).spec.holder_identity.startswith("replica-c-")
    # The new leader resumes the (finished) jobs it inherited: it reconciled both once.
    wait_for(lambda: all(f"{ns}/{name}: resuming a job in phase Succeeded" in c.log_text()
                         for name in ("first", "second")), 30,
             lambda: f"replica-c resuming both jobs; log: {c.log_text()[-1500:]}")
    assert ftj.status(ns, "first")["phase"] == ftj.status(ns, "second")["phase"] == "Succeeded"


def test_sigkill_and_restart_keeps_children_and_finishes_the_job(replicas, ftj, k8s, namespace):
    ns = namespace
    op = replicas.start("solo", metrics_port=free_port())
    op.wait_for_log("leading as", 60)
    ftj.create(ns, ftj_manifest("crashy", pods=2))
    wait_phase(ftj, ns, "crashy", "Running")
    pods = wait_running_pods(ftj, ns, "crashy", 2)
    assert scrape(op)["kubetune_job_time_to_running_seconds_count"] == 1
    kids = assert_one_set_of_children(ftj, ns, "crashy")
    pod_uids = {p.metadata.name: p.metadata.uid for p in ftj.pods(ns, "crashy")}
    assert len(pod_uids) == 2

    op.kill()
    # While no operator runs, trainer pod 1 finishes: the restarted operator must notice it.
    complete_pod(k8s, ns, pods[1].metadata.name)
    wait_for(lambda: ftj.pods(ns, "crashy", "Succeeded"), 30, "pod 1 Succeeded")

    restarted = replicas.start("solo-restarted", metrics_port=free_port())
    restarted.wait_for_log("leading as", LEASE_SECONDS + 30)  # waits for the dead holder's Lease to expire
    assert "took over Lease" in restarted.log_text()
    st = wait_for(lambda: (s := ftj.status(ns, "crashy")).get("message", "").startswith("1/2 trainer pod") and s,
                  30, "the restarted operator folding the pod that finished while it was down")
    assert st["phase"] == "Running"
    # The restarted operator counts the job as Running, but not as a new start (it started before). The gauges are
    # set after the pass's status write and Events, so the status can be seen a moment before them.
    metrics = wait_for(lambda: (m := scrape(restarted)).get('kubetune_jobs{phase="Running"}') == 1 and m, 10,
                       lambda: f"kubetune_jobs{{phase=\"Running\"}} == 1; last scrape {scrape(restarted)}")
    assert metrics["kubetune_job_time_to_running_seconds_count"] == 0
    # Same children, same pods: nothing was recreated or duplicated by the restart.
    assert assert_one_set_of_children(ftj, ns, "crashy") == kids
    assert {p.metadata.name: p.metadata.uid for p in ftj.pods(ns, "crashy")} == pod_uids
    assert ftj.running_pod(ns, "crashy", 0).metadata.uid == pods[0].metadata.uid

    complete_pod(k8s, ns, pods[0].metadata.name, message=summary_json("crashy"))
    st = wait_phase(ftj, ns, "crashy", "Succeeded")
    assert st["artifacts"]["adapter"] == "s3://outputs/crashy/final/adapter"
    assert st["progress"]["percent"] == 100.0
    assert assert_one_set_of_children(ftj, ns, "crashy") == kids
    metrics = wait_for(lambda: (m := scrape(restarted))['kubetune_jobs{phase="Succeeded"}'] == 1 and m, 10,
                       "Succeeded counted in the restarted operator's metrics")
    assert metrics['kubetune_jobs{phase="Running"}'] == 0 and metrics["kubetune_reconcile_errors_total"] == 0
    assert not {k: v for k, v in metrics.items() if k.startswith("kubetune_watch_failures_total") and v}, metrics
    counts = reason_counts(ftj_events(ftj, ns, "crashy"))
    assert counts.get("ChildrenCreated") == 1 and counts.get("PodsRunning") == 1 and counts.get("Completed") == 1, counts
    assert not [line for line in reconcile_lines(restarted, ns) if "created" in line and "crashy" in line]


def test_leader_that_loses_its_lease_stops_and_the_standby_takes_over(replicas, ftj, k8s, namespace):
    ns = namespace
    a = replicas.start("replica-a")
    a.wait_for_log("leading as", 60)
    b = replicas.start("replica-b")
    b.wait_for_log("waiting to become the leader", 60)
    # Someone else holds the Lease now (e.g. the leader was partitioned away and its Lease moved on).
    coord = client.CoordinationV1Api(k8s)

    def take_lease() -> bool:
        lease = coord.read_namespaced_lease(replicas.lease, ns)
        now = dt.datetime.now(dt.timezone.utc)
        lease.spec.holder_identity, lease.spec.renew_time, lease.spec.acquire_time = "intruder", now, now
        lease.spec.lease_duration_seconds = LEASE_SECONDS
        coord.replace_namespaced_lease(replicas.lease, ns, lease)  # 409 if the leader renewed meanwhile
        return True

    wait_for(take_lease, 10, "replacing the Lease holder", interval=0.05)
    stolen = time.monotonic()
    # The old leader notices at its next renewal and exits (1), so its kopf stops acting.
    wait_for(lambda: not a.alive(), LEASE_SECONDS / 3 + 10, "the old leader exiting after losing its Lease")
    print(f"old leader exited {time.monotonic() - stolen:.1f}s after losing the Lease")
    assert a.proc.returncode == 1 and "lost the Lease to 'intruder': stopping" in a.log_text()
    assert "released Lease" not in a.log_text()  # it must not clear a Lease it no longer holds
    # The standby waits for the intruder's Lease to expire, then leads and acts alone.
    b.wait_for_log("leading as", LEASE_SECONDS + 20)
    assert read_lease(k8s, ns, replicas.lease).spec.holder_identity.startswith("replica-b-")
    ftj.create(ns, ftj_manifest("afterloss"))
    wait_phase(ftj, ns, "afterloss", "Running")
    assert_one_set_of_children(ftj, ns, "afterloss")
    assert {e.reporting_instance for e in ftj_events(ftj, ns, "afterloss")} == {"replica-b"}
    assert not reconcile_lines(a, ns)


def test_sigkill_while_creating_children_then_restart_completes_the_set(replicas, ftj, k8s, namespace):
    ns = namespace
    op = replicas.start("early")
    op.wait_for_log("leading as", 60)
    ftj.create(ns, ftj_manifest("halfway", pods=2))
    # Freeze the operator the moment it reports its first child (the ConfigMap), then crash it.
    deadline = time.monotonic() + 30
    while "created ConfigMap halfway-plan" not in op.log_text():
        assert time.monotonic() < deadline and op.alive(), op.log_text()[-2000:]
        time.sleep(0.005)
    os.kill(op.pid, signal.SIGSTOP)
    at_crash = {kind: [n for n, _ in items] for kind, items in children(ftj, ns, "halfway").items()}
    op.kill()
    print(f"children when the operator was killed: {at_crash}")
    assert at_crash["ConfigMap"] == ["halfway-plan"]
    plan_uid = children(ftj, ns, "halfway")["ConfigMap"][0][1]

    restarted = replicas.start("early-restarted")
    restarted.wait_for_log("leading as", LEASE_SECONDS + 30)
    wait_phase(ftj, ns, "halfway", "Running")
    kids = assert_one_set_of_children(ftj, ns, "halfway")
    assert kids["ConfigMap"][1] == plan_uid  # kept (updated in place), not deleted and recreated
    for kind, names in at_crash.items():  # whatever existed at the crash is the same object now
        if names:
            assert kids[kind][0] == names[0]
    finish(ftj, k8s, ns, "halfway", pods=2)
    assert assert_one_set_of_children(ftj, ns, "halfway") == kids
    assert len(ftj.pods(ns, "halfway")) == 2


def chart_operator_args(release: str, namespace: str, tmp_path: Path) -> list[str]:
    """`kubetune operator` flags (after `operator`) as `helm template` renders them for replicaCount 2,
    the release installed in `namespace` and watching only it."""
    helm = helm_binary()
    if helm is None:
        pytest.skip("helm not found (devcluster/build.sh builds it into ~/.cache/kubetune/bin/current)")
    values = tmp_path / "ha-values.yaml"
    values.write_text(yaml.safe_dump({"replicaCount": 2, "watchNamespaces": [namespace]}))
    out = subprocess.run([helm, "template", release, str(CHART), "-n", namespace, "--kube-version", "1.33.13",
                          "-f", str(values), "--show-only", "templates/deployment.yaml"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = yaml.safe_load(out.stdout)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator", args
    return args[1:]


def test_failover_with_the_flags_the_chart_gives_two_replicas(replicas, ftj, k8s, namespace, tmp_path):
    """replicaCount 2 as the chart renders it: the Lease is the only coordination (no kopf peering
    flags), one replica acts, and a SIGKILLed leader's standby acts within the Lease time."""
    ns, release = namespace, f"ha-{uuid.uuid4().hex[:5]}"
    lease = f"{release}-kubetune"
    chart_args = chart_operator_args(release, ns, tmp_path)
    assert {f"--namespace={ns}", "--leader-election", f"--lease-name={lease}", f"--lease-namespace={ns}"} \
        <= set(chart_args), chart_args
    assert not [a for a in chart_args if a.startswith(("--peering", "--standalone", "--priority"))], chart_args
    # The chart's flags, with ports that are free on this machine and a short Lease (argparse: the last wins).
    args = [*chart_args, "--liveness-port=0", "--metrics-port=0", f"--lease-seconds={LEASE_SECONDS}",
            "--progress-host=127.0.0.1", f"--progress-port={replicas.progress_port}", "--no-preflight"]
    a = replicas.start("chart-a", args=args)
    a.wait_for_log("leading as", 60)
    ftj.create(ns, ftj_manifest("charted"))
    wait_phase(ftj, ns, "charted", "Running")
    b = replicas.start("chart-b", args=args)
    b.wait_for_log("waiting to become the leader", 60)
    assert read_lease(k8s, ns, lease).spec.holder_identity.startswith("chart-a-")
    assert not reconcile_lines(b, ns) and "leading as" not in b.log_text()

    a.kill()
    killed = time.monotonic()
    b.wait_for_log("leading as", LEASE_SECONDS + 20)
    ftj.create(ns, ftj_manifest("charted2"))
    wait_phase(ftj, ns, "charted2", "Running", timeout=LEASE_SECONDS + 25)
    acting = time.monotonic() - killed
    print(f"new leader acting {acting:.1f}s after the SIGKILL (chart flags, lease {LEASE_SECONDS}s)")
    assert acting <= LEASE_SECONDS + LEASE_SECONDS / 3 + 8
    assert read_lease(k8s, ns, lease).spec.holder_identity.startswith("chart-b-")
    assert "Pausing" not in b.log_text(), b.log_text()[-2000:]  # kopf never paused by a peering record
    assert_one_set_of_children(ftj, ns, "charted2")
    assert {e.reporting_instance for e in ftj_events(ftj, ns, "charted2")} == {"chart-b"}
    # The new leader finishes the job the old one started, with the children the old one made.
    kids = assert_one_set_of_children(ftj, ns, "charted")
    finish(ftj, k8s, ns, "charted", pods=1)
    assert assert_one_set_of_children(ftj, ns, "charted") == kids


def test_kills_at_many_points_of_a_burst_leave_every_job_complete(replicas, ftj, k8s, namespace):
    """SIGKILL the operator again and again while it creates a burst of jobs (between a Job's create and its
    status write, among others): after the last restart every job has its layout, Sized condition and
    accounting, exactly one Job and one plan, and all of them are owned by their FineTuneJob."""
    ns = namespace
    jobs = 24
    names = [f"burst-{i:02d}" for i in range(jobs)]
    op = replicas.start("crash-0")
    op.wait_for_log("leading as", 60)
    for name in names:
        ftj.create(ns, ftj_manifest(name))
    # Kill as soon as some Jobs exist, then again after each restart has made a little progress.
    for round_ in range(1, 4):
        target = round_ * jobs // 4
        wait_for(lambda: len(ftj.jobs(ns)) >= target or None, 60, f"at least {target} trainer Jobs")
        op.kill()
        op = replicas.start(f"crash-{round_}")
        op.wait_for_log("leading as", LEASE_SECONDS + 30)

    def complete():
        statuses = {n: ftj.status(ns, n) for n in names}
        missing = [n for n, st in statuses.items()
                   if not st.get("layout") or "gpuHours" not in (st.get("accounting") or {})
                   or not any(c["type"] == "Sized" and c["status"] == "True" for c in st.get("conditions") or [])]
        return not missing or None
    wait_for(complete, 120, lambda: "every job with layout, Sized and accounting; missing: " + ", ".join(
        n for n in names if not ftj.status(ns, n).get("layout")))
    by_owner: dict[str, list[str]] = {}
    for job in ftj.jobs(ns):
        owners = [o.name for o in job.metadata.owner_references or []]
        assert len(owners) == 1, (job.metadata.name, owners)
        by_owner.setdefault(owners[0], []).append(job.metadata.name)
    assert sorted(by_owner) == names and all(len(v) == 1 for v in by_owner.values()), by_owner
    plans = [cm.metadata.name for cm in ftj.core.list_namespaced_config_map(ns).items if cm.metadata.name.endswith("-plan")]
    assert sorted(plans) == [f"{n}-plan" for n in names]
