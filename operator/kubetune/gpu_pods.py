"""The GPUs that pods of the whole cluster hold, kept from a watch in a few bytes per GPU pod.

Sizing on free GPUs (operator.occupancy) needs, per unfinished pod that requests GPUs, its node (or, while
pending, the GPU product it selects) and its GPU count. Listing every unfinished pod of the cluster at each
sizing snapshot (every few seconds) decoded tens of kilobytes of JSON per pod into Python objects, most of
the cluster's pods request no GPU at all, and at 10,000 pods one snapshot was a list of a few hundred MB,
held at once. Here a LIST+WATCH (paged, one event at a time) keeps only the `GpuHolding` of each GPU pod
(node, selected product, GPU count, its Job's UID: about 0.3 KB with its key).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from kubetune.child_watch import ChildWatch
from kubetune.sizing.fleet import GpuHolding, gpu_holding
from kubetune.watched_index import WatchedIndex

log = logging.getLogger("kubetune.occupancy")

UNFINISHED = "status.phase!=Succeeded,status.phase!=Failed"
FIRST_LIST_WAIT_SECONDS = 10.0  # how long a sizing snapshot waits for the first LIST before sizing without it


class GpuPods(WatchedIndex[GpuHolding]):
    """The unfinished GPU pods of the cluster, from `watch()`; `pods()` for the sizer's snapshots."""

    def __init__(self, first_list_wait: float = FIRST_LIST_WAIT_SECONDS) -> None:
        super().__init__(gpu_holding, first_list_wait, logger=log,
                         forbidden_message="cannot list pods in all namespaces: sizing uses allocatable GPUs only")

    def pods(self) -> list[GpuHolding] | None:
        """The GPU pods' holdings now, or None when they are not known (pods may not be listed, or the first LIST has
        not finished within `first_list_wait`): the sizer then counts allocatable GPUs only."""
        return self.values()

    def watch(self, list_pods_for_all_namespaces: Callable[..., Any],
              on_failure: Callable[[str], None] | None = None) -> ChildWatch:
        """The watch of unfinished pods in all namespaces that feeds this index (not started)."""
        return self.feed_from("GPU pods in all namespaces", list_pods_for_all_namespaces, kind="occupancy",
                              field_selector=UNFINISHED, on_failure=on_failure)
