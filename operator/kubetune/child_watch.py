"""List+watch of the trainer Jobs and pods, feeding the ClusterStore directly (one thread per kind and
namespace).

kopf handled these child events until the 1,000-job benchmark showed what that costs: every watch event
of every pod and Job went through a per-object worker task and kopf's full processing chain (causes,
handler kwargs, logging contexts), and the decoded events waited in per-object queues while the busy
event loop caught up. At the peak, 400 MB of live Python objects were events, coroutines and contexts
waiting their turn (counted with `sys._debugmallocstats` and a gc census). The store needs only a slim
copy of each object, so a plain informer-style loop does it here: LIST (paged), then WATCH from the
list's resourceVersion with bookmarks, decode one line at a time, hand it to the store, forget it.
A 410 Gone (the resourceVersion was compacted away) relists; objects missing from the new list are
delivered as DELETED. kopf keeps the FineTuneJobs themselves.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, Callable, Iterator

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubetune.builders import COMPONENT_LABEL, JOB_NAME_LABEL, MANAGED_BY
from kubetune.children import body_of

log = logging.getLogger("kubetune.watch")

Key = tuple[str, str]
Observe = Callable[[str, dict[str, Any]], "Key | None"]
Notify = Callable[[Key], None]
OnFailure = Callable[[str], None]

SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


# The labels an observer reads from a DELETED event (kubetune.store: which FineTuneJob, and whether a preflight).
STUB_LABELS = (JOB_NAME_LABEL, COMPONENT_LABEL)
OWNER_FIELDS = ("uid", "kind", "name", "controller")


def stub(obj: dict[str, Any]) -> dict[str, Any]:
    """What a later DELETED needs of an object (one the relist no longer finds): namespace, name, uid, the labels
    in STUB_LABELS and the ownerReferences' identity. Kept for every object a watch has seen (as compact JSON,
    see ChildWatch._memo), so not the decoded metadata itself: that held ~1.2 KB of each trainer pod of the tests,
    the stub 0.3 KB."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    return {"metadata": {
        "namespace": sys.intern(meta.get("namespace") or ""), "name": meta.get("name"), "uid": meta.get("uid"),
        "labels": {k: labels[k] for k in STUB_LABELS if k in labels},
        "ownerReferences": [{k: ref[k] for k in OWNER_FIELDS if k in ref}
                            for ref in meta.get("ownerReferences") or []]}}


def name_only(obj: dict[str, Any]) -> dict[str, Any]:
    """What a later DELETED needs of an object when its observer reads nothing but the key."""
    meta = obj.get("metadata") or {}
    return {"metadata": {"namespace": sys.intern(meta.get("namespace") or ""), "name": meta.get("name")}}


def object_key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return sys.intern(meta.get("namespace") or ""), meta.get("name") or ""


class ChildWatch:
    """One LIST+WATCH loop in a daemon thread: every event goes to `observe(type, object)` (the store),
    and the FineTuneJob key it returns goes to `notify` (schedule a reconcile pass)."""

    def __init__(self, name: str, list_call: Callable[..., Any], observe: Observe, notify: Notify, *,
                 label_selector: str = SELECTOR, field_selector: str = "", page_size: int = 500,
                 server_timeout: int = 300,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS, kind: str = "",
                 on_failure: OnFailure | None = None,
                 remember: Callable[[dict[str, Any]], dict[str, Any]] = stub) -> None:
        self.name = name
        self.kind = kind or name
        self.on_failure = on_failure  # called with `kind` for every failed LIST or WATCH
        self.list_call = list_call
        self.observe = observe
        self.notify = notify
        self.label_selector = label_selector
        self.field_selector = field_selector  # objects that stop matching it arrive as DELETED
        self.page_size = page_size
        self.server_timeout = server_timeout
        self.retry_delays = retry_delays
        self.remember = remember  # what is kept of each object for the DELETED a relist may have to deliver
        self.listed = threading.Event()  # set after the first complete list
        self.lists = 0  # complete lists done (the first one plus relists)
        self._known: dict[Key, bytes] = {}  # remember(obj) of every object seen, as compact JSON
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "ChildWatch":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop; an open watch request is shut down so the thread need not wait for it."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - already closed
                pass
        self._thread.join(timeout)

    def halt(self) -> None:
        """Stop the loop from inside it (an event handler or the list call): no join, no retry."""
        self._stop.set()

    def _selectors(self) -> dict[str, str]:
        out = {"label_selector": self.label_selector}
        if self.field_selector:
            out["field_selector"] = self.field_selector
        return out

    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        rv: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self.list_once()
                rv = self.watch_once(rv)
                failures = 0
            except Gone:
                log.info("watch %s: resourceVersion %s is gone; listing again", self.name, rv)
                rv = None
            except Exception as exc:  # noqa: BLE001 - the apiserver may be away for a while; keep trying
                if self._stop.is_set():
                    break
                delay = self.retry_delays[min(failures, len(self.retry_delays) - 1)]
                failures += 1
                if self.on_failure is not None:
                    self.on_failure(self.kind)
                log.warning("watch %s failed (%s); retrying in %.0fs", self.name, exc, delay)
                self._stop.wait(delay)

    def _deliver(self, event_type: str, obj: dict[str, Any]) -> None:
        key = self.observe(event_type, obj)
        if key is not None:
            self.notify(key)

    def _memo(self, obj: dict[str, Any]) -> bytes:
        """What the watch keeps of an object until it is deleted: `remember(obj)` as compact JSON (one
        allocation that holds none of the decoded event)."""
        return json.dumps(self.remember(obj), separators=(",", ":")).encode()

    def list_once(self) -> str:
        """LIST every labeled object (in pages), deliver each as ADDED and those gone since the last list
        as DELETED; returns the list's resourceVersion to watch from."""
        seen: dict[Key, bytes] = {}
        token: str | None = None
        rv = ""
        while True:
            kwargs: dict[str, Any] = {**self._selectors(), "limit": self.page_size, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            page = json.loads(body_of(self.list_call(**kwargs)))
            meta = page.get("metadata") or {}
            rv = rv or meta.get("resourceVersion") or ""
            for obj in page.get("items") or []:
                seen[object_key(obj)] = self._memo(obj)
                self._deliver("ADDED", obj)
            token = meta.get("continue")
            if not token:
                break
        for key, old in self._known.items():
            if key not in seen:
                self._deliver("DELETED", json.loads(old))
        self._known = seen
        self.lists += 1
        self.listed.set()
        return rv

    def watch_once(self, rv: str) -> str:
        """One WATCH request from `rv` until the server ends it; returns the last resourceVersion seen.
        Raises Gone when the apiserver no longer has `rv`."""
        try:
            resp = self.list_call(**self._selectors(), watch=True, resource_version=rv,
                                  allow_watch_bookmarks=True, timeout_seconds=self.server_timeout,
                                  _preload_content=False, _request_timeout=(10, self.server_timeout + 30))
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(exc.reason or "") from exc
            raise
        self._resp = resp
        try:
            for event in self._events(resp):
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message") or "")
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if etype == "BOOKMARK":
                    continue
                key = object_key(obj)
                if etype == "DELETED":
                    self._known.pop(key, None)
                else:
                    self._known[key] = self._memo(obj)
                self._deliver(etype or "", obj)
        finally:
            self._resp = None
            resp.release_conn()
        return rv

    def _events(self, resp: Any) -> Iterator[dict[str, Any]]:
        for line in iter_resp_lines(resp):
            if self._stop.is_set():
                return
            if line:
                yield json.loads(line)


def child_watches(api: client.ApiClient, namespaces: list[str], observe_job: Observe, observe_pod: Observe,
                  notify: Notify, on_failure: OnFailure | None = None) -> list[ChildWatch]:
    """The Job and pod watches of the operator's scope (each namespace, or all namespaces when empty)."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    watches = []
    for ns in namespaces or [None]:
        where = ns or "all namespaces"
        if ns is None:
            jobs, pods = batch.list_job_for_all_namespaces, core.list_pod_for_all_namespaces
        else:
            jobs = _in_namespace(batch.list_namespaced_job, ns)
            pods = _in_namespace(core.list_namespaced_pod, ns)
        watches.append(ChildWatch(f"jobs in {where}", jobs, observe_job, notify, kind="jobs",
                                  on_failure=on_failure))
        watches.append(ChildWatch(f"pods in {where}", pods, observe_pod, notify, kind="pods",
                                  on_failure=on_failure))
    return watches


def _in_namespace(call: Callable[..., Any], ns: str) -> Callable[..., Any]:
    def bound(**kwargs: Any) -> Any:
        return call(ns, **kwargs)
    return bound
