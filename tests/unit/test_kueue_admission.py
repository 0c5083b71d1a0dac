"""Kueue's verdict on a trainer Job (its Workload) folded into the FineTuneJob's status by the pure core:
kubetune.kueue_admission maps the Workload's conditions to a reason and message, decide() shows them as phase
Queued, an Admitted condition and Events, and never touches the Job's suspend for Kueue."""

from __future__ import annotations

import datetime as dt

import pytest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.kueue_admission import admission, flavors
from kubetune.reconcile import Observed
from kubetune.store import ClusterStore, slim_workload
from tests.unit.test_reconcile import LAYOUT, SPEC, T0, cond_of, fits, job_obj, pod, run

pytestmark = pytest.mark.unit

LABELS = {"kueue.x-k8s.io/queue-name": "team-a"}
NO_QUOTA = ("couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor h100, "
            "request > maximum capacity (16 > 8)")


def workload(*conds: tuple[str, str, str, str], admitted_to: str = "", flavor: str = "", active: bool = True) -> dict:
    """A Workload owned by job_obj()'s Job with these (type, status, reason, message) conditions."""
    wl: dict = {"metadata": {"name": "job-demo-trainer-abc12", "namespace": "ns", "uid": "wl-uid",
                             "resourceVersion": "7",
                             "ownerReferences": [{"kind": "Job", "name": "demo-trainer", "uid": "job-uid",
                                                  "controller": True}]},
                "spec": {"active": active},
                "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m,
                                           "lastTransitionTime": "2026-01-01T12:00:00Z"} for t, s, r, m in conds]}}
    if admitted_to:
        wl["status"]["admission"] = {"clusterQueue": admitted_to,
                                     "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": flavor}}]}
    return wl


PENDING = workload(("QuotaReserved", "False", "Pending", NO_QUOTA))
ADMITTED = workload(("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
                    ("Admitted", "True", "Admitted", "The workload is admitted"), admitted_to="gpus", flavor="h100")
PREEMPTED = workload(("QuotaReserved", "False", "Pending", "Preempted to accommodate a workload (UID: x) due to "
                      "prioritization in the ClusterQueue"),
                     ("Admitted", "False", "NoReservation", "The workload has no reservation"),
                     ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: x) due to "
                      "prioritization in the ClusterQueue"),
                     ("Preempted", "True", "InClusterQueue", "Preempted to accommodate a workload (UID: x) due to "
                      "prioritization in the ClusterQueue"))


def test_workload_verdicts_map_to_reasons_with_kueue_words() -> None:
    assert admission(None, "team-a").reason == R.QUEUED
    pending = admission(PENDING, "team-a")
    assert (pending.admitted, pending.reason) == (False, R.QUEUED) and "(16 > 8)" in pending.message
    assert "team-a" in pending.message
    ok = admission(ADMITTED, "team-a")
    assert ok.admitted and ok.reason == R.KUEUE_ADMITTED and "'gpus'" in ok.message and "h100" in ok.message
    out = admission(PREEMPTED, "team-a")
    assert (out.admitted, out.reason, out.evicted) == (False, R.KUEUE_PREEMPTED, True)
    assert "prioritization in the ClusterQueue" in out.message
    stopped = admission(workload(("Evicted", "True", "ClusterQueueStopped", "The ClusterQueue is stopped")), "q")
    assert stopped.reason == R.KUEUE_EVICTED and "ClusterQueue is stopped" in stopped.message
    inactive = admission(workload(active=False), "q")
    assert inactive.reason == R.KUEUE_INACTIVE and "spec.active" in inactive.message
    assert flavors(ADMITTED) == ["h100"] and flavors(PENDING) == []


def test_queued_shows_kueue_message_condition_and_one_event_per_change() -> None:
    first = run(observed=fits(), labels=LABELS)  # the Job is created suspended; no Workload yet
    assert first.status["phase"] == "Queued" and first.status["reason"] == R.QUEUED
    waiting = run(status=first.status, observed=Observed(job=job_obj(suspend=True), workload=PENDING),
                  labels=LABELS)
    assert waiting.status["phase"] == "Queued" and "(16 > 8)" in waiting.status["message"]
    admitted = cond_of(waiting.status, C.ADMITTED)
    assert admitted["status"] == "False" and "(16 > 8)" in admitted["message"]
    assert [e for e in waiting.events if "(16 > 8)" in e[2]], waiting.events
    assert not [a for a in waiting.actions if a.kind == "suspend_job"]
    again = run(status=waiting.status, observed=Observed(job=job_obj(suspend=True), workload=PENDING),
                labels=LABELS, now=T0 + dt.timedelta(seconds=30))
    assert again.events == [] and again.status["message"] == waiting.status["message"]
    other = workload(("QuotaReserved", "False", "Pending", NO_QUOTA.replace("16 > 8", "16 > 12")))
    changed = run(status=again.status, observed=Observed(job=job_obj(suspend=True), workload=other), labels=LABELS)
    assert len(changed.events) == 1 and "(16 > 12)" in changed.events[0][2]


def test_admitted_running_then_preempted_stops_the_clock_and_warns() -> None:
    status = {"phase": "Queued", "reason": R.QUEUED, "layout": LAYOUT.to_status()}
    running = run(status=status, observed=Observed(job=job_obj(), pods=[pod("Running")], workload=ADMITTED),
                  labels=LABELS)
    assert running.status["phase"] == "Running"
    assert cond_of(running.status, C.ADMITTED)["status"] == "True"
    assert cond_of(running.status, C.ADMITTED)["reason"] == R.KUEUE_ADMITTED
    hour = T0 + dt.timedelta(hours=1)
    # Kueue preempted it: the Workload is evicted and Kueue suspended the Job again; its pod is going away.
    evicted = run(status=running.status, observed=Observed(job=job_obj(suspend=True), workload=PREEMPTED),
                  labels=LABELS, now=hour)
    st = evicted.status
    # Seen while its pod still runs (being deleted): the GPU is held until it exits, the clock runs on.
    stopping_pod = pod("Running")
    stopping_pod["metadata"]["deletionTimestamp"] = "2026-01-01T12:59:50Z"
    stopping = run(status=running.status, observed=Observed(job=job_obj(suspend=True), pods=[stopping_pod],
                                                            workload=PREEMPTED), labels=LABELS, now=hour)
    assert stopping.status["reason"] == R.KUEUE_PREEMPTED and "runningSince" in stopping.status["accounting"]
    assert (st["phase"], st["reason"]) == ("Queued", R.KUEUE_PREEMPTED)
    assert "runningSince" not in st["accounting"] and st["accounting"]["gpuHours"] == pytest.approx(1.0)
    assert cond_of(st, C.ADMITTED)["status"] == "False" and cond_of(st, C.ADMITTED)["reason"] == R.KUEUE_PREEMPTED
    assert [e for e in evicted.events if e[0] == "Warning" and e[1] == R.KUEUE_PREEMPTED], evicted.events
    assert not [a for a in evicted.actions if a.kind == "suspend_job"]
    later = run(status=st, observed=Observed(job=job_obj(suspend=True), workload=PREEMPTED), labels=LABELS,
                now=hour + dt.timedelta(hours=3))
    assert later.status["accounting"]["gpuHours"] == pytest.approx(1.0) and later.events == []
    # Re-admitted: running again from the last checkpoint the status knows.
    later.status["checkpoint"] = {"step": 40, "uri": "s3://out/run/checkpoints/step-40"}
    back = run(status=later.status, observed=Observed(job=job_obj(), pods=[pod("Running")], workload=ADMITTED),
               labels=LABELS, now=hour + dt.timedelta(hours=4))
    assert back.status["phase"] == "Running" and back.status["resumedFromStep"] == 40
    assert "resuming from checkpoint step 40" in back.status["message"]


def test_no_kueue_installed_says_so_instead_of_waiting_silently() -> None:
    d = run(observed=Observed(**{**fits().__dict__, "kueue_installed": False}), labels=LABELS)
    assert (d.status["phase"], d.status["reason"]) == ("Queued", R.KUEUE_NOT_INSTALLED)
    assert "Kueue is not installed" in d.status["message"] and "team-a" in d.status["message"]
    assert [e for e in d.events if e[0] == "Warning" and e[1] == R.KUEUE_NOT_INSTALLED], d.events
    assert cond_of(d.status, C.ADMITTED)["reason"] == R.KUEUE_NOT_INSTALLED
    follow = run(status=d.status, observed=Observed(job=job_obj(suspend=True), kueue_installed=False), labels=LABELS)
    assert follow.status["reason"] == R.KUEUE_NOT_INSTALLED and follow.events == []
    assert not [a for a in follow.actions if a.kind == "suspend_job"]


def test_user_suspend_still_wins_over_kueue_and_unsuspend_is_left_to_kueue() -> None:
    status = {"phase": "Running", "layout": LAYOUT.to_status()}
    spec = {**SPEC, "suspend": True}
    d = run(spec=spec, status=status, observed=Observed(job=job_obj(spec), pods=[pod("Running")], workload=ADMITTED),
            labels=LABELS)
    assert [(a.kind, a.value) for a in d.actions] == [("suspend_job", True)]
    resumed = run(status=d.status, observed=Observed(job=job_obj(suspend=True), workload=ADMITTED), labels=LABELS)
    assert not [a for a in resumed.actions if a.kind == "suspend_job"]


def test_store_keeps_the_workload_of_a_job_by_owner_uid() -> None:
    store = ClusterStore()
    job = job_obj()
    job["metadata"]["ownerReferences"] = [{"kind": "FineTuneJob", "name": "demo", "uid": "ftj-uid",
                                           "controller": True}]
    job["metadata"]["resourceVersion"] = "3"
    assert store.observe_workload("ADDED", PENDING) is None  # its Job is not known yet
    store.observe_job("ADDED", job)
    assert store.observe_workload("MODIFIED", {**ADMITTED, "metadata": {**ADMITTED["metadata"],
                                                                         "resourceVersion": "9"}}) == ("ns", "demo")
    assert store.workload("job-uid") == slim_workload({**ADMITTED, "metadata": {**ADMITTED["metadata"],
                                                                                "resourceVersion": "9"}})
    assert store.observe_workload("MODIFIED", PENDING) == ("ns", "demo")  # older: ignored
    assert admission(store.workload("job-uid"), "q").admitted
    store.observe_workload("DELETED", PENDING)
    assert store.workload("job-uid") is None
