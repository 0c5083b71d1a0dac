"""The cluster's Nodes as sizing reads them, kept from a watch.

The sizer refreshes its fleet every few seconds (OperatorConfig.node_cache_seconds). Listing every Node for
each refresh decoded the whole list (tens of kilobytes of JSON per Node: images, managed fields, conditions)
and kept it until the next one: at 1,000 nodes about 37 MB alive, twice that while a refresh replaced it,
and the same decoding work every five seconds. Here a LIST+WATCH keeps each Node's `slim_node` (what
`fleet_from_nodes` reads), and a refresh copies the list it already has. Without RBAC to watch Nodes, or
before the first LIST completes, the sizer lists them as before (`fallback`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from kubernetes.client.rest import ApiException

from kubetune.child_watch import ChildWatch, Key, name_only, object_key
from kubetune.sizing.fleet import slim_node

log = logging.getLogger("kubetune.nodes")

FIRST_LIST_WAIT_SECONDS = 10.0  # how long a refresh waits for the first LIST before listing by itself
PAGE_SIZE = 100  # Nodes per LIST page: a page is decoded whole before its Nodes are slimmed


class WatchedNodes:
    """Slim Nodes from `watch()`; `nodes()` for the sizer's refreshes."""

    def __init__(self, fallback: Callable[[], list[dict[str, Any]]],
                 first_list_wait: float = FIRST_LIST_WAIT_SECONDS) -> None:
        self._fallback = fallback
        self._lock = threading.Lock()
        self._nodes: dict[Key, dict[str, Any]] = {}
        self._first_list_wait = first_list_wait
        self.forbidden = False
        self.fallbacks = 0  # refreshes that listed the Nodes themselves
        self.watcher: ChildWatch | None = None

    def observe(self, event_type: str, node: dict[str, Any]) -> None:
        """A Node event: keep its slim form, or forget it."""
        key = object_key(node)
        slim = None if event_type == "DELETED" else slim_node(node)
        with self._lock:
            if slim is None:
                self._nodes.pop(key, None)
            else:
                self._nodes[key] = slim

    def nodes(self) -> list[dict[str, Any]]:
        """The Nodes now: from the watch once it has listed them, else listed by `fallback` (slimmed)."""
        watcher = self.watcher
        if watcher is not None and not self.forbidden and watcher.listed.wait(self._first_list_wait) \
                and not self.forbidden:
            with self._lock:
                return list(self._nodes.values())
        self.fallbacks += 1
        return [slim_node(n) for n in self._fallback()]

    def watch(self, list_node: Callable[..., Any], on_failure: Callable[[str], None] | None = None) -> ChildWatch:
        """The watch that feeds this index (not started). Without RBAC to list or watch Nodes (401/403) it logs
        once and stops; refreshes then list the Nodes themselves."""
        def list_call(**kwargs: Any) -> Any:
            try:
                return list_node(**kwargs)
            except ApiException as exc:
                if exc.status in (401, 403):
                    self.forbidden = True
                    log.warning("cannot watch nodes (%s): sizing lists them at each refresh", exc.reason)
                    if self.watcher is not None:
                        self.watcher.halt()
                raise

        self.watcher = ChildWatch("nodes", list_call, self.observe, lambda key: None, label_selector="",
                                  kind="nodes", page_size=PAGE_SIZE, on_failure=on_failure, remember=name_only)
        return self.watcher
