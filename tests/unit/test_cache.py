"""Unit tests of the operator's watch-fed read-only store (kubetune.store) and the snapshot sizer
(kubetune.sizing.fleet_sizer)."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.store import ClusterStore, slim_ftj, slim_job, slim_pod
from kubetune_dev.devcluster.fleet import generate_fleet, node_manifests
from kubetune.sizing.fleet_sizer import SIZING_FIELDS, FleetSizer, sizing_key
from kubetune.sizing.layout import Layout, size_job_layout
from kubetune.reconcile import Observed, decide

pytestmark = pytest.mark.unit

NS = "team"
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": "lora",
    "training": {"maxSteps": 100, "learningRate": "2e-4"},
    "output": {"uri": "s3://out/run"},
}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=2, strategy="ddp",
                node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})


def ftj(rv: str, *, uid: str = "ftj-uid", phase: str = "", name: str = "demo") -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NS, "uid": uid, "resourceVersion": rv, "generation": 1,
                         "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(SPEC),
                                         "team.example/owner": "alice"}},
            "spec": copy.deepcopy(SPEC), "status": {"phase": phase} if phase else {}}


def finished_condition(ctype: str, reason: str, message: str) -> dict:
    """A Job condition as the Job controller writes it."""
    return {"type": ctype, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": "2026-01-01T12:09:00Z", "lastTransitionTime": "2026-01-01T12:09:00Z"}


def full_job(rv: str = "10", *, uid: str = "job-uid", conditions: list | None = None, **status) -> dict:
    """The trainer Job as the apiserver returns it (rendered children plus server-side fields)."""
    job = copy.deepcopy(build_children(JobRef("demo", NS, "ftj-uid"), SPEC, parse_spec(SPEC), LAYOUT,
                                       BuildConfig())[-1])
    job["metadata"].update(uid=uid, resourceVersion=rv, creationTimestamp="2026-01-01T11:59:00Z",
                           managedFields=[{"manager": "kubetune-operator"}])
    job["status"] = {"active": 2, "ready": 2, "terminating": 0, "startTime": "2026-01-01T11:59:01Z",
                     "uncountedTerminatedPods": {}, "conditions": conditions or [], **status}
    return job


def full_pod(index: int, phase: str, rv: str = "20", *, summary: dict | None = None, exit_code: int = 0,
             unschedulable: bool = False, job_uid: str = "job-uid") -> dict:
    """A trainer pod with the bulk a real one carries (spec, managedFields, all conditions)."""
    job = full_job()
    status: dict = {"phase": phase, "podIP": f"10.0.0.{index + 5}", "hostIP": "10.1.0.1", "qosClass": "Burstable",
                    "startTime": "2026-01-01T11:59:02Z",
                    "conditions": [{"type": "Initialized", "status": "True"},
                                   {"type": "PodScheduled", "status": "False" if unschedulable else "True",
                                    "reason": "Unschedulable" if unschedulable else "",
                                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
                                    if unschedulable else ""}]}
    if phase in ("Succeeded", "Failed"):
        status["containerStatuses"] = [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x",
                                        "state": {"terminated": {"exitCode": exit_code, "reason": "Completed",
                                                                 "message": json.dumps(summary or {}),
                                                                 "startedAt": "2026-01-01T11:59:03Z"}}}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"demo-trainer-{index}-abcde", "namespace": NS, "uid": f"pod-{index}",
                         "resourceVersion": rv, "creationTimestamp": f"2026-01-01T11:59:0{index}Z",
                         "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo-trainer",
                                              "uid": job_uid, "controller": True}],
                         "managedFields": [{"manager": "kube-controller-manager"}]},
            "spec": copy.deepcopy(job["spec"]["template"]["spec"]), "status": status}


def decide_with(job: dict | None, pods: list[dict], status: dict) -> tuple:
    d = decide(name="demo", generation=1, labels={}, spec=parse_spec(SPEC), spec_hash=spec_hash(SPEC),
               status=copy.deepcopy(status), observed=Observed(job=job, pods=pods, children_exist=True), now=T0)
    return d.status, [(a.kind, a.value) for a in d.actions], d.events


SCENARIOS = {
    "running": (full_job(), [full_pod(0, "Running"), full_pod(1, "Running")], {"phase": "Pending"}),
    "unschedulable": (full_job(), [full_pod(0, "Pending", unschedulable=True)], {"phase": "Pending"}),
    "succeeded": (full_job(conditions=[{"type": "Complete", "status": "True"}]),
                  [full_pod(0, "Succeeded", summary={"status": "Succeeded", "step": 100, "trainLoss": 1.5,
                                                     "artifacts": {"adapter": "s3://out/run/final/adapter"}}),
                   full_pod(1, "Succeeded")], {"phase": "Running"}),
    "retrying": (full_job(), [full_pod(0, "Failed", exit_code=1,
                                       summary={"status": "Failed", "reason": "NonFiniteLoss", "message": "NaN"}),
                              full_pod(1, "Running", rv="21")], {"phase": "Running"}),
    "foreign pods": (full_job(), [full_pod(0, "Running", job_uid="old-job")], {"phase": "Pending"}),
    "completed": (full_job(conditions=[finished_condition("SuccessCriteriaMet", "CompletionsReached",
                                                          "Reached expected number of succeeded pods"),
                                       finished_condition("Complete", "CompletionsReached",
                                                          "Reached expected number of succeeded pods")],
                           active=0, ready=0, succeeded=2, completedIndexes="0-1",
                           completionTime="2026-01-01T12:09:00Z"),
                  [full_pod(0, "Succeeded", summary={"status": "Succeeded", "step": 100, "trainLoss": 1.5}),
                   full_pod(1, "Succeeded")], {"phase": "Running", "startTime": "2026-01-01T11:59:30Z"}),
    "failed": (full_job(conditions=[finished_condition("FailureTarget", "BackoffLimitExceeded",
                                                       "Job has reached the specified backoff limit"),
                                    finished_condition("Failed", "BackoffLimitExceeded",
                                                       "Job has reached the specified backoff limit")],
                        active=0, ready=0, failed=3),
               [full_pod(0, "Failed", exit_code=1), full_pod(1, "Failed", exit_code=1, rv="21")],
               {"phase": "Running"}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_slim_copies_decide_exactly_like_the_full_objects(scenario):
    job, pods, status = SCENARIOS[scenario]
    full = decide_with(job, pods, status)
    slim = decide_with(slim_job(job), [slim_pod(p) for p in pods], status)
    assert slim == full
    assert len(json.dumps(slim_pod(pods[0]))) * 4 < len(json.dumps(pods[0]))  # the point of slimming
    kept = slim_job(job)["status"]
    assert set(kept) <= {"failed", "startTime", "completionTime", "conditions"}
    assert all(set(c) <= {"type", "status", "reason", "message"} for c in kept.get("conditions") or [])


def test_slim_ftj_drops_managed_fields_and_last_applied_only():
    obj = slim_ftj(ftj("5"))
    assert "managedFields" not in obj["metadata"]
    assert obj["metadata"]["annotations"] == {"team.example/owner": "alice"}
    assert obj["spec"] == SPEC and obj["metadata"]["resourceVersion"] == "5"


def test_stored_finetunejobs_are_compact_and_read_back_whole():
    import tracemalloc
    from pathlib import Path

    sample = json.loads((Path(__file__).resolve().parents[1] / "data" / "finetunejob-running.json").read_text())
    store = ClusterStore()
    assert store.observe_ftj(None, sample) is True
    key = (sample["metadata"]["namespace"], sample["metadata"]["name"])
    assert store.ftj(key) == slim_ftj(sample)  # what a pass reads is the whole slim object
    assert store.ftj_briefs() == [{"metadata": {"namespace": "team-a", "name": "sample", "labels": {}},
                                   "spec": {"ttlSecondsAfterFinished": sample["spec"].get("ttlSecondsAfterFinished")},
                                   "status": {"phase": "Running"}}]
    copies = []
    for i in range(500):
        obj = copy.deepcopy(sample)
        obj["metadata"]["name"], obj["metadata"]["uid"] = f"job-{i}", f"uid-{i}"
        copies.append(obj)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for obj in copies:
        store.observe_ftj(None, obj)
    per_job = (tracemalloc.get_traced_memory()[0] - before) / len(copies)
    before = tracemalloc.get_traced_memory()[0]
    as_dicts = [slim_ftj(obj) for obj in copies]  # what keeping the slim objects themselves costs
    per_dict = (tracemalloc.get_traced_memory()[0] - before) / len(copies)
    tracemalloc.stop()
    assert per_job < 0.8 * per_dict, (per_job, per_dict)
    assert len(as_dicts) == len(store.ftj_briefs()) - 1


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_stored_jobs_and_pods_read_back_as_their_slim_copies(scenario):
    job, pods, _ = SCENARIOS[scenario]
    store = ClusterStore()
    assert store.observe_job(None, job) == (NS, "demo")
    for pod in pods:
        assert store.observe_pod(None, pod) == (NS, "demo")  # through the stored Job's owner
    got_job, got_pods = store.children("ftj-uid")
    assert got_job == slim_job(job)
    mine = [slim_pod(p) for p in pods if p["metadata"]["ownerReferences"][0]["uid"] == "job-uid"]
    key = lambda p: p["metadata"]["uid"]  # noqa: E731
    assert sorted(got_pods, key=key) == sorted(mine, key=key)
    got_job["status"]["conditions"] = "changed by a caller"  # reads are copies
    assert store.children("ftj-uid")[0] == slim_job(job)
    assert store.observe_job("MODIFIED", job) == (NS, "demo")  # the same version again changes nothing
    assert store.children("ftj-uid")[0] == slim_job(job)


def test_stored_jobs_and_pods_are_compact():
    import tracemalloc

    job, pods, _ = SCENARIOS["completed"]
    jobs, all_pods = [], []
    for i in range(300):
        j = copy.deepcopy(job)
        j["metadata"]["uid"] = f"job-{i}"
        jobs.append(j)
        for p in pods:
            p = copy.deepcopy(p)
            p["metadata"]["uid"] += f"-{i}"
            p["metadata"]["ownerReferences"][0]["uid"] = f"job-{i}"
            all_pods.append(p)
    store = ClusterStore()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for obj in jobs:
        store.observe_job(None, obj)
    for obj in all_pods:
        store.observe_pod(None, obj)
    stored = tracemalloc.get_traced_memory()[0] - before
    before = tracemalloc.get_traced_memory()[0]
    as_dicts = [slim_job(obj) for obj in jobs] + [slim_pod(obj) for obj in all_pods]
    dicts = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert stored < 0.6 * dicts, (stored, dicts)
    assert store.sizes() == {"finetunejobs": 0, "jobs": 300, "pods": 600} and len(as_dicts) == 900


def test_older_events_are_not_news_but_newer_ones_are():
    store = ClusterStore()
    assert store.observe_ftj(None, ftj("5")) is True  # listed at start
    assert store.observe_ftj("MODIFIED", ftj("7", phase="Pending")) is True  # the echo of our status write
    assert store.ftj_version((NS, "demo")) == ("ftj-uid", 7)
    assert store.observe_ftj("MODIFIED", ftj("6")) is False  # an older event arriving late
    assert store.observe_ftj("MODIFIED", ftj("7", phase="Pending")) is False  # the same event again
    assert store.ftj((NS, "demo"))["status"]["phase"] == "Pending"
    assert store.observe_ftj("MODIFIED", ftj("9", phase="Running")) is True  # someone else's change
    assert store.ftj((NS, "demo"))["status"]["phase"] == "Running"


def test_the_store_has_no_write_through():
    """Only watch events write the store: a pass that wrote something waits for the watch to show it."""
    assert not [m for m in dir(ClusterStore) if m.startswith(("store_", "mark_", "forget"))]


def test_recreated_object_with_the_same_name_replaces_the_old_one():
    store = ClusterStore()
    store.observe_ftj("ADDED", ftj("50"))
    assert store.observe_ftj("DELETED", ftj("40", uid="older-uid")) is True  # not the stored object
    assert store.has_ftj((NS, "demo"))
    assert store.observe_ftj("DELETED", ftj("51")) is True
    assert not store.has_ftj((NS, "demo")) and store.ftj((NS, "demo")) is None
    assert store.observe_ftj("ADDED", ftj("3", uid="new-uid")) is True  # new uid: news whatever its version
    assert store.ftj((NS, "demo"))["metadata"]["uid"] == "new-uid"


def test_children_are_found_by_owner_uid_and_reads_are_copies():
    store = ClusterStore()
    key = (NS, "demo")
    assert store.children("ftj-uid") == (None, [])
    assert store.observe_pod("ADDED", full_pod(0, "Pending", rv="11")) == key  # before its Job: label hint
    assert store.observe_job("ADDED", full_job("10")) == key
    assert store.observe_pod("MODIFIED", full_pod(0, "Running", rv="12")) == key
    assert store.observe_pod("MODIFIED", full_pod(0, "Pending", rv="11")) == key  # stale: ignored
    job, pods = store.children("ftj-uid")
    assert job["metadata"]["uid"] == "job-uid"
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    pods[0]["status"]["phase"] = "Failed"
    job["status"]["failed"] = 9
    assert store.children("ftj-uid")[1][0]["status"]["phase"] == "Running"
    assert "failed" not in store.children("ftj-uid")[0]["status"]
    store.observe_pod("DELETED", full_pod(0, "Running", rv="13"))
    store.observe_job("DELETED", full_job("14"))
    assert store.children("ftj-uid") == (None, [])
    assert store.observe_job("ADDED", {"metadata": {"name": "x", "namespace": NS, "uid": "u", "labels": {}}}) is None
    assert store.sizes() == {"finetunejobs": 0, "jobs": 1, "pods": 0}


def test_a_child_with_our_name_but_another_owner_is_not_ours():
    """A re-created FineTuneJob (new UID) never follows the Job and pods of the deleted one, and an orphaned
    Job (ownerReferences removed by --cascade=orphan) is nobody's child."""
    store = ClusterStore()
    store.observe_job("ADDED", full_job("10"))  # owned by ftj-uid
    store.observe_pod("ADDED", full_pod(0, "Running", rv="11"))
    orphan = full_job("12", uid="orphan-job")
    orphan["metadata"]["ownerReferences"] = []
    assert store.observe_job("ADDED", orphan) == (NS, "demo")  # still a hint to look again
    assert store.children("new-ftj-uid") == (None, [])
    job, pods = store.children("ftj-uid")
    assert job["metadata"]["uid"] == "job-uid" and len(pods) == 1
    foreign = full_pod(1, "Running", rv="13", job_uid="orphan-job")
    store.observe_pod("ADDED", foreign)
    assert len(store.children("ftj-uid")[1]) == 1  # a pod of another Job is not this Job's pod


# --- the snapshot sizer -----------------------------------------------------------------------------

BENCH_SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
    "dataset": {"uri": "s3://bench/datasets/chats.jsonl", "format": "messages"},
    "method": "lora",
    "training": {"epochs": 1, "microBatchSize": 1, "maxSeqLength": 2048, "gradientCheckpointing": True},
    "output": {"uri": "s3://bench/outputs/run"},
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counting_lister(nodes: list[dict]):
    calls = []

    def list_nodes() -> list[dict]:
        calls.append(1)
        return nodes
    return list_nodes, calls


def test_sizer_lists_nodes_once_per_snapshot_and_memoizes_by_sizing_fields():
    nodes = node_manifests(generate_fleet(40))
    list_nodes, calls = counting_lister(nodes)
    clock = Clock()
    sizer = FleetSizer(list_nodes, ttl_seconds=5.0, clock=clock)
    first = sizer.size(parse_spec(BENCH_SPEC))
    direct = size_job_layout(parse_spec(BENCH_SPEC), nodes)
    assert first == direct and first.fits
    other = copy.deepcopy(BENCH_SPEC)
    other["output"]["uri"], other["dataset"]["uri"] = "s3://elsewhere/out", "s3://elsewhere/data.jsonl"
    assert sizer.size(parse_spec(other)) == first
    assert (sizer.hits, sizer.misses, len(calls)) == (1, 1, 1)
    longer = copy.deepcopy(BENCH_SPEC)
    longer["training"]["maxSeqLength"] = 8192
    assert sizer.size(parse_spec(longer)) == size_job_layout(parse_spec(longer), nodes)
    assert sizer.misses == 2
    clock.now = 6.0  # the snapshot expired: nodes are listed again and the memo starts over
    sizer.size(parse_spec(BENCH_SPEC))
    assert (len(calls), sizer.misses, sizer.snapshots) == (2, 3, 2)


def test_sizer_returns_private_copies():
    sizer = FleetSizer(counting_lister(node_manifests(generate_fleet(10)))[0])
    first = sizer.size(parse_spec(BENCH_SPEC))
    first.plan_status["tampered"] = True
    assert "tampered" not in sizer.size(parse_spec(BENCH_SPEC)).plan_status


def test_fields_outside_the_sizing_key_do_not_change_the_layout():
    """Guards SIZING_FIELDS: if the sizer starts reading another spec field, this fails."""
    nodes = node_manifests(generate_fleet(40))
    base = size_job_layout(parse_spec(BENCH_SPEC), nodes)
    varied = copy.deepcopy(BENCH_SPEC)
    varied.update(dataset={"uri": "pvc://data/other.jsonl", "format": "alpaca", "evalSplit": 0.2},
                  output={"uri": "pvc://out/x", "mergeAdapter": True}, image="example/trainer:2",
                  suspend=True, cancel=False, backoffLimit=9, activeDeadlineSeconds=60, ttlSecondsAfterFinished=5,
                  secrets={"hfTokenSecretRef": {"name": "hf", "key": "token"}})
    assert set(varied) - set(SIZING_FIELDS) >= {"dataset", "output", "image", "secrets"}
    assert sizing_key(parse_spec(varied)) == sizing_key(parse_spec(BENCH_SPEC))
    assert size_job_layout(parse_spec(varied), nodes) == base


def test_a_relist_that_no_longer_finds_a_job_and_its_pods_empties_the_store():
    """A relist delivers objects it no longer finds as DELETED with the watch's stub of them."""
    from kubetune.child_watch import stub

    job, pods, _ = SCENARIOS["running"]
    store = ClusterStore()
    store.observe_job(None, job)
    for pod in pods:
        store.observe_pod(None, pod)
    for pod in pods:
        assert store.observe_pod("DELETED", stub(pod)) == (NS, "demo")
    assert store.observe_job("DELETED", stub(job)) == (NS, "demo")
    assert store.sizes() == {"finetunejobs": 0, "jobs": 0, "pods": 0}
    assert store._job_of == {} and store._pods_of == {}  # noqa: SLF001 - the owner indexes are emptied too


def test_a_watch_remembers_a_few_hundred_bytes_per_pod():
    import sys

    from kubetune.child_watch import ChildWatch

    watch = ChildWatch("pods", lambda **_: None, lambda *_: None, lambda _: None)
    pods = [json.loads(json.dumps(full_pod(i % 2, "Running"))) for i in range(50)]  # as the watch decodes them
    memos = [watch._memo(p) for p in pods]  # noqa: SLF001 - what it keeps of each until it is deleted
    # One bytes object per pod, holding nothing of the decoded pod (a dict of it held ~1.2 KB per test pod).
    assert all(type(m) is bytes for m in memos)
    assert max(sys.getsizeof(m) for m in memos) < 400, max(sys.getsizeof(m) for m in memos)
    assert json.loads(memos[0])["metadata"]["uid"] == "pod-0"


def test_a_trainer_job_without_pods_yet_counts_the_gpus_it_will_ask_for():
    """LAYOUT: 2 pods x 1 L4. Counted from the Job's creation until its first pod is seen, never while it is
    suspended, being deleted or finished."""
    from kubetune.sizing.fleet import GpuHolding

    store = ClusterStore()
    store.observe_job("ADDED", full_job("10"))
    assert store.podless_job_gpus() == [GpuHolding("", "NVIDIA-L4", 2, "job-uid")]
    store.observe_pod("ADDED", full_pod(0, "Pending", rv="11"))
    # The pod watch counts pod 0 from now on; pod 1, not created yet, is still the Job's to count.
    assert store.podless_job_gpus() == [GpuHolding("", "NVIDIA-L4", 1, "job-uid")]
    store.observe_pod("ADDED", full_pod(1, "Pending", rv="12"))
    assert store.podless_job_gpus() == []
    # A failed pod is replaced by the Job controller: its GPUs are asked for again until the new pod exists;
    # a succeeded one's index is done.
    store.observe_pod("MODIFIED", full_pod(1, "Failed", rv="13"))
    store.observe_pod("MODIFIED", full_pod(0, "Succeeded", rv="14"))
    assert store.podless_job_gpus() == [GpuHolding("", "NVIDIA-L4", 1, "job-uid")]
    store.observe_pod("DELETED", full_pod(1, "Failed", rv="15"))
    store.observe_pod("DELETED", full_pod(0, "Succeeded", rv="16"))
    assert store.podless_job_gpus() == [GpuHolding("", "NVIDIA-L4", 2, "job-uid")]
    suspended = full_job("13")
    suspended["spec"]["suspend"] = True
    store.observe_job("MODIFIED", suspended)
    assert store.podless_job_gpus() == []
    store.observe_job("MODIFIED", full_job("14", conditions=[finished_condition("Complete", "Done", "")]))
    assert store.podless_job_gpus() == []
    deleting = full_job("15")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T12:10:00Z"
    store.observe_job("MODIFIED", deleting)
    assert store.podless_job_gpus() == []
    store.observe_job("MODIFIED", full_job("16"))
    store.observe_job("DELETED", full_job("17"))
    assert store.podless_job_gpus() == []
