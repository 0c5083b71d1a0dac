"""The work queue: de-duplication, one worker per key, delayed adds and per-key exponential backoff."""

from __future__ import annotations

import threading
import time

import pytest

from kubetune.workqueue import ShutDown, WorkQueue

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drain(q: WorkQueue) -> list:
    out = []
    while (key := q.get(timeout=0)) is not None:
        out.append(key)
        q.done(key)
    return out


def test_a_key_is_queued_once():
    q: WorkQueue[str] = WorkQueue(clock=Clock())
    for key in ("a", "b", "a", "a", "c", "b"):
        q.add(key)
    assert drain(q) == ["a", "b", "c"]


def test_a_key_added_while_processing_comes_back_once_after_done():
    q: WorkQueue[str] = WorkQueue(clock=Clock())
    q.add("a")
    key = q.get(timeout=0)
    q.add("a")
    q.add("a")
    assert q.get(timeout=0) is None  # never two workers on one key
    q.done(key)
    assert drain(q) == ["a"]


def test_add_after_waits_and_the_earliest_deadline_wins():
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("retry", 60)
    q.add_after("event", 0.2)
    q.add_after("retry", 5)  # an earlier deadline replaces the later one
    q.add_after("retry", 90)  # a later one does not postpone it
    assert q.get(timeout=0) is None
    clock.now += 0.2
    assert drain(q) == ["event"]
    clock.now += 4.7
    assert drain(q) == []
    clock.now += 0.2
    assert drain(q) == ["retry"]
    clock.now += 100
    assert drain(q) == []  # the superseded 60 s and 90 s entries do not fire again


def test_backoff_doubles_per_failure_until_forget_and_is_capped():
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=4.0, clock=clock)
    assert [q.add_rate_limited("k") for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert q.failures("k") == 6
    assert q.backoff("other") == 0.5  # per key
    q.forget("k")
    assert q.backoff("k") == 0.5


def test_backoff_delays_the_key():
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(base_delay=1.0, clock=clock)
    q.add_rate_limited("k")
    q.add_rate_limited("k")  # second failure: 2 s, but the 1 s deadline is earlier and stays
    assert drain(q) == []
    clock.now += 1.0
    assert drain(q) == ["k"]


def test_blocking_get_wakes_for_a_delayed_key_and_for_shutdown():
    q: WorkQueue[str] = WorkQueue()
    q.add_after("soon", 0.05)
    started = time.monotonic()
    assert q.get(timeout=5) == "soon"
    assert 0.04 <= time.monotonic() - started < 2

    got: list = []

    def worker() -> None:
        try:
            q.get()
        except ShutDown:
            got.append("shutdown")

    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.05)
    q.shut_down()
    t.join(2)
    assert got == ["shutdown"]
    q.add("ignored")
    assert q.depth() == 0
