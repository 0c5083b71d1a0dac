"""spec.tracking in the status: the trainer's `tracking` summary block -> status.tracking and the Tracked condition;
a run whose tracking server was unreachable still succeeds, with Tracked False, the reason and a Warning Event."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout
from kubetune.status import checked_status

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://data/train.jsonl"},
        "method": "lora", "training": {"maxSteps": 100}, "output": {"uri": "s3://out/run"},
        "tracking": {"mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "exp"}}}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none",
                node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})
RUN = {"runId": "0123abcd", "url": "http://mlflow:5000/#/experiments/1/runs/0123abcd"}
WARNING = ("MLflow tracking at http://mlflow:5000 failed while creating the run: <urlopen error [Errno 111] "
           "Connection refused>; training continues without tracking")


def complete(tracking: dict | None, message: str = "", spec: dict | None = None):
    spec = copy.deepcopy(spec or SPEC)
    summary = {"version": 1, "status": "Succeeded", "reason": "Completed", "message": message, "step": 100,
               "totalSteps": 100, "trainLoss": 1.2, "artifacts": {"adapter": "s3://out/run/final/adapter"}}
    if tracking is not None:
        summary["tracking"] = tracking
    job = copy.deepcopy(build_children(JobRef("demo", "ns", "uid-1"), spec, parse_spec(spec), LAYOUT,
                                       BuildConfig())[-1])
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "failed": 0,
                     "completionTime": "2026-01-01T12:05:00Z"}
    pod = {"metadata": {"name": "demo-trainer-0", "creationTimestamp": "2026-01-01T12:00:00Z",
                        "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                        "ownerReferences": [{"uid": "job-uid"}]},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(summary), "reason": "Completed"}}}]}}
    return decide(name="demo", generation=1, labels={}, spec=parse_spec(spec), spec_hash=spec_hash(spec),
                  status={"phase": "Running", "layout": LAYOUT.to_status()}, observed=Observed(job=job, pods=[pod]),
                  now=T0 + dt.timedelta(minutes=5))


def test_the_run_reaches_the_status_and_the_tracked_condition():
    d = complete(RUN)
    assert d.status["phase"] == "Succeeded" and d.status["tracking"] == RUN
    tracked = C.find_condition(d.status["conditions"], C.TRACKED)
    assert tracked["status"] == "True" and tracked["reason"] == R.TRACKING_LOGGED and RUN["url"] in tracked["message"]
    checked_status(d.status)  # the status model (and so the CRD's status schema) accepts it


def test_an_unreachable_server_is_a_warning_condition_not_a_failure():
    d = complete(None, message=WARNING)
    assert d.status["phase"] == "Succeeded" and "tracking" not in d.status
    tracked = C.find_condition(d.status["conditions"], C.TRACKED)
    assert tracked["status"] == "False" and tracked["reason"] == R.TRACKING_UNAVAILABLE
    assert "Connection refused" in tracked["message"] and "training was not affected" in tracked["message"]
    assert ("Warning", R.TRACKING_UNAVAILABLE, tracked["message"]) in d.events


def test_jobs_without_tracking_get_no_condition():
    spec = {k: v for k, v in SPEC.items() if k != "tracking"}
    d = complete(None, spec=spec)
    assert C.find_condition(d.status["conditions"], C.TRACKED) is None and "tracking" not in d.status
