"""Pure helpers of bench/operator_scale.py: reading `go tool pprof -top` summaries and request deltas."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

pytestmark = pytest.mark.unit
bench = load_module_from_file("operator_scale_bench", Path(__file__).resolve().parents[2] / "bench" / "operator_scale.py")

HEADER = """File: kube-apiserver
Type: cpu
Duration: 45.06s, Total samples = {total} (106.16%)
Active filters:
   focus=StatusREST
"""


@pytest.mark.parametrize("total, shown, expected", [
    ("47.84s", "Showing nodes accounting for 8.97s, 18.75% of 47.84s total\n", (8.97, 47.84)),
    ("820ms", "Showing nodes accounting for 410ms, 50.00% of 820ms total\n", (0.41, 0.82)),
    ("2.5mins", "Showing nodes accounting for 30s, 20.00% of 2.5mins total\n", (30.0, 150.0)),
    ("47.84s", "Showing nodes accounting for 0, 0% of 47.84s total\n", (0.0, 47.84)),
    ("47.84s", "", (0.0, 47.84)),  # "Focus expression matched no samples": no accounting line
])
def test_parse_pprof_seconds(total, shown, expected):
    text = ("Focus expression matched no samples\n" if not shown else "") + HEADER.format(total=total) + shown
    focused, whole = bench.parse_pprof_seconds(text)
    assert focused == pytest.approx(expected[0]) and whole == pytest.approx(expected[1])


def test_parse_pprof_seconds_rejects_what_is_not_a_profile_summary():
    assert bench.parse_pprof_seconds("failed to fetch profile: no such file") is None


def test_profile_categories_are_valid_regular_expressions():
    import re

    for name, regex in bench.PROFILE_CATEGORIES.items():
        re.compile(regex)
    assert "custom resource status writes" in bench.PROFILE_CATEGORIES


def test_counter_delta_keeps_the_largest_changes_and_the_total():
    before = Counter({"POST jobs": 10, "PUT leases": 5})
    after = Counter({"POST jobs": 110, "PUT leases": 7, "POST events": 40})
    delta = bench.counter_delta(after, before)
    assert delta["POST jobs"] == 100 and delta["POST events"] == 40 and delta["PUT leases"] == 2
    assert delta["TOTAL"] == 142
    assert list(delta)[:2] == ["POST jobs", "POST events"]


class _Pods:
    """The pods watcher's surface drive_to_completion reads: nothing Running yet."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict = {}
        self.last: dict = {}
        self.finished_at: dict = {}


class _Ftjs:
    state = {"ftj-0": {"phase": "Pending"}}
    finished_at: dict = {}

    def wait_until(self, predicate, timeout):
        return predicate(self)


def test_sigusr1_ends_the_completion_phase_at_once_with_what_it_measured():
    bench.STOP.clear()
    try:
        started = time.monotonic()
        bench.STOP.set()
        result = bench.drive_to_completion(object(), _Pods(), _Ftjs(), ["ftj-0"], 2, timeout=600)
        assert time.monotonic() - started < 5
        assert result["phases"] == {"Pending": 1} and not result["all_succeeded"]
        assert not bench.running(time.monotonic() + 600)
    finally:
        bench.STOP.clear()
    assert bench.running(time.monotonic() + 600) and not bench.running(time.monotonic() - 1)


def test_the_table_of_a_run_without_baselines_says_they_were_skipped():
    creation = {"throughput_per_s": 9.2, "wall_to_last_job_s": 1090.0, "wall_to_all_children_and_plan_s": 1092.0,
                "latency_s": {"p50": 1.0, "p95": 2.0, "p99": 3.0}, "operator_cpu_s": 900.0,
                "operator_rss_peak_mib": 245.0, "apiserver_requests": {"TOTAL": 40000, "POST jobs": 10000},
                "cpu_s_by_process": {"operator": 900.0}, "create_error_count": 0, "lost_count": 0}
    skipped = {"skipped": "--no-baseline"}
    result = {"nodes": 1000, "gpus": 6668, "jobs": 10000, "concurrency": 16, "baseline": skipped,
              "baseline_running": skipped, "ratio": None, "ratio_vs_running_jobs": None,
              "loadavg_before": [0.1], "loadavg_after": [2.0],
              "kubetune": {"creation": creation,
                           "completion": {"wall_s": 600.0, "phases": {"Succeeded": 10000},
                                          "operator_rss_peak_mib": 280.0},
                           "operator": {"peak_rss_mib": 280.0, "idle_rss_mib": 111.0, "cpu_s_total": 1500.0,
                                        "log_errors": 0}}}
    text = bench.table(result)
    assert any(line.startswith("direct-Job baselines") and line.endswith("skipped (--no-baseline)")
               for line in text.splitlines())
    assert "direct Jobs/s" not in text and "ratio kubetune/direct" not in text
    assert "kubetune FTJ->Job/s" in text and "kubetune: operator=900.0" in text


def test_a_job_whose_pod_was_deleted_by_a_move_has_had_its_pod():
    pods = bench.Watcher(None, "/api/v1/pods", lambda obj: {"owner": obj["metadata"]["labels"]["owner"]})

    def pod(name: str, owner: str) -> dict:
        return {"metadata": {"name": name, "labels": {"owner": owner}}}

    pods._record("ADDED", pod("a-0-x", "a"), 10.0)
    pods._record("DELETED", pod("a-0-x", "a"), 11.0)  # moved: its new Job's pod does not exist yet
    pods._record("ADDED", pod("b-0-y", "b"), 12.0)
    assert bench.wait_for_pods(pods, ["a", "b"], time.monotonic() + 5, lambda: True)
    assert bench.first_pod_times(pods) == {"a": 10.0, "b": 12.0}
    assert not bench.wait_for_pods(pods, ["a", "c"], time.monotonic() - 1, lambda: True)  # deadline passed


def test_completion_lag_runs_from_a_jobs_last_pod_done_to_the_job_done():
    pods = bench.Watcher(None, "/api/v1/pods", lambda obj: {"owner": obj["metadata"]["labels"]["owner"],
                                                            "phase": obj["status"]["phase"]})
    jobs = bench.Watcher(None, "/apis/x/jobs", lambda obj: {"phase": obj["status"]["phase"]})

    def obj(name: str, phase: str, owner: str = "") -> dict:
        return {"metadata": {"name": name, "labels": {"owner": owner}}, "status": {"phase": phase}}

    pods._record("ADDED", obj("a-0", "Running", "a-trainer"), 1.0)
    pods._record("MODIFIED", obj("a-0", "Succeeded", "a-trainer"), 10.0)
    pods._record("ADDED", obj("a-1", "Succeeded", "a-trainer"), 12.0)  # the job's last pod
    pods._record("MODIFIED", obj("a-1", "Succeeded", "a-trainer"), 13.0)  # a later event of a finished pod
    pods._record("DELETED", obj("a-0", "Succeeded", "a-trainer"), 14.0)
    pods._record("MODIFIED", obj("b-0", "Succeeded", "b-trainer"), 20.0)
    jobs._record("MODIFIED", obj("a", "Running"), 11.0)
    jobs._record("MODIFIED", obj("a", "Succeeded"), 15.5)
    jobs._record("MODIFIED", obj("a", "Succeeded"), 30.0)
    jobs._record("MODIFIED", obj("c", "Succeeded"), 9.0)  # no pod seen: no lag
    lags = bench.completion_lags(pods, jobs, ["a", "b", "c"], lambda nm: f"{nm}-trainer")
    assert lags == [3.5]


def test_a_job_created_again_under_its_name_finishes_when_the_new_one_does():
    """A move deletes the trainer Job (its killed pods give it a Failed verdict first) and creates it again."""
    jobs = bench.Watcher(None, "/apis/batch/v1/jobs", bench.job_digest)

    def job(conditions: list) -> dict:
        return {"metadata": {"name": "a-trainer"}, "status": {"conditions": conditions}}

    jobs._record("MODIFIED", job([{"type": "FailureTarget", "status": "True"}]), 5.0)
    jobs._record("DELETED", job([{"type": "FailureTarget", "status": "True"}]), 6.0)
    jobs._record("ADDED", job([]), 7.0)
    assert "a-trainer" not in jobs.finished_at
    jobs._record("MODIFIED", job([{"type": "SuccessCriteriaMet", "status": "True"}]), 300.0)
    assert jobs.finished_at["a-trainer"] == 300.0


@pytest.mark.parametrize("conditions, phase", [
    ([], ""),
    ([{"type": "SuccessCriteriaMet", "status": "True"}], "Succeeded"),
    ([{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}], "Succeeded"),
    ([{"type": "FailureTarget", "status": "True"}], "Failed"),
    ([{"type": "Suspended", "status": "True"}, {"type": "Complete", "status": "False"}], ""),
])
def test_a_jobs_outcome_counts_from_the_job_controllers_first_verdict(conditions, phase):
    assert bench.job_digest({"status": {"conditions": conditions}}) == {"phase": phase}


def test_spread_gives_the_asked_percentiles_the_max_and_the_count():
    values = [float(v) for v in range(1, 101)]
    assert bench.spread(values) == {"p50": 50.5, "p99": 99.01, "max": 100.0, "samples": 100}
    assert list(bench.spread(values, (50, 95, 99))) == ["p50", "p95", "p99", "max", "samples"]
    assert bench.spread([])["samples"] == 0 and bench.spread([])["max"] == 0


class _FakeNamespace:
    """Jobs and pods of one namespace as the kubernetes client's BatchV1Api / CoreV1Api list and delete them:
    no more pods than Jobs once the garbage collector has seen a delete."""

    def __init__(self, jobs: int, pods: int) -> None:
        self.jobs, self.pods, self.deletes = jobs, pods, 0

    def list_namespaced_job(self, ns, limit):
        return type("L", (), {"items": [object()] * min(self.jobs, limit)})()

    def list_namespaced_pod(self, ns, limit):
        self.pods = min(self.pods, self.jobs)
        return type("L", (), {"items": [object()] * min(self.pods, limit)})()

    def delete_collection_namespaced_job(self, ns, propagation_policy, limit, _preload_content):
        self.deletes += 1
        self.jobs = max(self.jobs - limit, 0)
        return type("R", (), {"data": b""})()


def test_waiting_for_an_empty_namespace_deletes_its_jobs_a_page_at_a_time_only_when_asked(monkeypatch):
    from kubernetes import client

    ns = _FakeNamespace(jobs=2 * bench.DRAIN_PAGE + 1, pods=3)
    monkeypatch.setattr(client, "BatchV1Api", lambda api: ns)
    monkeypatch.setattr(client, "CoreV1Api", lambda api: ns)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    assert not bench.wait_until_empty(None, "n", time.monotonic() + 0.2, delete_jobs=False)
    assert ns.deletes == 0 and ns.jobs == 2 * bench.DRAIN_PAGE + 1
    assert bench.wait_until_empty(None, "n", time.monotonic() + 5, delete_jobs=True)
    assert ns.deletes == 3 and ns.jobs == 0 and ns.pods == 0
    assert bench.drain_namespace(None, "n", 5) >= 0


def test_a_requests_client_is_its_program_and_for_client_go_its_controller():
    assert bench.client_of("kube-controller-manager/v0.0.0 (linux/amd64) kubernetes/$Format/generic-garbage-collector") \
        == "kube-controller-manager/generic-garbage-collector"
    assert bench.client_of("kube-scheduler/v1.33.1 (linux/amd64) kubernetes/8adc0f0/scheduler") == "kube-scheduler/scheduler"
    assert bench.client_of("kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0") == "kubectl"
    assert bench.client_of("kubetune-operator/0.1.0") == "kubetune-operator"
    assert bench.client_of("OpenAPI-Generator/37.0.2/python") == "OpenAPI-Generator"
    assert bench.client_of("") == "?"


def test_audited_requests_are_counted_per_client_within_the_window():
    def event(at, agent, verb, resource, sub=None):
        ref = {"resource": resource, **({"subresource": sub} if sub else {})}
        return json.dumps({"requestReceivedTimestamp": at, "userAgent": agent, "verb": verb, "objectRef": ref})

    gc = "kube-controller-manager/v0.0.0 (linux/amd64) kubernetes/$Format/generic-garbage-collector"
    lines = [event("2026-12-04T19:55:00.000000Z", "kubetune-operator/0.1.0", "create", "jobs"),
             event("2026-12-04T19:55:01.500000Z", "kubetune-operator/0.1.0", "patch", "finetunejobs", "status"),
             event("2026-12-04T19:55:02.000000Z", "kubetune-operator/0.1.0", "patch", "finetunejobs", "status"),
             event("2026-12-04T19:55:03.000000Z", gc, "get", "finetunejobs"),
             event("2026-12-04T19:56:00.000000Z", gc, "get", "finetunejobs"),  # after the window
             "not json", json.dumps({"verb": "get"})]  # torn or incomplete lines are skipped
    start = dt.datetime(2026, 12, 4, 19, 55, tzinfo=dt.timezone.utc).timestamp()
    got = bench.requests_by_client(lines, start, start + 60)
    assert got == {"kubetune-operator": {"TOTAL": 3, "patch finetunejobs/status": 2, "create jobs": 1},
                   "kube-controller-manager/generic-garbage-collector": {"TOTAL": 1, "get finetunejobs": 1}}
    assert list(got) == ["kubetune-operator", "kube-controller-manager/generic-garbage-collector"]
