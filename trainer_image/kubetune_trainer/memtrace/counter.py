"""A dispatch mode that counts the bytes of live tensor storage, its peak and what was alive at the peak.

Every tensor an op returns is looked up by its storage: a storage seen for the first time is counted with its
size in bytes (views share their base's storage and count once) and a weak reference with a callback removes
it when torch frees it. That is what a caching allocator is asked for; it works the same on real tensors (the
test against `torch.profiler`) and on fake ones (the full-size trace, where nothing is allocated).

The live set at the peak is captured lazily: it is the live set at the first free after the peak (nothing
changes in between), so a run of allocations at the high-water mark costs one copy, not one per allocation.
Entries are small mutable records, so a storage labelled later (gradients after accumulation, optimizer states
after the step) is labelled the same way in the peak snapshot.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "gradients", "optimizerStates", "activations")
DEFAULT_CATEGORY = "activations"


class _Entry:
    """One live storage: its size, what it is, and the op that allocated it."""

    __slots__ = ("nbytes", "category", "op", "paged", "host", "ref", "__weakref__")

    def __init__(self, nbytes: int, op: str) -> None:
        self.nbytes = nbytes
        self.category = DEFAULT_CATEGORY
        self.op = op
        self.paged = False
        self.host = False
        self.ref: Any = None

    @property
    def apart(self) -> bool:
        """Outside the allocator total: paged (unified) memory or host memory."""
        return self.paged or self.host


@dataclass(frozen=True)
class PeakMoment:
    """Where the peak happened: the phase the caller set, the op, and the module or autograd node running."""

    phase: str = ""
    op: str = ""
    where: str = ""


RunOp = Callable[[Any, tuple, dict], Any]


class StorageCounter(TorchDispatchMode):
    """Counts live storage bytes through every op; `peak_bytes`, `peak_breakdown()` and `peak_moment` after a run.

    `run_op(func, args, kwargs)`, when given, replaces the plain `func(*args, **kwargs)` call (it runs below
    this mode, so whatever it allocates and returns is counted; temporaries it frees itself are added with
    `track`). Paged storages (allocated inside `paged_allocations()`) and host storages (inside
    `host_allocations()`: offloaded activations) are kept apart from the allocator total.
    """

    def __init__(self, run_op: RunOp | None = None) -> None:
        super().__init__()
        self._run_op = run_op
        self._live: dict[int, _Entry] = {}
        self.allocated = 0
        self.paged_bytes = 0
        self.peak_bytes = 0
        self.peak_paged_bytes = 0
        self.host_bytes = 0
        self.max_host_bytes = 0  # the most host memory alive at any moment
        self.peak_moment = PeakMoment()
        self._peak_entries: list[_Entry] = []
        self._peak_dirty = False
        self.phase = ""
        self.where = ""
        self.ops = 0
        self._paged = False
        self._host = False

    # ------------------------------------------------------------------ tracking
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._run_op(func, args, kwargs) if self._run_op else func(*args, **kwargs)
        self.ops += 1
        if isinstance(out, torch.Tensor):
            self.track(out, func)
        elif isinstance(out, (tuple, list)):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.track(leaf, func)
        return out

    def track(self, tensor: torch.Tensor, op: Any = "") -> _Entry | None:
        """Count `tensor`'s storage if it is new (or resized); returns its entry (None for storage-less tensors)."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None  # sparse / nested / wrapper tensors without one storage
        key = storage._cdata
        nbytes = storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry.nbytes != nbytes:  # resize_ / set_ changed the storage in place
                self._grow(entry, nbytes - entry.nbytes)
            return entry
        entry = _Entry(nbytes, str(op))
        entry.paged = self._paged
        entry.host = self._host and not self._paged
        entry.ref = weakref.ref(storage, partial(self._freed, key))
        self._live[key] = entry
        self._grow(entry, nbytes)
        return entry

    def _freed(self, key: int, _ref: Any) -> None:
        self._free(key)

    def _grow(self, entry: _Entry, delta: int) -> None:
        if entry.host:
            self.host_bytes += delta
            self.max_host_bytes = max(self.max_host_bytes, self.host_bytes)
            return
        if entry.paged:
            self.paged_bytes += delta
            if delta < 0:
                self._snapshot_if_dirty()
            return
        if delta < 0:
            self._snapshot_if_dirty()
        self.allocated += delta
        if delta > 0 and self.allocated > self.peak_bytes:
            self.peak_bytes = self.allocated
            self.peak_paged_bytes = self.paged_bytes
            self.peak_moment = PeakMoment(self.phase, str(entry.op), self._where())
            self._peak_dirty = True

    def _free(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        self._snapshot_if_dirty()
        del self._live[key]
        if entry.host:
            self.host_bytes -= entry.nbytes
        elif entry.paged:
            self.paged_bytes -= entry.nbytes
        else:
            self.allocated -= entry.nbytes

    def _snapshot_if_dirty(self) -> None:
        if self._peak_dirty:
            self._peak_entries = list(self._live.values())
            self._peak_dirty = False

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return self.where
        if self.where:  # a checkpointed module recomputing its forward inside backward
            return f"{self.where} (recomputed in backward, {node.name()})"
        return f"backward {node.name()}"

    # ------------------------------------------------------------------ labels
    def entry_of(self, tensor: torch.Tensor) -> _Entry | None:
        """The live entry of `tensor`'s storage (None when it is not counted)."""
        try:
            return self._live.get(tensor.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return None

    def label(self, tensors: Iterable[Any], category: str) -> int:
        """Set the category of the storages behind `tensors` (non-tensors are skipped); returns how many."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        n = 0
        for t in tensors:
            if isinstance(t, torch.Tensor):
                entry = self.entry_of(t)
                if entry is not None:
                    entry.category = category
                    n += 1
        return n

    def label_live(self, category: str, where: Callable[[_Entry], bool]) -> None:
        """Set `category` on every live entry for which `where(entry)` holds."""
        for entry in self._live.values():
            if where(entry):
                entry.category = category

    def live_entries(self) -> list[_Entry]:
        """The entries alive now."""
        return list(self._live.values())

    @contextlib.contextmanager
    def paged_allocations(self) -> Iterator[None]:
        """Storages allocated inside this block are paged (CUDA unified memory): counted apart from the
        allocator total and its peak."""
        self._paged, previous = True, self._paged
        try:
            yield
        finally:
            self._paged = previous

    @contextlib.contextmanager
    def host_allocations(self) -> Iterator[None]:
        """Storages allocated inside this block are in host memory (offloaded activations): counted in
        `host_bytes`, outside the allocator total and its peak."""
        self._host, previous = True, self._host
        try:
            yield
        finally:
            self._host = previous

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (e.g. after building the model)."""
        self.peak_bytes = self.allocated
        self.peak_paged_bytes = self.paged_bytes
        self.peak_moment = PeakMoment(self.phase, "", self._where())
        self._peak_entries = list(self._live.values())
        self._peak_dirty = False

    # ------------------------------------------------------------------ results
    def live_breakdown(self) -> dict[str, int]:
        """Bytes alive now by category (allocator only, paged storages excluded)."""
        return _sum_by_category(self._live.values())

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes by category at the peak; the values add up to `peak_bytes`."""
        self._snapshot_if_dirty()
        return _sum_by_category(self._peak_entries)

    def peak_largest(self, n: int = 5) -> list[tuple[str, str, int]]:
        """The `n` largest storages alive at the peak as (category, allocating op, bytes)."""
        self._snapshot_if_dirty()
        rows = sorted((e for e in self._peak_entries if not e.apart), key=lambda e: e.nbytes, reverse=True)
        return [(e.category, e.op, e.nbytes) for e in rows[:n]]


def _sum_by_category(entries: Iterable[_Entry]) -> dict[str, int]:
    totals = dict.fromkeys(CATEGORIES, 0)
    for entry in entries:
        if not entry.apart:
            totals[entry.category] += entry.nbytes
    return totals
