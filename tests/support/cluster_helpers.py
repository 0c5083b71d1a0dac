"""Helpers for tests against the local control plane (no pytest import needed).

- `wait_for(predicate, timeout, describe)`: poll until predicate() returns something truthy and
  return it; on timeout raise `WaitTimeout` (an AssertionError) saying what was awaited and what
  predicate last returned (or raised).
- `complete_pod(api, ns, name, exit_code=0, message="")`: make KWOK finish a simulated pod:
  Succeeded when exit_code == 0, else Failed, with that exit code and termination message in
  every container's `state.terminated` (see devcluster/kwok-stages.yaml).
- `pod_events(api, ns, name)`: the events about a pod as (reason, message) pairs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

COMPLETE_ANNOTATION = "kwok.kubetune.io/complete"
EXIT_CODE_ANNOTATION = "kwok.kubetune.io/exit-code"
MESSAGE_ANNOTATION = "kwok.kubetune.io/termination-message"


class WaitTimeout(AssertionError):
    """wait_for gave up."""


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, describe: str | Callable[[], str] = "condition",
             interval: float = 0.2) -> T:
    """Poll predicate until it returns a truthy value (returned); on timeout fail with what it last saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - remembered and reported on timeout
            last = e
        if time.monotonic() >= deadline:
            what = describe() if callable(describe) else describe
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}; last saw: {last!r}")
        time.sleep(interval)


def _core(api: Any) -> Any:
    from kubernetes import client

    return api if isinstance(api, client.CoreV1Api) else client.CoreV1Api(api)


def complete_pod(api: Any, ns: str, name: str, exit_code: int = 0, message: str = "") -> None:
    """Ask KWOK to terminate a simulated pod with this exit code and termination message.
    api: a kubernetes ApiClient or CoreV1Api. The pod must be on a KWOK node; it completes once Running."""
    annotations = {COMPLETE_ANNOTATION: "succeeded" if exit_code == 0 else "failed",
                   EXIT_CODE_ANNOTATION: str(int(exit_code)), MESSAGE_ANNOTATION: message}
    _core(api).patch_namespaced_pod(name, ns, {"metadata": {"annotations": annotations}})


def pod_events(api: Any, ns: str, name: str) -> list[tuple[str, str]]:
    """(reason, message) of the events whose involvedObject is this pod."""
    events = _core(api).list_namespaced_event(ns, field_selector=f"involvedObject.name={name},involvedObject.kind=Pod")
    return [(e.reason, e.message) for e in events.items]
