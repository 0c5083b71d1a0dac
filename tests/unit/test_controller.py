"""The controller runtime without a cluster: one pass per key from the read-only store, expectations instead
of write-through, requeue-after from the decision, per-key backoff on errors, progress off the pass."""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
from types import SimpleNamespace

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children
from kubetune.children import NotOwned
from kubetune.controller import OperatorConfig, Reconciler
from kubetune.metrics import OperatorMetrics
from kubetune.sizing.layout import Layout, SizingOutcome

pytestmark = pytest.mark.unit

NS, NAME, UID = "team", "demo", "ftj-uid"
KEY = (NS, NAME)
SPEC = {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B"}, "dataset": {"uri": "s3://data/train.jsonl"},
        "method": "lora", "output": {"uri": "s3://out/run"}}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none",
                node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class FakeChildren:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.objects: list[dict] = []  # what was applied, in order
        self.calls: list[str] = []  # deletes and applies, in order
        self.not_owned: NotOwned | None = None
        self.created_job_uid = ""  # the UID the apiserver gives a created Job ('' = not returned)
        self.core = SimpleNamespace(create_namespaced_event=self._event)
        self.events: list[dict] = []

    def _event(self, ns, body, **_):
        self.events.append(body)
        return SimpleNamespace(data=b"{}")

    def apply(self, obj):
        if self.not_owned is not None and self.not_owned.kind == obj["kind"]:
            raise self.not_owned
        self.applied.append(obj["kind"])
        self.objects.append(copy.deepcopy(obj))
        self.calls.append(f"apply {obj['kind']}")
        if obj["kind"] == "Job" and self.created_job_uid:
            return "created", {"metadata": {"uid": self.created_job_uid}, "spec": obj["spec"]}
        return "created", None

    def delete_job(self, ns, job, name="", foreground=False):
        self.calls.append("delete Job")

    def other_children_exist(self, ns, name):
        return False


class FakeObjects:
    """patch_namespaced_custom_object_status with the apiserver's resourceVersion precondition."""

    def __init__(self, rv: int) -> None:
        self.rv = rv
        self.patches: list[dict] = []

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, patch, **_):
        if str(patch["metadata"]["resourceVersion"]) != str(self.rv):
            raise ApiException(status=409, reason="Conflict")
        self.patches.append(patch)
        self.rv += 1
        return SimpleNamespace(data=json.dumps({"metadata": {"resourceVersion": str(self.rv)}}).encode())


class FakeSizer:
    def __init__(self, outcome: SizingOutcome) -> None:
        self.outcome, self.calls = outcome, 0
        self.handed_out: list = []

    def hand_out(self, held):
        self.handed_out.append(held)

    def size(self, spec, avoid=frozenset()):
        self.calls += 1
        self.avoided = avoid
        return copy.deepcopy(self.outcome)


def ftj(rv: int, status: dict | None = None) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": NAME, "namespace": NS, "uid": UID, "resourceVersion": str(rv), "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": copy.deepcopy(SPEC), "status": status or {}}


def controller(outcome: SizingOutcome | None = None, *, retry: float = 45.0, preflight: bool = False):
    """A Reconciler on fakes (the preflight's own passes are tested in test_preflight_flow.py)."""
    clock = Clock()
    rec = Reconciler(client.ApiClient(), OperatorConfig(sizing_retry_seconds=retry, preflight=preflight),
                     OperatorMetrics(), clock=clock)
    rec.children = FakeChildren()
    rec.objects = FakeObjects(rv=10)
    rec.sizer = FakeSizer(outcome or SizingOutcome(True, LAYOUT, R.SIZED, "sized", plan_status={"fits": True}))
    rec.store.observe_ftj("ADDED", ftj(10))
    return rec, clock


def the_job() -> dict:
    job = build_children(JobRef(NAME, NS, UID), SPEC, parse_spec(SPEC), LAYOUT, BuildConfig())[-1]
    job = copy.deepcopy(job)
    job["metadata"].update(uid="job-uid", resourceVersion="12")
    job["status"] = {}
    return job


A100_LAYOUT = Layout(gpu_type="A100-80GB", gpus_per_pod=1, pods=1, strategy="none",
                     node_selector={"nvidia.com/gpu.product": "A100-80GB"})


def stuck_pod(seconds: float) -> dict:
    """A pod of the_job() that the scheduler has not placed for `seconds`."""
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)
    return {"metadata": {"name": f"{NAME}-trainer-0-x", "namespace": NS, "uid": "pod-uid",
                         "ownerReferences": [{"uid": "job-uid", "kind": "Job", "name": f"{NAME}-trainer",
                                              "controller": True}]},
            "spec": {}, "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes",
                 "lastTransitionTime": since.isoformat().replace("+00:00", "Z")}]}}


def moving_controller():
    """A job on L4 whose pod waited 400 s for a node, with A100s free now: the sizer's next answer."""
    moved = SizingOutcome(True, A100_LAYOUT, R.SIZED, "sized on A100-80GB", plan_status={"fits": True},
                          free_now=True)
    rec, clock = controller(moved)
    rec.config.resize_unschedulable_seconds = 300
    status = {"phase": "Pending", "reason": R.WAITING_FOR_PODS,
              "layout": {**LAYOUT.to_status(), "source": "sizer"}}
    rec.store.observe_ftj("MODIFIED", ftj(11, status))
    rec.objects.rv = 11
    rec.store.observe_job("ADDED", the_job())
    rec.store.observe_pod("ADDED", stuck_pod(400))
    return rec, status


def test_a_move_deletes_and_creates_in_one_pass_and_waits_for_the_new_job_by_its_uid():
    rec, _ = moving_controller()
    rec.children.created_job_uid = "new-job-uid"
    result = rec.process(KEY)
    assert rec.children.calls == ["delete Job", "apply ConfigMap", "apply Job"]
    st = result.decision.status
    assert st["reason"] == R.RESIZING and st["layout"]["gpuType"] == "A100-80GB"
    assert st["unschedulableGpuTypes"] == ["NVIDIA-L4"] and rec.sizer.avoided == {"NVIDIA-L4"}
    rec.store.observe_ftj("MODIFIED", ftj(12, st))  # the status echo; the old Job's DELETED has not come yet
    waiting = rec.process(KEY)
    assert "Job has not been seen" in waiting.waited and rec.children.calls[-1] == "apply Job"
    rec.store.observe_job("DELETED", the_job())
    new = the_job()
    new["metadata"]["uid"] = "new-job-uid"
    rec.store.observe_job("ADDED", new)
    follow = rec.process(KEY)
    assert follow.decision is not None and not follow.decision.actions


def test_a_move_whose_old_job_still_terminates_keeps_the_new_layout_and_creates_later():
    rec, _ = moving_controller()
    rec.children.not_owned = NotOwned("Job", f"{NAME}-trainer", "FineTuneJob demo (uid ftj-uid)", deleting=True)
    result = rec.process(KEY)
    assert rec.children.calls == ["delete Job", "apply ConfigMap"]
    st = result.decision.status
    assert st["reason"] == R.RESIZING and st["layout"]["gpuType"] == "A100-80GB"
    assert rec.objects.patches and rec.objects.patches[-1]["status"]["layout"]["gpuType"] == "A100-80GB"
    # The next pass sees the old Job marked for deletion: it is not re-sized from its stuck pods.
    rec.store.observe_ftj("MODIFIED", ftj(12, st))
    terminating = the_job()
    terminating["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z", resourceVersion="13")
    rec.store.observe_job("MODIFIED", terminating)
    calls = list(rec.children.calls)
    again = rec.process(KEY)
    assert again.decision is not None and rec.children.calls == calls and rec.sizer.calls == 1


def test_a_move_whose_status_write_is_refused_takes_the_layout_from_the_new_job():
    rec, status = moving_controller()
    rec.children.created_job_uid = "new-job-uid"
    rec.objects.rv = 99  # the FineTuneJob changed meanwhile: the move's status write gets a 409
    assert rec.process(KEY) is None
    assert rec.children.calls == ["delete Job", "apply ConfigMap", "apply Job"] and not rec.objects.patches
    # The watch brings the edit (the status still says L4), the old Job's deletion and the new Job.
    rec.store.observe_ftj("MODIFIED", ftj(99, status))
    rec.store.observe_job("DELETED", the_job())
    new = copy.deepcopy(rec.children.objects[-1])
    new["metadata"].update(uid="new-job-uid", resourceVersion="20")
    new["status"] = {}
    rec.store.observe_job("ADDED", new)
    follow = rec.process(KEY)
    assert follow is not None and follow.decision is not None and not follow.decision.actions
    written = rec.objects.patches[-1]["status"]
    assert written["layout"]["gpuType"] == "A100-80GB" and written["unschedulableGpuTypes"] == ["NVIDIA-L4"]
    assert rec.children.calls == ["delete Job", "apply ConfigMap", "apply Job"]  # nothing moved twice


def test_a_created_job_is_not_created_again_before_the_watch_shows_it():
    rec, clock = controller()
    first = rec.process(KEY)
    assert rec.children.applied == ["ConfigMap", "Job"] and len(rec.objects.patches) == 1
    assert first.decision.status["phase"] == "Pending"
    # The watch has not delivered the status echo nor the Job: the next pass waits and comes back soon.
    again = rec.process(KEY)
    assert again.decision is None and "resourceVersion" in again.waited
    assert rec.queue.delayed()[KEY] == pytest.approx(1.0)
    rec.store.observe_ftj("MODIFIED", ftj(11, first.decision.status))  # the status echo arrives
    waiting = rec.process(KEY)
    assert "Job has not been seen" in waiting.waited
    assert rec.children.applied == ["ConfigMap", "Job"] and rec.sizer.calls == 1
    rec.store.observe_job("ADDED", the_job())
    follow = rec.process(KEY)
    assert follow.decision is not None and not follow.decision.actions
    assert rec.children.applied == ["ConfigMap", "Job"]


def test_a_lost_event_does_not_stall_the_job_forever():
    rec, clock = controller()
    first = rec.process(KEY)
    rec.store.observe_ftj("MODIFIED", ftj(11, first.decision.status))
    assert rec.process(KEY).waited
    clock.now += 31  # the Job event never came: the expectation expires and the pass runs
    assert rec.process(KEY).decision is not None


def test_the_sizing_retry_delay_is_used():
    refused = SizingOutcome(False, None, R.INSUFFICIENT_GPU, "needs 90 GiB per GPU", "use qlora", {"fits": False})
    rec, clock = controller(refused, retry=45.0)
    result = rec.process(KEY)
    assert result.requeue_after == 45.0
    assert rec.queue.delayed()[KEY] == pytest.approx(45.0)
    assert not rec.children.applied


def test_errors_back_off_per_key_and_success_resets():
    rec, clock = controller()
    rec.store.observe_job("ADDED", the_job())
    rec.objects.rv = 99  # every status write conflicts: the store is behind
    for expected in (0.5, 1.0, 2.0):
        assert rec.process(KEY) is None
        assert rec.queue.delayed()[KEY] == pytest.approx(expected)
        rec.queue._deadline.clear()  # noqa: SLF001 - look at each delay on its own
    rec.objects.rv = 10
    assert rec.process(KEY).decision.status["reason"] == R.WAITING_FOR_PODS
    metrics = rec.metrics.registry
    assert metrics.get_sample_value("kubetune_workqueue_retries_total") == 3
    assert metrics.get_sample_value("kubetune_workqueue_delayed") == 0
    rec.queue.add_after(KEY, 5)
    assert metrics.get_sample_value("kubetune_workqueue_delayed") == 1
    assert metrics.get_sample_value("kubetune_workqueue_depth") == 0
    assert rec.queue.failures(KEY) == 0


def test_a_child_name_held_by_another_owner_is_reported():
    rec, clock = controller()
    rec.children.not_owned = NotOwned("ConfigMap", "demo-plan", "FineTuneJob demo (uid old)")
    result = rec.process(KEY)
    status = result.decision.status
    assert status["reason"] == R.CHILD_NOT_OWNED and "demo-plan" in status["message"]
    assert [e["reason"] for e in rec.children.events] == [R.CHILD_NOT_OWNED]
    assert rec.queue.delayed()[KEY] == pytest.approx(45.0)


def test_progress_comes_from_the_poller_not_the_pass():
    rec, clock = controller()
    job = the_job()
    pod = {"metadata": {"name": "demo-trainer-0-x", "namespace": NS, "uid": "pod-uid", "resourceVersion": "13",
                        "labels": {"kubetune.io/job": NAME},
                        "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                        "ownerReferences": [{"kind": "Job", "name": "demo-trainer", "uid": "job-uid",
                                             "controller": True}]},
           "status": {"phase": "Running", "podIP": "10.0.0.7"}}
    rec.store.observe_ftj("MODIFIED", ftj(11, {"phase": "Pending", "layout": {"pods": 1, "totalGpus": 1}}))
    rec.objects.rv = 11
    rec.store.observe_job("ADDED", job)
    rec.store.observe_pod("ADDED", pod)
    fetched: list[str] = []

    def fetch(host, port, timeout):
        fetched.append(host)
        return {"version": 1, "step": 5, "totalSteps": 10, "trainLoss": 1.25}

    rec.poller._fetch = fetch  # noqa: SLF001
    first = rec.process(KEY)
    assert fetched == [] and first.decision.status["phase"] == "Running"
    assert rec.poller.tracked() == {KEY: "10.0.0.7"}
    assert rec.poller.poll_once() == [KEY]  # changed: a pass is queued
    assert rec.queue.depth() == 1
    rec.store.observe_ftj("MODIFIED", ftj(12, first.decision.status))
    second = rec.process(KEY)
    assert second.decision.status["progress"]["step"] == 5
    assert second.decision.status["metrics"]["trainLoss"] == 1.25
    assert rec.poller.poll_once() == []  # unchanged: no pass


def test_a_job_whose_status_write_was_lost_gets_its_layout_back():
    """The operator stopped right after creating the Job: the next operator finds the Job, no layout in
    the status, and records the layout, plan and Sized condition (GPU-hours need the layout)."""
    rec, clock = controller()
    rec.store.observe_job("ADDED", the_job())
    result = rec.process(KEY)
    status = result.decision.status
    assert status["layout"]["totalGpus"] == 1 and status["plan"] == {"fits": True}
    assert [c["status"] for c in status["conditions"] if c["type"] == "Sized"] == ["True"]
    assert "gpuHours" in status["accounting"] and rec.sizer.calls == 1
    assert not rec.children.applied  # nothing created again


def test_a_missing_secret_is_named_in_the_status_and_an_event():
    rec, clock = controller()
    rec.store.observe_ftj("MODIFIED", ftj(11, {"phase": "Pending", "layout": {"pods": 1, "totalGpus": 1}}))
    rec.objects.rv = 11
    rec.store.observe_job("ADDED", the_job())
    rec.store.observe_pod("ADDED", {
        "metadata": {"name": "demo-trainer-0-x", "namespace": NS, "uid": "pod-uid", "resourceVersion": "13",
                     "ownerReferences": [{"kind": "Job", "name": "demo-trainer", "uid": "job-uid", "controller": True}]},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {
            "reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}}}]}})
    status = rec.process(KEY).decision.status
    assert status["reason"] == R.CONTAINER_NOT_STARTING
    assert 'secret "hf-token" not found' in status["message"]
    assert [(e["type"], e["reason"]) for e in rec.children.events] == [("Warning", R.CONTAINER_NOT_STARTING)]


def _api_error(code: int, message: str) -> ApiException:
    exc = ApiException(status=code, reason="Unprocessable Entity" if code == 422 else "Forbidden")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


def test_a_child_the_apiserver_refuses_becomes_status_and_an_event():
    rec, clock = controller()
    message = 'Job.batch "x-trainer" is invalid: spec.template.labels: Invalid value: must be no more than 63 characters'

    def refuse(obj):
        raise _api_error(422, message)
    rec.children.apply = refuse
    status = rec.process(KEY).decision.status
    assert status["reason"] == R.CHILD_REJECTED and "63 characters" in status["message"] and "422" in status["message"]
    assert [e["reason"] for e in rec.children.events] == [R.CHILD_REJECTED]
    assert rec.queue.failures(KEY) == 0 and rec.queue.delayed()[KEY] == pytest.approx(45.0)


def test_a_terminating_namespace_is_nothing_to_do(caplog):
    rec, clock = controller()

    def refuse(obj):
        raise _api_error(403, 'configmaps "demo-plan" is forbidden: unable to create new content in namespace '
                              'team because it is being terminated')
    rec.children.apply = refuse
    with caplog.at_level("INFO", logger="kubetune.operator"):
        assert rec.process(KEY).decision is None
        assert rec.process(KEY).decision is None
    assert not rec.objects.patches and not rec.children.events
    assert sum("being deleted" in r.message for r in caplog.records) == 1
    # Only this thread's records: a daemon thread of another test's fixture (a process node whose apiserver
    # went away) may log into caplog while this test runs.
    assert not [r for r in caplog.records
                if r.thread == threading.get_ident() and r.levelname in ("WARNING", "ERROR")]


def test_a_created_trainer_job_hands_its_gpus_out_of_the_sizers_snapshot():
    rec, _ = controller()
    rec.process(KEY)
    assert rec.children.applied == ["ConfigMap", "Job"]
    assert [(h.product, h.gpus) for h in rec.sizer.handed_out] == [("NVIDIA-L4", 1)]


def test_a_suspended_trainer_job_hands_out_no_gpus():
    """A Job created suspended (for Kueue) requests no GPUs until it is admitted."""
    rec, _ = controller()
    queued = ftj(11)
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus"}
    rec.store.observe_ftj("MODIFIED", queued)
    rec.objects.rv = 11
    rec.process(KEY)
    jobs = [o for o in rec.children.objects if o["kind"] == "Job"]
    assert jobs and jobs[0]["spec"]["suspend"] is True
    assert rec.sizer.handed_out == []


def test_the_sizer_counts_pod_watch_holdings_and_this_operators_jobs_without_pods():
    from kubetune.sizing.fleet import GpuHolding

    rec, _ = controller()
    bound = GpuHolding("node-1", "", 4)
    rec.gpu_pods = SimpleNamespace(pods=lambda: [bound])
    rec.store.observe_job("ADDED", the_job())  # 1 x L4, no pod seen yet
    assert rec._gpu_holdings() == [bound, GpuHolding("", "NVIDIA-L4", 1, "job-uid")]
    rec.gpu_pods = SimpleNamespace(pods=lambda: None)  # the pod watch has not listed yet: occupancy unknown
    assert rec._gpu_holdings() is None
