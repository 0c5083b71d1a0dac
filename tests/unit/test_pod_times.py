"""When trainer containers ran, from pod status (kubetune.pod_times)."""

from __future__ import annotations

import datetime as dt

import pytest

from kubetune.pod_times import (containers_finished_at, containers_running, containers_started_at,
                                last_container_exit, ran)
from kubetune.store import slim_pod

pytestmark = pytest.mark.unit


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def pod(*states: dict) -> dict:
    return {"metadata": {"name": "p"}, "status": {"phase": "Running", "containerStatuses": [
        {"name": f"c{i}", "state": state} for i, state in enumerate(states)]}}


RUN = {"running": {"startedAt": "2026-01-01T12:00:05Z"}}
DONE = {"terminated": {"exitCode": 0, "startedAt": "2026-01-01T12:00:01Z", "finishedAt": "2026-01-01T12:07:00Z"}}
WAIT = {"waiting": {"reason": "ContainerCreating"}}


def test_the_start_is_the_earliest_container_start_running_or_exited():
    assert containers_started_at([pod(RUN), pod(DONE)]) == at("2026-01-01T12:00:01Z")
    assert containers_started_at([pod(RUN, WAIT)]) == at("2026-01-01T12:00:05Z")
    assert containers_started_at([pod(WAIT)]) is None and containers_started_at([]) is None
    assert containers_started_at([pod({"running": {"startedAt": "not a time"}})]) is None


def test_the_end_is_the_last_exit_once_every_container_of_every_pod_exited():
    later = {"terminated": {"exitCode": 1, "startedAt": "2026-01-01T12:00:00Z", "finishedAt": "2026-01-01T12:09:00Z"}}
    assert containers_finished_at([pod(DONE), pod(later)]) == at("2026-01-01T12:09:00Z")
    assert containers_finished_at([pod(DONE), pod(RUN)]) is None  # one still runs
    assert containers_finished_at([pod(DONE), {"status": {"phase": "Pending"}}]) is None  # no container status yet
    assert containers_finished_at([pod({"terminated": {"exitCode": 0}})]) is None  # no exit time
    assert containers_finished_at([]) is None


def test_a_pod_runs_while_a_container_runs_and_has_run_once_one_started():
    assert containers_running([pod(DONE), pod(RUN)]) and not containers_running([pod(DONE), pod(WAIT)])
    # A pod that reports no container yet: by its phase.
    assert containers_running([{"status": {"phase": "Running"}}])
    assert not containers_running([{"status": {"phase": "Pending"}}]) and not containers_running([])
    assert ran(pod(RUN)) and ran(pod(WAIT, DONE)) and not ran(pod(WAIT)) and not ran({"status": {}})


def test_the_last_exit_is_the_latest_any_container_records():
    later = {"terminated": {"exitCode": 1, "startedAt": "2026-01-01T12:00:00Z", "finishedAt": "2026-01-01T12:09:00Z"}}
    assert last_container_exit([pod(DONE, RUN), pod(later)]) == at("2026-01-01T12:09:00Z")
    assert last_container_exit([pod(DONE, RUN)]) == at("2026-01-01T12:07:00Z")  # one still runs: what is known
    assert last_container_exit([pod(RUN), pod({"terminated": {"exitCode": 0}})]) is None


def test_the_operators_slim_pod_keeps_the_start_time_of_a_running_container():
    full = pod({"running": {"startedAt": "2026-01-01T12:00:05Z"}}, DONE, WAIT)
    full["status"]["containerStatuses"][0].update(image="trainer:1", ready=True, restartCount=0)
    slim = slim_pod(full)
    assert [cs["state"] for cs in slim["status"]["containerStatuses"]] == [RUN, DONE, WAIT]
    assert containers_started_at([slim]) == at("2026-01-01T12:00:01Z")
