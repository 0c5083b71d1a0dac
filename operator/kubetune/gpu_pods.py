"""The GPUs that pods of the whole cluster hold, kept from a watch in a few bytes per GPU pod.

Sizing on free GPUs (operator.occupancy) needs, per unfinished pod that requests GPUs, its node (or, while
pending, the GPU product it selects) and its GPU count. Listing every unfinished pod of the cluster at each
sizing snapshot (every few seconds) decoded tens of kilobytes of JSON per pod into Python objects, most of
the cluster's pods request no GPU at all, and at 10,000 pods one snapshot was a list of a few hundred MB,
held at once. Here a LIST+WATCH (paged, one event at a time) keeps only the `GpuHolding` of each GPU pod
(node, selected product, GPU count: about 0.3 KB with its key).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from kubernetes.client.rest import ApiException

from kubetune.child_watch import ChildWatch, Key, name_only, object_key
from kubetune.sizing.fleet import GpuHolding, gpu_holding

log = logging.getLogger("kubetune.occupancy")

UNFINISHED = "status.phase!=Succeeded,status.phase!=Failed"
FIRST_LIST_WAIT_SECONDS = 10.0  # how long a sizing snapshot waits for the first LIST before sizing without it


class GpuPods:
    """The unfinished GPU pods of the cluster, from `watch()`; `pods()` for the sizer's snapshots."""

    def __init__(self, first_list_wait: float = FIRST_LIST_WAIT_SECONDS) -> None:
        self._lock = threading.Lock()
        self._pods: dict[Key, GpuHolding] = {}
        self._first_list_wait = first_list_wait
        self.forbidden = False
        self.watcher: ChildWatch | None = None

    def observe(self, event_type: str, pod: dict[str, Any]) -> None:
        """A pod event: keep its GPU holding, or forget it (deleted, finished, or no GPUs)."""
        key = object_key(pod)
        held = None if event_type == "DELETED" else gpu_holding(pod)
        with self._lock:
            if held is None:
                self._pods.pop(key, None)
            else:
                self._pods[key] = held

    def pods(self) -> list[GpuHolding] | None:
        """The GPU pods' holdings now, or None when they are not known (pods may not be listed, or the first LIST has
        not finished within `first_list_wait`): the sizer then counts allocatable GPUs only."""
        watcher = self.watcher
        if watcher is None or self.forbidden:
            return None
        if not watcher.listed.wait(self._first_list_wait) or self.forbidden:
            return None
        with self._lock:
            return list(self._pods.values())

    def watch(self, list_pods_for_all_namespaces: Callable[..., Any],
              on_failure: Callable[[str], None] | None = None) -> ChildWatch:
        """The watch that feeds this index (not started). Without RBAC to list pods cluster-wide (403) it
        logs once and stops: sizing then uses allocatable GPUs."""
        def list_call(**kwargs: Any) -> Any:
            try:
                return list_pods_for_all_namespaces(**kwargs)
            except ApiException as exc:
                if exc.status in (401, 403):
                    self.forbidden = True
                    log.warning("cannot list pods in all namespaces (%s): sizing uses allocatable GPUs only",
                                exc.reason)
                    if self.watcher is not None:
                        self.watcher.halt()
                raise

        self.watcher = ChildWatch("GPU pods in all namespaces", list_call, self.observe, lambda key: None,
                                  label_selector="", field_selector=UNFINISHED, kind="occupancy",
                                  on_failure=on_failure, remember=name_only)
        return self.watcher
