"""What a pass wrote and has not seen through the watches yet: a created Job is waited for by its own UID, so
the old Job of a move (deleted in the same pass, still in the store until its DELETED event) does not count."""

from __future__ import annotations

import pytest

from kubetune.expectations import Expectations

pytestmark = pytest.mark.unit

KEY = ("ns", "job")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_created_job_is_waited_for_by_its_uid_not_by_any_job_in_the_store():
    clock = Clock()
    exp = Expectations(ttl=30, clock=clock)
    exp.expect_job("ftj-uid", "new-job-uid")
    assert "not been seen" in exp.waiting(KEY, "ftj-uid", 5, "")  # nothing in the store yet
    assert "not been seen" in exp.waiting(KEY, "ftj-uid", 5, "old-job-uid")  # the deleted Job, still stored
    assert exp.waiting(KEY, "ftj-uid", 5, "new-job-uid") == ""
    assert exp.waiting(KEY, "ftj-uid", 5, "") == ""  # met once: forgotten


def test_without_a_uid_any_stored_job_meets_the_expectation_and_old_ones_expire():
    clock = Clock()
    exp = Expectations(ttl=30, clock=clock)
    exp.expect_job("ftj-uid")  # an existing Job was found ("exists"): its UID is not known
    assert exp.waiting(KEY, "ftj-uid", 5, "some-job") == ""
    exp.expect_job("ftj-uid", "new-job-uid")
    clock.now += 31  # a lost event: the pass runs, and the apiserver's answers keep it correct
    assert exp.waiting(KEY, "ftj-uid", 5, "") == ""


def test_a_status_write_is_waited_for_until_the_store_has_its_resource_version():
    clock = Clock()
    exp = Expectations(ttl=30, clock=clock)
    exp.expect_version(KEY, "ftj-uid", 42)
    assert "resourceVersion 41" in exp.waiting(KEY, "ftj-uid", 41, "")
    assert exp.waiting(KEY, "other-uid", 41, "") == ""  # the FineTuneJob was recreated under the same name
    exp.expect_version(KEY, "ftj-uid", 42)
    assert exp.waiting(KEY, "ftj-uid", 42, "") == ""
