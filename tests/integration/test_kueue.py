"""FineTuneJobs queued through a real Kueue (v0.17, its controller manager and webhooks running against the local
apiserver) on the simulated GPU fleet: ResourceFlavors per GPU product with nodeLabels, a ClusterQueue with
nvidia.com/gpu quotas per flavor and a LocalQueue per test namespace.

The operator creates the trainer Job suspended and never changes `suspend` for Kueue; Kueue admits the Job (or
says why not on its Workload) and the operator shows Kueue's verdict in the FineTuneJob's status, an Admitted
condition and Events."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from kubernetes import client, watch

from tests.support.cluster_helpers import complete_pod, wait_for
from tests.support.finetunejobs import FtjClient, ftj_manifest, summary_json, wait_phase
from tests.support.kueue_fixtures import kueue  # noqa: F401 - module-scoped Kueue
from tests.support.operator_fixtures import ftj, operator, progress  # noqa: F401 - module-scoped operator

# Kueue first: the operator then finds Kueue's Workload API at its start. The first test's setup may build Kueue
# (about 16 minutes on a cold cache with 2 cores): room for that beyond the suite's 900 s per test.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kueue"), pytest.mark.timeout(2400)]

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_LABEL, PRIORITY_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"
PRODUCTS = {"l4": "NVIDIA-L4", "h100": "NVIDIA-H100-80GB-HBM3", "a100": "NVIDIA-A100-SXM4-80GB"}


# ----------------------------------------------------------------------------------------------- Kueue objects

@pytest.fixture(scope="module")
def kq(k8s, kueue):  # noqa: F811 - the module's Kueue
    """CustomObjectsApi plus ResourceFlavors for every GPU product of the fleet (one per product, nodeLabels
    nvidia.com/gpu.product) and two WorkloadPriorityClasses."""
    objects = client.CustomObjectsApi(k8s)
    suffix = uuid.uuid4().hex[:5]
    names = {key: f"{key}-{suffix}" for key in PRODUCTS}
    for key, product in PRODUCTS.items():
        objects.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": names[key]},
            "spec": {"nodeLabels": {"nvidia.com/gpu.product": product}}})
    for name, value in ((f"low-{suffix}", 10), (f"high-{suffix}", 1000)):
        objects.create_cluster_custom_object(GROUP, VERSION, "workloadpriorityclasses", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadPriorityClass", "metadata": {"name": name},
            "value": value, "description": "kubetune test"})
    objects.flavor_names = names  # type: ignore[attr-defined]
    objects.priorities = {"low": f"low-{suffix}", "high": f"high-{suffix}"}  # type: ignore[attr-defined]
    return objects


def cluster_queue(kq: Any, ns: str, gpus: dict[str, int] | None, *, preemption: bool = False) -> str:
    """A ClusterQueue for namespace ns with these nvidia.com/gpu quotas per flavor key (in this order; None: a
    queue with CPU and memory quota only) and a LocalQueue `team` in ns pointing at it; returns its name."""
    name = f"cq-{ns}"[:63]
    covered = ["cpu", "memory"] + (["nvidia.com/gpu"] if gpus is not None else [])
    flavors = []
    for key, count in (gpus or {"l4": 0}).items():
        resources = [{"name": "cpu", "nominalQuota": "1000"}, {"name": "memory", "nominalQuota": "10Ti"}]
        if gpus is not None:
            resources.append({"name": "nvidia.com/gpu", "nominalQuota": str(count)})
        flavors.append({"name": kq.flavor_names[key], "resources": resources})
    spec: dict[str, Any] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                            "resourceGroups": [{"coveredResources": covered, "flavors": flavors}]}
    if preemption:
        spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
    kq.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec})
    kq.create_namespaced_custom_object(GROUP, VERSION, ns, "localqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue", "metadata": {"name": "team", "namespace": ns},
        "spec": {"clusterQueue": name}})
    wait_for(lambda: any(c["type"] == "Active" and c["status"] == "True" for c in
                         (kq.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", name).get("status") or {})
                         .get("conditions") or []), 30, f"ClusterQueue {name} active")
    return name


@pytest.fixture
def queues(kq, namespace):
    """Deletes the test's ClusterQueue afterwards (the LocalQueue goes with the namespace)."""
    yield kq
    try:
        kq.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", f"cq-{namespace}"[:63])
    except client.ApiException:
        pass


def queued(name: str, *, gpus: int = 1, gpu_type: str = "NVIDIA-L4", queue: str = "team", priority: str = "",
           **spec: Any) -> dict:
    labels = {QUEUE_LABEL: queue}
    if priority:
        labels[PRIORITY_LABEL] = priority
    return ftj_manifest(name, gpus=gpus, gpu_type=gpu_type, labels=labels, **spec)


def workload_of(kq: Any, ns: str, job_uid: str) -> dict | None:
    items = kq.list_namespaced_custom_object(GROUP, VERSION, ns, "workloads",
                                            label_selector=f"kueue.x-k8s.io/job-uid={job_uid}")["items"]
    return items[0] if items else None


def condition(status: dict, ctype: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def wait_status(ftj: FtjClient, ns: str, name: str, check, what: str, timeout: float = 60) -> dict:  # noqa: F811
    last: dict = {}

    def probe():
        nonlocal last
        last = ftj.status(ns, name)
        return last if check(last) else None
    return wait_for(probe, timeout, lambda: f"{ns}/{name}: {what}; last status {json.dumps(last)[:2000]}")


def running_pod_name(ftj: FtjClient, ns: str, name: str) -> str:  # noqa: F811
    pods = wait_for(lambda: ftj.pods(ns, name, "Running"), 60, f"a Running pod of {ns}/{name}")
    return pods[-1].metadata.name


def finish(ftj: FtjClient, ns: str, name: str) -> None:  # noqa: F811
    """Complete the job's running trainer pod (KWOK) and wait for Succeeded."""
    complete_pod(ftj.core, ns, running_pod_name(ftj, ns, name), 0, summary_json(name))
    wait_phase(ftj, ns, name, "Succeeded", 60)


class SuspendLedger:
    """Watches the Jobs of a namespace and records every change of spec.suspend with the field managers that
    own spec.suspend afterwards (from managedFields): who flipped it, and how often."""

    def __init__(self, batch: client.BatchV1Api, ns: str) -> None:
        self.batch, self.ns = batch, ns
        self.changes: dict[str, list[tuple[bool, list[str]]]] = {}
        self.updates: dict[str, int] = {}  # Job -> MODIFIED events that changed metadata.generation (spec writes)
        self.creators: dict[str, str] = {}
        self._last: dict[str, tuple[bool, int]] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SuspendLedger":
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._watch.stop()

    @staticmethod
    def suspend_owners(job: Any) -> list[str]:
        return sorted(f"{m.manager}/{m.operation}" for m in job.metadata.managed_fields or []
                      if '"f:suspend"' in json.dumps((m.fields_v1 or {}).get("f:spec") or {}))

    def _run(self) -> None:
        try:
            self._follow()
        except Exception:  # noqa: BLE001 - the stream ends with the test (or the cluster)
            pass

    def _follow(self) -> None:
        for event in self._watch.stream(self.batch.list_namespaced_job, self.ns, timeout_seconds=600):
            job = event["object"]
            name, suspend, gen = job.metadata.name, bool(job.spec.suspend), int(job.metadata.generation or 0)
            last = self._last.get(name)
            if last is None:
                self.creators[name] = ",".join(self.suspend_owners(job))
                self.changes.setdefault(name, [])
                self.updates.setdefault(name, 0)
            else:
                if gen != last[1]:
                    self.updates[name] += 1
                if suspend != last[0]:
                    self.changes[name].append((suspend, self.suspend_owners(job)))
            self._last[name] = (suspend, gen)

    def kueue_only(self, operator_manager: str) -> None:
        """Every change of suspend after creation left spec.suspend owned by Kueue, never by the operator."""
        for name, changes in self.changes.items():
            for value, owners in changes:
                assert owners and all(not o.startswith(operator_manager + "/") for o in owners), \
                    (name, value, owners, self.changes)


# ----------------------------------------------------------------------------------------------------- tests

def test_admitted_up_to_quota_rest_queued_with_kueue_reason_then_admitted_as_others_finish(
        ftj, queues, namespace, cluster):  # noqa: F811
    """Input: a ClusterQueue with 2 L4 GPUs of quota and three 1-GPU FineTuneJobs for it. Expected: two run,
    the third is Queued with Kueue's own words (the quota numbers) in status, `kubectl get ftj` and an Event,
    and runs once one of the others finishes; the operator never writes the Jobs' suspend."""
    ns = namespace
    cluster_queue(queues, ns, {"l4": 2})
    names = ["q-a", "q-b", "q-c"]
    with SuspendLedger(ftj.batch, ns) as ledger:
        for name in names:
            ftj.create(ns, queued(name))
            time.sleep(1.0)  # admitted in creation order
        for name in names[:2]:
            wait_phase(ftj, ns, name, "Running", 90)
        st = wait_status(ftj, ns, "q-c", lambda s: s.get("phase") == "Queued" and "quota" in s.get("message", ""),
                         "Queued with Kueue's quota message")
        assert st["reason"] == "QueuedByKueue" and "nvidia.com/gpu" in st["message"], st
        print(f"queued message: {st['message']}")
        admitted = condition(st, "Admitted")
        assert admitted["status"] == "False" and admitted["message"] == st["message"], admitted
        events = wait_for(lambda: [m for r, m in ftj.events(ns, "q-c") if r == "QueuedByKueue" and "quota" in m],
                          30, "an Event with Kueue's quota message")
        assert events
        table = cluster.kubectl("get", "ftj", "-n", ns).stdout
        row = next(line for line in table.splitlines() if line.startswith("q-c"))
        assert "Queued" in row and "QueuedByKueue" in row, table
        wide = cluster.kubectl("get", "ftj", "q-c", "-n", ns, "-o", "wide").stdout
        assert "quota" in wide, wide
        for name in names[:2]:
            assert condition(ftj.status(ns, name), "Admitted")["status"] == "True"
        job_c = ftj.batch.read_namespaced_job("q-c-trainer", ns)
        assert job_c.spec.suspend is True
        finish(ftj, ns, "q-a")
        wait_phase(ftj, ns, "q-c", "Running", 90)
        st = ftj.status(ns, "q-c")
        assert condition(st, "Admitted")["reason"] == "AdmittedByKueue", st
        time.sleep(2)
    operator_manager = ledger.creators["q-a-trainer"].split("/")[0]
    assert operator_manager and "kueue" not in operator_manager, ledger.creators
    # Each admitted Job was unsuspended once, by Kueue; q-c stayed suspended until then; nobody else wrote.
    for name in names:
        assert [v for v, _ in ledger.changes[f"{name}-trainer"]] == [False], ledger.changes
        assert ledger.updates[f"{name}-trainer"] == 1, (ledger.updates, ledger.changes)
    ledger.kueue_only(operator_manager)
    print(f"kueue admission: Job spec writes per Job {ledger.updates}; suspend owners {ledger.changes}")


def test_a_job_is_never_admitted_onto_a_gpu_type_its_estimate_does_not_fit(ftj, queues, namespace):  # noqa: F811
    """Input: an unpinned Llama-3.1-70B QLoRA (about 45 GiB per GPU: twice what an L4 holds), a ClusterQueue
    with plenty of L4 quota and none on the 80 GB flavors. Expected: the sizer picks an 80 GB GPU and pins it
    by nodeSelector, so Kueue cannot assign the L4 flavor: the job stays Queued with Kueue's reason; once the
    sized flavor gets quota, Kueue admits it there and its pod runs on that GPU product."""
    ns = namespace
    cq = cluster_queue(queues, ns, {"l4": 8, "h100": 0, "a100": 0})
    manifest = queued("fit", method="qlora", quantization={"bits": 4})
    manifest["spec"]["model"] = {"uri": "hf://meta-llama/Llama-3.1-70B"}
    manifest["spec"]["resources"] = {}
    ftj.create(ns, manifest)
    st = wait_status(ftj, ns, "fit", lambda s: s.get("phase") == "Queued" and "flavor" in s.get("message", ""),
                     "Queued with Kueue's flavor message")
    product = st["layout"]["gpuType"]
    assert product in (PRODUCTS["h100"], PRODUCTS["a100"]), st["layout"]
    per_gpu = st["plan"]["estimate"]["breakdownBytes"]["total"]
    assert per_gpu > 23034 * 2**20, st["plan"]["estimate"]  # more than an L4 has
    job = ftj.batch.read_namespaced_job("fit-trainer", ns)
    assert job.spec.template.spec.node_selector["nvidia.com/gpu.product"] == product
    time.sleep(5)  # Kueue has had every chance to use the free L4 quota
    job = ftj.batch.read_namespaced_job("fit-trainer", ns)
    wl = workload_of(queues, ns, job.metadata.uid)
    assert job.spec.suspend is True and not (wl.get("status") or {}).get("admission"), wl.get("status")
    assert ftj.status(ns, "fit")["phase"] == "Queued"
    key = "h100" if product == PRODUCTS["h100"] else "a100"
    body = queues.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq)
    for flavor in body["spec"]["resourceGroups"][0]["flavors"]:
        if flavor["name"] == queues.flavor_names[key]:
            next(r for r in flavor["resources"] if r["name"] == "nvidia.com/gpu")["nominalQuota"] = "8"
    queues.replace_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq, body)
    wait_phase(ftj, ns, "fit", "Running", 90)
    wl = workload_of(queues, ns, job.metadata.uid)
    assigned = {v for ps in wl["status"]["admission"]["podSetAssignments"] for v in ps["flavors"].values()}
    assert assigned == {queues.flavor_names[key]}, wl["status"]["admission"]
    pod = ftj.pods(ns, "fit", "Running")[-1]
    node = ftj.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == product


@pytest.mark.parametrize("case", ["no-such-queue", "no-gpu-quota", "larger-than-quota"])
def test_bad_queue_input_gives_a_condition_and_event_with_kueue_numbers(ftj, queues, namespace, case):  # noqa: F811
    """Input: a queue name that does not exist / a ClusterQueue without GPU quota / a 4-GPU job for a 2-GPU
    quota. Expected: phase Queued with Kueue's own explanation in status.message, the Admitted condition and an
    Event; never a silent wait."""
    ns = namespace
    expect = {"no-such-queue": "LocalQueue", "no-gpu-quota": "nvidia.com/gpu",
              "larger-than-quota": "(4) > maximum capacity (2)"}[case]
    cluster_queue(queues, ns, None if case == "no-gpu-quota" else {"l4": 2})
    manifest = queued("bad", gpus=4, queue="nope" if case == "no-such-queue" else "team")
    ftj.create(ns, manifest)
    st = wait_status(ftj, ns, "bad", lambda s: s.get("phase") == "Queued" and expect in s.get("message", ""),
                     f"Queued with Kueue's message naming {expect!r}")
    admitted = condition(st, "Admitted")
    assert admitted["status"] == "False" and expect in admitted["message"], admitted
    wait_for(lambda: [m for _, m in ftj.events(ns, "bad") if expect in m], 30, f"an Event naming {expect!r}")
    print(f"{case}: {st['message']}")


def test_priority_preemption_is_shown_stops_the_clock_and_resumes_from_checkpoint(
        ftj, queues, namespace, progress):  # noqa: F811
    """Input: a 1-GPU ClusterQueue with preemption, a low-priority job running, then a high-priority job.
    Expected: Kueue evicts the low one (suspends its Job); its FineTuneJob shows PreemptedByKueue in status,
    the Admitted condition and a Warning Event, its gpuHours stop growing; the operator wrote no suspend; when
    the high one finishes, the low one is admitted again and resumes from its last checkpoint."""
    ns = namespace
    cluster_queue(queues, ns, {"l4": 1}, preemption=True)
    progress.set({"version": 1, "phase": "training", "step": 40, "totalSteps": 100, "epoch": 0.4,
                  "checkpoint": {"step": 40, "uri": "s3://outputs/low/checkpoints/step-40"}})
    with SuspendLedger(ftj.batch, ns) as ledger:
        ftj.create(ns, queued("low", priority=queues.priorities["low"]))
        wait_status(ftj, ns, "low", lambda s: s.get("phase") == "Running"
                    and (s.get("checkpoint") or {}).get("step") == 40, "Running with checkpoint step 40")
        time.sleep(2)
        ftj.create(ns, queued("high", priority=queues.priorities["high"]))
        st = wait_status(ftj, ns, "low", lambda s: s.get("reason") == "PreemptedByKueue",
                         "PreemptedByKueue", timeout=90)
        assert st["phase"] == "Queued" and "evicted by Kueue" in st["message"], st
        admitted = condition(st, "Admitted")
        assert admitted["status"] == "False" and admitted["reason"] == "PreemptedByKueue", admitted
        wait_for(lambda: [m for r, m in ftj.events(ns, "low") if r == "PreemptedByKueue"], 30,
                 "a PreemptedByKueue Event")
        warnings = ftj.core.list_namespaced_event(ns, field_selector="involvedObject.name=low,type=Warning").items
        assert any(e.reason == "PreemptedByKueue" for e in warnings), [(e.reason, e.type) for e in warnings]
        assert ftj.batch.read_namespaced_job("low-trainer", ns).spec.suspend is True
        # Its GPU time runs until its pod has stopped, then ends.
        wait_for(lambda: "runningSince" not in ftj.status(ns, "low")["accounting"], 30,
                 "the running time ended once the pod stopped")
        hours = ftj.status(ns, "low")["accounting"]
        wait_phase(ftj, ns, "high", "Running", 90)
        time.sleep(3)
        assert ftj.status(ns, "low")["accounting"].get("gpuHours") == hours.get("gpuHours")
        progress.set(None)
        finish(ftj, ns, "high")
        progress.set({"version": 1, "phase": "training", "step": 41, "totalSteps": 100, "epoch": 0.41,
                      "checkpoint": {"step": 40, "uri": "s3://outputs/low/checkpoints/step-40"}})
        st = wait_status(ftj, ns, "low", lambda s: s.get("phase") == "Running", "Running again", timeout=90)
        assert st.get("resumedFromStep") == 40, st
        wait_for(lambda: [m for _, m in ftj.events(ns, "low") if "resuming from checkpoint step 40" in m], 30,
                 "an Event saying the run resumes from checkpoint step 40")
        assert condition(st, "Admitted")["status"] == "True"
        time.sleep(2)
    operator_manager = ledger.creators["low-trainer"].split("/")[0]
    # low: unsuspended by Kueue, suspended by Kueue on preemption, unsuspended again on re-admission.
    assert [v for v, _ in ledger.changes["low-trainer"]] == [False, True, False], ledger.changes
    ledger.kueue_only(operator_manager)
    print(f"kueue preemption: Job spec writes per Job {ledger.updates}; suspend owners {ledger.changes}")
