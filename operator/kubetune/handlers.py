"""Thin kopf handlers: kopf logs in, watches FineTuneJobs and serves the health probe; every FineTuneJob
event is stored and queued for the controller (kubetune.controller), which owns everything else."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from kubetune import API_GROUP, API_VERSION, PLURAL
from kubetune.controller import OperatorConfig, Reconciler

__all__ = ["OperatorConfig", "Reconciler", "registry"]

registry = kopf.OperatorRegistry()


def _reconciler(memo: Any) -> Reconciler:
    return memo.reconciler


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> Any:
    """Authenticate with the in-cluster service account, else the kubeconfig."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=registry)
async def startup(memo: Any, **_: Any) -> None:
    """Start the controller: child watches, workers, progress poller, safety-net resync."""
    await asyncio.to_thread(_reconciler(memo).start)


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: Any, **_: Any) -> None:
    """Stop the controller; resolve the operator's stop flag so kopf does not wait on it at exit."""
    _reconciler(memo).stop(timeout=0)
    # Stopped by a signal, kopf still has a task awaiting the stop flag and waits up to 5 s for
    # it before exiting, which delays the Lease release (and a standby's takeover) by 5 s.
    flag = getattr(memo, "stop_flag", None)
    if isinstance(flag, asyncio.Future) and not flag.done():
        flag.set_result(None)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
async def finetunejob_event(event: dict[str, Any], memo: Any, **_: Any) -> None:
    """A FineTuneJob was listed, created, changed or deleted: store it and queue a pass.

    Event handlers only, not kopf's create/update/resume handlers: those would make kopf patch its
    bookkeeping annotations onto every FineTuneJob (one more write per job)."""
    _reconciler(memo).observe_ftj(event.get("type"), event.get("object") or {})
