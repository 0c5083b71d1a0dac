"""The running time of a run for status.accounting (kubetune.running_time), as pure functions; the passes that
call them are tested in test_reconcile.py."""

from __future__ import annotations

import datetime as dt

import pytest

from kubetune.running_time import (close_running, close_when_stopped, gpu_cost, gpu_hours, gpu_hours_by_type,
                                   reported_gpu_hours, restarted_between_passes, running_since)

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def pod(started: str, finished: str | None = None, deleting: bool = False) -> dict:
    state = ({"terminated": {"exitCode": 0, "startedAt": started, "finishedAt": finished}} if finished
             else {"running": {"startedAt": started}})
    meta = {"deletionTimestamp": "2026-01-01T11:59:00Z"} if deleting else {}
    return {"metadata": meta, "status": {"phase": "Succeeded" if finished else "Running",
                                         "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_a_stretch_ends_at_the_last_exit_and_never_after_this_pass():
    st = {"accounting": {"runningSince": "2026-01-01T11:00:00Z", "runningSeconds": 60.0}}
    close_running(st, NOW, [pod("2026-01-01T11:00:00Z", "2026-01-01T11:30:00Z")])
    assert st["accounting"] == {"runningSeconds": 60.0 + 1800.0}
    ahead = {"accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    close_running(ahead, NOW, [pod("2026-01-01T11:00:00Z", "2026-01-01T12:05:00Z")])  # a node clock ahead
    assert ahead["accounting"]["runningSeconds"] == 3600.0


def test_a_stopping_run_keeps_its_stretch_open_until_no_container_runs():
    st = {"accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    close_when_stopped(st, NOW, [pod("2026-01-01T11:00:00Z", deleting=True)])
    assert st["accounting"] == {"runningSince": "2026-01-01T11:00:00Z"}
    assert gpu_hours({**st, "layout": {"totalGpus": 2}}, NOW) == pytest.approx(2.0)
    close_when_stopped(st, NOW, [pod("2026-01-01T11:00:00Z", "2026-01-01T11:45:00Z"), {"status": {"phase": "Pending"}}])
    assert st["accounting"] == {"runningSeconds": 2700.0}
    assert gpu_hours({**st, "layout": {"totalGpus": 2}}, NOW) == pytest.approx(1.5)


def test_a_new_stretch_starts_at_its_containers_start_but_not_before_the_last_stretchs_end():
    running = [pod("2026-01-01T11:50:00Z")]
    assert running_since({}, running, [], NOW) == "2026-01-01T11:50:00Z"
    after = {"runningSeconds": 100.0}
    assert running_since(after, running, [pod("2026-01-01T11:00:00Z", "2026-01-01T11:40:00Z")], NOW) \
        == "2026-01-01T11:50:00Z"
    assert running_since(after, running, [pod("2026-01-01T11:00:00Z", "2026-01-01T11:55:00Z")], NOW) \
        == "2026-01-01T11:55:00Z"
    assert running_since(after, running, [], NOW) == "2026-01-01T12:00:00Z"  # no record of the end: this pass


def test_a_restart_between_passes_needs_an_exit_inside_the_open_stretch_and_only_later_starts():
    open_since = {"runningSince": "2026-01-01T11:00:00Z"}
    exited = [pod("2026-01-01T11:00:00Z", "2026-01-01T11:40:00Z")]
    assert restarted_between_passes(open_since, [pod("2026-01-01T11:41:00Z")], exited)
    assert not restarted_between_passes(open_since, [pod("2026-01-01T11:41:00Z"), pod("2026-01-01T11:00:00Z")],
                                        exited)  # one pod ran on through it
    assert not restarted_between_passes({"runningSince": "2026-01-01T11:45:00Z"}, [pod("2026-01-01T11:41:00Z")],
                                        exited)  # that exit was before this stretch
    assert not restarted_between_passes(open_since, [pod("2026-01-01T11:41:00Z")],
                                        exited + [pod("2026-01-01T11:00:00Z", deleting=True)])  # one still stops
    assert not restarted_between_passes({}, [pod("2026-01-01T11:41:00Z")], exited)


def test_each_stretch_counts_on_the_layout_it_ran_on():
    """A run re-planned after running out of memory from 1 x L4 to 2 x A100: its first hour stays one L4-hour."""
    st = {"layout": {"gpuType": "NVIDIA-L4", "totalGpus": 1},
          "accounting": {"runningSince": "2026-01-01T10:00:00Z"}}
    close_running(st, NOW, [pod("2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z")])
    assert st["accounting"]["gpuTime"] == [{"gpuType": "NVIDIA-L4", "runningSeconds": 3600.0, "gpuHours": 1.0}]
    st["layout"] = {"gpuType": "NVIDIA-A100-SXM4-80GB", "totalGpus": 2}
    st["accounting"]["runningSince"] = "2026-01-01T11:30:00Z"
    assert gpu_hours_by_type(st, NOW) == {"NVIDIA-L4": 1.0, "NVIDIA-A100-SXM4-80GB": 1.0}
    assert gpu_hours(st, NOW) == 2.0  # not 2 GPUs x 1.5 h
    prices = {"NVIDIA-L4": 0.8, "NVIDIA-A100-SXM4-80GB": 3.0}
    assert gpu_cost(st, NOW, prices.get) == pytest.approx(0.8 + 3.0)
    assert gpu_cost(st, NOW, {"NVIDIA-A100-SXM4-80GB": 3.0}.get) is None  # the L4 hour has no price
    close_running(st, NOW + dt.timedelta(minutes=30))
    assert st["accounting"]["gpuTime"] == [
        {"gpuType": "NVIDIA-L4", "runningSeconds": 3600.0, "gpuHours": 1.0},
        {"gpuType": "NVIDIA-A100-SXM4-80GB", "runningSeconds": 3600.0, "gpuHours": 2.0}]
    assert st["accounting"]["runningSeconds"] == 7200.0 and gpu_hours(st, NOW) == 3.0
    # What the metrics read back from the written status: the completed types, the rest on the current one.
    st["accounting"]["gpuHours"] = 3.5
    st["accounting"]["runningSince"] = "2026-01-01T12:30:00Z"
    assert reported_gpu_hours(st) == {"NVIDIA-L4": 1.0, "NVIDIA-A100-SXM4-80GB": 2.5}


def test_a_status_from_before_gpu_time_counts_its_time_on_its_current_layout():
    legacy = {"layout": {"gpuType": "NVIDIA-L4", "totalGpus": 2},
              "accounting": {"runningSeconds": 1800.0, "runningSince": "2026-01-01T11:30:00Z"}}
    assert gpu_hours(legacy, NOW) == 2.0 and reported_gpu_hours({**legacy, "accounting": {
        **legacy["accounting"], "gpuHours": 2.0}}) == {"NVIDIA-L4": 2.0}
    close_running(legacy, NOW)
    assert legacy["accounting"]["gpuTime"] == [{"gpuType": "NVIDIA-L4", "runningSeconds": 3600.0, "gpuHours": 2.0}]
    cpu = {"layout": {"gpuType": "", "totalGpus": 0, "pods": 1}, "accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    close_running(cpu, NOW)
    assert "gpuTime" not in cpu["accounting"] and gpu_hours(cpu, NOW) == 0.0 and gpu_cost(cpu, NOW, {"": 0.0}.get) == 0.0
