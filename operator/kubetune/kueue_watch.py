"""Whether the cluster runs Kueue, and the watch of Kueue's Workloads for the trainer Jobs once it does.

The operator does not need Kueue. At start, and then every `check_seconds` until it appears, one LIST of
at most one Workload tells whether the cluster serves `workloads.kueue.x-k8s.io`: 404 means no Kueue (a
FineTuneJob labelled for a queue then says so instead of waiting in silence), 403 means the operator may
not read Workloads (logged once; the jobs then show the plain Queued phase). Once the API is there, a
LIST+WATCH per watched namespace (ChildWatch) feeds the store the Workloads of batch Jobs (those Kueue
labels with the Job's UID) and every FineTuneJob is queued for a pass.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.child_watch import ChildWatch, Notify, Observe, OnFailure
from kubetune.kueue_admission import WORKLOAD_JOB_UID_LABEL

log = logging.getLogger("kubetune.kueue")

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"


class KueueWatch:
    """Finds Kueue's Workload API (polling until it exists) and then watches the Workloads of Jobs;
    `on_change` is called when the answer changes (queue a pass for the jobs that wait for Kueue)."""

    def __init__(self, api: client.ApiClient, namespaces: list[str], observe: Observe, notify: Notify,
                 on_change: Callable[[], None], *, check_seconds: float = 30.0,
                 on_failure: OnFailure | None = None) -> None:
        self.objects = client.CustomObjectsApi(api)
        self.namespaces = namespaces
        self.observe, self.notify, self.on_change, self.on_failure = observe, notify, on_change, on_failure
        self.check_seconds = check_seconds
        self.installed: bool | None = None  # None until the first answer (and while Workloads are forbidden)
        self.watches: list[ChildWatch] = []
        self._stop = threading.Event()
        self._forbidden_logged = False
        self._thread = threading.Thread(target=self._run, name="kueue-watch", daemon=True)

    def start(self) -> "KueueWatch":
        """Ask once now (so the first passes know), then keep asking in a thread until Kueue is there."""
        found = self.check()
        if found is not None:
            self.installed = found
        if found:
            self._start_watches()
        else:
            self._thread.start()
        return self

    def _start_watches(self) -> None:
        log.info("Kueue's Workload API is served: watching the Workloads of trainer Jobs")
        self.watches = self._watches()
        for watch in self.watches:
            watch.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for watch in self.watches:
            watch.stop(timeout=timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> bool | None:
        """One LIST of at most one Workload: True (Kueue's API is served), False (404), None (no answer)."""
        try:
            if self.namespaces:
                self.objects.list_namespaced_custom_object(GROUP, VERSION, self.namespaces[0], PLURAL, limit=1)
            else:
                self.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 403 and not self._forbidden_logged:
                self._forbidden_logged = True
                log.warning("the operator may not list workloads.kueue.x-k8s.io (403): Kueue's verdicts on "
                            "queued jobs will not show in their status; grant get/list/watch on workloads")
            return None
        except Exception as exc:  # noqa: BLE001 - the apiserver may be away for a while
            log.debug("checking for Kueue failed: %s", exc)
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            found = self.check()
            if found is not None and found != self.installed:
                self.installed = found
                if not found:
                    self.on_change()  # the queue-labelled jobs can now say that there is no Kueue
            if found:
                self._start_watches()
                self.on_change()
                return
            self._stop.wait(self.check_seconds)

    def _watches(self) -> list[ChildWatch]:
        out = []
        for ns in self.namespaces or [None]:
            if ns is None:
                def list_call(**kwargs: Any) -> Any:
                    return self.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)
            else:
                def list_call(ns: str = ns, **kwargs: Any) -> Any:
                    return self.objects.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, **kwargs)
            out.append(ChildWatch(f"workloads in {ns or 'all namespaces'}", list_call, self.observe, self.notify,
                                  label_selector=WORKLOAD_JOB_UID_LABEL, kind="workloads",
                                  on_failure=self.on_failure))
        return out
