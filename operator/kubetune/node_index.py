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
from typing import Any, Callable

from kubetune.child_watch import ChildWatch
from kubetune.sizing.fleet import slim_node
from kubetune.watched_index import WatchedIndex

log = logging.getLogger("kubetune.nodes")

FIRST_LIST_WAIT_SECONDS = 10.0  # how long a refresh waits for the first LIST before listing by itself
PAGE_SIZE = 100  # Nodes per LIST page: a page is decoded whole before its Nodes are slimmed


class WatchedNodes(WatchedIndex[dict[str, Any]]):
    """Slim Nodes from `watch()`; `nodes()` for the sizer's refreshes."""

    def __init__(self, fallback: Callable[[], list[dict[str, Any]]],
                 first_list_wait: float = FIRST_LIST_WAIT_SECONDS) -> None:
        super().__init__(slim_node, first_list_wait, logger=log,
                         forbidden_message="cannot watch nodes: sizing lists them at each refresh")
        self._fallback = fallback
        self.fallbacks = 0  # refreshes that listed the Nodes themselves

    def nodes(self) -> list[dict[str, Any]]:
        """The Nodes now: from the watch once it has listed them, else listed by `fallback` (slimmed)."""
        watched = self.values()
        if watched is not None:
            return watched
        self.fallbacks += 1
        return [slim_node(n) for n in self._fallback()]

    def watch(self, list_node: Callable[..., Any],
              on_failure: Callable[[str], None] | None = None) -> ChildWatch:
        """The Node watch that feeds this index (not started)."""
        return self.feed_from("nodes", list_node, kind="nodes", page_size=PAGE_SIZE, on_failure=on_failure)
