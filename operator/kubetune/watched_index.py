"""An index of a few bytes per object, fed by a LIST+WATCH of objects the operator does not own (Nodes, the
cluster's GPU pods): `keep(object)` is what the index holds of each (None: nothing to hold), and readers get
the values once the first LIST is complete. Without RBAC to list or watch them (401/403) the watch logs once
and stops, and readers get None (their callers then fall back)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Generic, TypeVar

from kubernetes.client.rest import ApiException

from kubetune.child_watch import ChildWatch, Key, name_only, object_key

T = TypeVar("T")


class WatchedIndex(Generic[T]):
    """`keep(obj)` of every watched object, by namespace and name; `values()` after the first LIST."""

    def __init__(self, keep: Callable[[dict[str, Any]], T | None], first_list_wait: float, *,
                 forbidden_message: str, logger: logging.Logger) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._items: dict[Key, T] = {}
        self._first_list_wait = first_list_wait
        self._forbidden_message = forbidden_message  # logged once, with the apiserver's reason
        self._log = logger
        self.forbidden = False
        self.watcher: ChildWatch | None = None

    def observe(self, event_type: str, obj: dict[str, Any]) -> None:
        """A watch event: keep what `keep` returns, or forget the object (deleted, or nothing to keep)."""
        key = object_key(obj)
        kept = None if event_type == "DELETED" else self._keep(obj)
        with self._lock:
            if kept is None:
                self._items.pop(key, None)
            else:
                self._items[key] = kept

    def kept(self) -> dict[Key, T]:
        """What the index holds now (a copy)."""
        with self._lock:
            return dict(self._items)

    def values(self) -> list[T] | None:
        """The kept values, or None when they are not known: no watch, no RBAC, or the first LIST not done
        within `first_list_wait`."""
        watcher = self.watcher
        if watcher is None or self.forbidden:
            return None
        if not watcher.listed.wait(self._first_list_wait) or self.forbidden:
            return None
        with self._lock:
            return list(self._items.values())

    def feed_from(self, name: str, list_call: Callable[..., Any], *, kind: str, field_selector: str = "",
              page_size: int = 500, on_failure: Callable[[str], None] | None = None) -> ChildWatch:
        """The watch that feeds this index (not started)."""
        def guarded(**kwargs: Any) -> Any:
            try:
                return list_call(**kwargs)
            except ApiException as exc:
                if exc.status in (401, 403):
                    self.forbidden = True
                    self._log.warning("%s (%s)", self._forbidden_message, exc.reason)
                    if self.watcher is not None:
                        self.watcher.halt()
                raise

        self.watcher = ChildWatch(name, guarded, self.observe, lambda key: None, label_selector="",
                                  field_selector=field_selector, kind=kind, page_size=page_size,
                                  on_failure=on_failure, remember=name_only)
        return self.watcher
