"""The CPU preflight on the operator side: the `<job>-preflight` Job (golden files), the Preparing phase of the pure
decide, the Validated condition, status.preflight, and the store keeping the preflight Job apart from the
trainer's. A job whose preflight fails never gets a trainer Job."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
from pathlib import Path

import pytest
import yaml

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.preflight import build_preflight_job, preflight_enabled, preflight_status
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout, SizingOutcome, layout_from_resources
from kubetune.store import ClusterStore

pytestmark = pytest.mark.unit

CASES_DIR = Path(__file__).resolve().parents[1] / "data" / "builders"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "input.yaml").exists())
CONFIG = BuildConfig(image="registry.example/kubetune-trainer:test")  # as in test_builders.py


def case_config(data: dict) -> BuildConfig:
    """CONFIG with the case's `buildConfig` applied (as in test_builders.py)."""
    return dataclasses.replace(CONFIG, **(data.get("buildConfig") or {}))

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "pvc://data/train.jsonl"},
        "method": "lora", "training": {"maxSteps": 100, "learningRate": "2e-4"}, "output": {"uri": "pvc://out/run"}}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none",
                node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})
REF = JobRef("demo", "ns", "uid-1")
REPORT = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B", "revision": "a" * 40, "modelType": "llama"},
          "dataset": {"uri": "pvc://data/train.jsonl", "sha256": "b" * 64, "format": "messages"},
          "examples": 1000, "trainExamples": 950, "evalExamples": 50, "trainRows": 950, "tokensPerEpoch": 190000,
          "tokens": 1600000, "steps": 100, "world": 1, "maxSeqLength": 2048, "truncated": 0, "duplicates": 2,
          "nearDuplicates": 3, "emptyAnswers": 0, "tokenLengths": {"min": 20, "mean": 200.0, "p50": 180, "p95": 400,
                                                                   "max": 900}}


# --- the Job ---------------------------------------------------------------------------------------------------

def _render(case: str) -> dict:
    data = yaml.safe_load((CASES_DIR / case / "input.yaml").read_text())
    meta = data["metadata"]
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"], meta.get("labels") or {})
    spec = parse_spec(data["spec"])
    if data["layout"] == "fromSpec":
        layout = layout_from_resources(spec)
    else:
        lay = data["layout"]
        layout = Layout(gpu_type=lay["gpuType"], gpus_per_pod=lay["gpusPerPod"], pods=lay["pods"],
                        strategy=lay["strategy"], zero_stage=lay.get("zeroStage", 0),
                        node_selector=lay.get("nodeSelector", {}))
    return build_preflight_job(ref, spec, layout, case_config(data), hash_=spec_hash(data["spec"]))


@pytest.mark.parametrize("case", CASES)
def test_preflight_job_matches_golden(case: str) -> None:
    rendered = _render(case)
    path = CASES_DIR / case / "expected-preflight.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.write_text(yaml.safe_dump(rendered, sort_keys=True, default_flow_style=False))
    assert path.exists(), f"{path} missing: run with KUBETUNE_UPDATE_GOLDEN=1 to create it"
    assert rendered == yaml.safe_load(path.read_text()), f"preflight Job of {case} changed"


@pytest.mark.parametrize("case", CASES)
def test_the_preflight_pod_asks_for_no_gpu_and_only_reads(case: str) -> None:
    job = _render(case)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:2] == ["kubetune-train", "preflight"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and "nvidia.com/gpu" not in json.dumps(pod)
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"].startswith("pvc-"))
    assert job["metadata"]["name"].endswith("-preflight")
    assert job["metadata"]["labels"]["kubetune.io/component"] == "preflight"


def test_spec_preflight_overrides_the_operator_flag() -> None:
    assert preflight_enabled(parse_spec(SPEC), True) and not preflight_enabled(parse_spec(SPEC), False)
    off = parse_spec({**SPEC, "preflight": {"enabled": False}})
    on = parse_spec({**SPEC, "preflight": {}})
    assert not preflight_enabled(off, True) and preflight_enabled(on, False)
    # Turning the preflight on or off does not change what the trainer runs: no new trainer Job.
    assert spec_hash(SPEC) == spec_hash({**SPEC, "preflight": {"enabled": False}})


# --- the Preparing phase ---------------------------------------------------------------------------------------

def observed(preflight_job: dict | None = None, pods: list | None = None) -> Observed:
    outcome = SizingOutcome(True, LAYOUT, R.SIZED, "sized: 1 pod(s) x 1 NVIDIA-L4", plan_status={"fits": True})
    children = build_children(REF, SPEC, parse_spec(SPEC), LAYOUT, BuildConfig())
    pre = [children[0], build_preflight_job(REF, parse_spec(SPEC), LAYOUT, BuildConfig(), hash_=spec_hash(SPEC))]
    return Observed(sizing=outcome, children=children, preflight=True, preflight_job=preflight_job,
                    preflight_pods=pods or [], preflight_children=pre)


def run(obs: Observed, status: dict | None = None, spec: dict | None = None):
    spec = spec or SPEC
    return decide(name="demo", generation=1, labels={}, spec=parse_spec(spec), spec_hash=spec_hash(spec),
                  status=copy.deepcopy(status or {}), observed=obs, now=T0)


def preflight_job(conditions: list[str], spec: dict | None = None) -> dict:
    job = copy.deepcopy(build_preflight_job(REF, parse_spec(spec or SPEC), LAYOUT, BuildConfig(),
                                            hash_=spec_hash(spec or SPEC)))
    job["metadata"]["uid"] = "pre-uid"
    job["status"] = {"conditions": [{"type": c, "status": "True", "message": "m"} for c in conditions]}
    return job


def pod(phase: str, message: dict | None = None, exit_code: int = 0, waiting: str = "") -> dict:
    status: dict = {"phase": phase}
    if message is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "message": json.dumps(message), "reason": "Error" if exit_code else "Completed"}}}]
    if waiting:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {
            "reason": waiting, "message": 'secret "hf" not found'}}}]
    return {"metadata": {"name": f"demo-preflight-{phase.lower()}", "creationTimestamp": "2026-01-01T12:00:00Z",
                         "ownerReferences": [{"uid": "pre-uid"}]}, "status": status}


def cond(status: dict, ctype: str) -> dict:
    found = C.find_condition(status["conditions"], ctype)
    assert found is not None, status["conditions"]
    return found


def applied(decision) -> list[str]:
    return [a.obj["metadata"]["name"] for a in decision.actions if a.kind == "apply"]


def test_the_first_pass_creates_the_plan_and_the_preflight_job_not_the_trainer() -> None:
    d = run(observed())
    assert applied(d) == ["demo-plan", "demo-preflight"]
    assert d.status["phase"] == "Preparing" and d.status["reason"] == R.PREFLIGHT_RUNNING
    assert cond(d.status, C.VALIDATED)["status"] == "Unknown"
    assert "layout" not in d.status


def test_a_running_preflight_keeps_the_job_preparing() -> None:
    d = run(observed(preflight_job([]), [pod("Running")]), {"phase": "Preparing", "reason": R.PREFLIGHT_RUNNING})
    assert d.actions == [] and d.status["phase"] == "Preparing" and d.events == []


def test_a_preflight_that_cannot_start_says_why() -> None:
    d = run(observed(preflight_job([]), [pod("Pending", waiting="CreateContainerConfigError")]))
    assert d.status["reason"] == R.CONTAINER_NOT_STARTING and 'secret "hf" not found' in d.status["message"]
    assert d.events and d.events[0][0] == "Warning"


def test_a_successful_preflight_fills_status_and_creates_the_trainer_job_in_the_same_pass() -> None:
    message = {"version": 1, "status": "Succeeded", "reason": "Validated", "preflight": REPORT}
    d = run(observed(preflight_job(["Complete"]), [pod("Succeeded", message)]), {"phase": "Preparing"})
    assert applied(d) == ["demo-plan", "demo-trainer"]
    pre = d.status["preflight"]
    assert pre["specHash"] == spec_hash(SPEC) and pre["steps"] == 100 and pre["tokens"] == 1600000
    assert pre["modelRevision"] == "a" * 40 and pre["datasetSha256"] == "b" * 64
    assert pre["tokenLengths"]["p95"] == 400 and pre["nearDuplicates"] == 3
    assert cond(d.status, C.VALIDATED)["status"] == "True"
    assert d.status["phase"] == "Pending" and d.status["layout"]["gpuType"] == "NVIDIA-L4"
    assert any(e[1] == R.VALIDATED and "100 steps" in e[2] for e in d.events)

    # Later passes (the trainer Job deleted to resize or recreate) do not run the preflight again.
    again = run(observed(preflight_job(["Complete"])), d.status)
    assert applied(again) == ["demo-plan", "demo-trainer"]


def test_a_completed_preflight_whose_pod_event_is_late_waits_for_the_report() -> None:
    d = run(observed(preflight_job(["Complete"]), [pod("Running")]), {"phase": "Preparing"})
    assert applied(d) == [] and d.status["phase"] == "Preparing" and d.retry_after == 1.0
    assert "preflight" not in d.status


def test_a_bad_line_fails_the_job_in_preflight_and_no_trainer_job_is_created() -> None:
    message = {"version": 1, "status": "Failed", "reason": "DataError",
               "message": "pvc://data/train.jsonl (train.jsonl):7: line is not valid JSON"}
    d = run(observed(preflight_job(["FailureTarget"]), [pod("Failed", message, exit_code=3)]), {"phase": "Preparing"})
    assert applied(d) == [] and d.status["phase"] == "Failed" and d.status["reason"] == R.PREFLIGHT_FAILED
    assert "train.jsonl):7:" in d.status["message"] and "DataError" in d.status["message"]
    validated = cond(d.status, C.VALIDATED)
    assert validated["status"] == "False" and validated["reason"] == "DataError"
    assert d.events[-1][0] == "Warning"


def test_a_preflight_of_an_older_spec_is_run_again() -> None:
    old_spec = {**SPEC, "training": {"maxSteps": 50, "learningRate": "2e-4"}}
    d = run(observed(preflight_job(["Complete"], old_spec)), {"phase": "Preparing"})
    assert [a.kind for a in d.actions] == ["delete_preflight"] and d.status["reason"] == R.PREFLIGHT_RERUN


def test_cancel_stops_a_running_preflight() -> None:
    d = run(observed(preflight_job([])), {"phase": "Preparing"}, spec={**SPEC, "cancel": True})
    assert [a.kind for a in d.actions] == ["delete_preflight"] and d.status["phase"] == "Cancelled"


def test_without_a_report_the_preflight_still_validates() -> None:
    st = preflight_status(None, "h", "2026-01-01T12:00:00Z")
    assert st["specHash"] == "h" and "no figures" in st["display"]


# --- the store -------------------------------------------------------------------------------------------------

def _owned(obj: dict, uid: str) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"].update(uid=uid, resourceVersion="5")
    obj["metadata"]["ownerReferences"] = [{"kind": "FineTuneJob", "name": "demo", "uid": "uid-1", "controller": True}]
    return obj


def test_the_store_keeps_the_preflight_job_apart_from_the_trainer_job() -> None:
    store = ClusterStore()
    trainer = build_children(REF, SPEC, parse_spec(SPEC), LAYOUT, BuildConfig())[-1]
    pre = build_preflight_job(REF, parse_spec(SPEC), LAYOUT, BuildConfig())
    store.observe_job("ADDED", _owned(pre, "pre-uid"))
    assert store.children("uid-1") == (None, []) and store.preflight("uid-1")[0]["metadata"]["uid"] == "pre-uid"
    store.observe_job("ADDED", _owned(trainer, "job-uid"))
    store.observe_pod("ADDED", {"metadata": {"uid": "p1", "namespace": "ns", "name": "demo-preflight-x",
                                             "resourceVersion": "6",
                                             "ownerReferences": [{"kind": "Job", "uid": "pre-uid",
                                                                  "controller": True}]},
                                "status": {"phase": "Succeeded"}})
    job, pods = store.children("uid-1")
    assert job["metadata"]["uid"] == "job-uid" and pods == []
    pre_job, pre_pods = store.preflight("uid-1")
    assert pre_job["metadata"]["uid"] == "pre-uid" and [p["metadata"]["uid"] for p in pre_pods] == ["p1"]
    store.observe_job("DELETED", _owned(pre, "pre-uid"))
    assert store.preflight("uid-1") == (None, []) and store.children("uid-1")[0] is not None


# --- the controller --------------------------------------------------------------------------------------------

def test_the_controller_creates_the_preflight_first_and_does_not_wait_for_a_trainer_job() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("controller_fakes", Path(__file__).with_name("test_controller.py"))
    fakes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fakes)

    rec, _ = fakes.controller(preflight=True)
    first = rec.process(fakes.KEY)
    assert rec.children.applied == ["ConfigMap", "Job"] and first.decision.status["phase"] == "Preparing"
    rec.store.observe_ftj("MODIFIED", fakes.ftj(11, first.decision.status))  # the status echo arrives
    # The pass after it runs at once (it does not wait for a trainer Job to appear) and, with the preflight Job
    # not yet seen by the watch, applies it again (an existing Job is kept: create-or-get).
    again = rec.process(fakes.KEY)
    assert again.decision is not None and not again.waited and again.decision.status["phase"] == "Preparing"
