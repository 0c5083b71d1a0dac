"""Leader election judges Lease expiry on the local clock (observed renewals), never by comparing the
leader's renewTime with the local wall clock."""

from __future__ import annotations

import copy
import datetime as dt
from types import SimpleNamespace

import pytest

from kubetune.leader import LeaseElector

pytestmark = pytest.mark.unit


class FakeLeases:
    """A one-Lease coordination API with resourceVersion checks (the apiserver's optimistic concurrency)."""

    def __init__(self) -> None:
        self.spec: dict | None = None
        self.rv = 0

    def _lease(self):
        def when(value):  # the client returns datetimes; what we wrote came as ISO strings
            return dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        s = {k: when(v) if k in ("renewTime", "acquireTime") else v for k, v in self.spec.items()}
        return SimpleNamespace(
            metadata=SimpleNamespace(resource_version=str(self.rv)),
            spec=SimpleNamespace(holder_identity=s.get("holderIdentity"), renew_time=s.get("renewTime"),
                                 acquire_time=s.get("acquireTime"),
                                 lease_duration_seconds=s.get("leaseDurationSeconds"),
                                 lease_transitions=s.get("leaseTransitions")))

    def read_namespaced_lease(self, name, ns):
        if self.spec is None:
            from kubernetes.client.rest import ApiException
            raise ApiException(status=404)
        return self._lease()

    def create_namespaced_lease(self, ns, body):
        self.spec, self.rv = copy.deepcopy(body["spec"]), self.rv + 1

    def replace_namespaced_lease(self, name, ns, body):
        if body["metadata"]["resourceVersion"] != str(self.rv):
            from kubernetes.client.rest import ApiException
            raise ApiException(status=409)
        self.spec, self.rv = copy.deepcopy(body["spec"]), self.rv + 1

    def renew_with_skewed_clock(self, holder: str, skew: dt.timedelta) -> None:
        """The leader (another machine) renews, writing renewTime from its own clock."""
        wall = dt.datetime.now(dt.timezone.utc) + skew
        self.spec = dict(self.spec or {}, holderIdentity=holder, renewTime=wall, acquireTime=wall,
                         leaseDurationSeconds=15)
        self.rv += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def standby(api: FakeLeases, clock: Clock) -> LeaseElector:
    return LeaseElector(None, "ops", "kubetune-operator", "standby", 15, coordination=api, clock=clock)


def test_a_renewing_leader_whose_clock_is_an_hour_behind_keeps_the_lease():
    api, clock = FakeLeases(), Clock()
    elector = standby(api, clock)
    for _ in range(20):  # a minute of renewals every 3 s, each stamped an hour in the past
        api.renew_with_skewed_clock("leader", dt.timedelta(hours=-1))
        assert elector.try_acquire_or_renew() is False
        clock.now += 3
    assert api.spec["holderIdentity"] == "leader"


def test_a_stopped_leader_whose_clock_is_ahead_is_replaced_after_one_lease_duration():
    api, clock = FakeLeases(), Clock()
    elector = standby(api, clock)
    api.renew_with_skewed_clock("leader", dt.timedelta(hours=1))  # renewTime an hour in the future
    assert elector.try_acquire_or_renew() is False
    clock.now += 14
    assert elector.try_acquire_or_renew() is False  # the record stood still for 14 s < 15 s
    clock.now += 1.5
    assert elector.try_acquire_or_renew() is True
    assert api.spec["holderIdentity"] == "standby"
    assert api.spec["leaseTransitions"] == 1


def test_a_released_lease_is_taken_at_once_and_the_holder_renews():
    api, clock = FakeLeases(), Clock()
    elector = standby(api, clock)
    assert elector.try_acquire_or_renew() is True  # no Lease yet: created
    assert elector.try_acquire_or_renew() is True  # renewing our own
    elector.release()
    other = LeaseElector(None, "ops", "kubetune-operator", "other", 15, coordination=api, clock=clock)
    assert other.try_acquire_or_renew() is True  # no holder: no need to wait
