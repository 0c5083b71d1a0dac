"""The shared model and dataset cache: a ReadWriteMany volume that the preflight fills once and trainer pods read.

Layout under the cache root (`KUBETUNE_CACHE_DIR`, docs/cache.md):

- ``models/<uri-escaped>@<revision>/`` the model's files (hf:// at the exact commit the hub resolved; s3:// at a
  digest of the object listing: keys, sizes, ETags);
- ``datasets/<sha256>/<file name>`` one dataset file, by the SHA-256 of its bytes;
- ``locks/<entry>.lock`` one lock file per entry (``flock``): two jobs on the same model download it once;
- ``tmp/<entry>/`` the entry while it downloads; renamed to its final name, on the same volume, only when
  complete, with ``.kubetune-entry.json`` (uri, revision, bytes) inside. An entry without that file is never
  used; a fill killed midway leaves its ``tmp/`` directory, which the next fill of the entry finishes (it keeps
  the files already whole) or, once nothing wrote to it for ``ABANDONED_SECONDS``, an eviction sweep removes;
- ``leases/<job uid>.json`` the entries one job uses (written by its preflight; trainer pods find their model
  and data through it) and until when: eviction never removes an entry a live lease names.

Eviction (`choose_evictions`, pure): when the entries exceed the size cap, the least recently used ones go first,
never one in use. The preflight is the writer (`KUBETUNE_CACHE_FILL=true`, the volume mounted read-write); trainer
pods mount it read-only and only look up (`lookup`); without `KUBETUNE_CACHE_DIR` nothing here runs and every pod
downloads as before (kubetune_trainer.storage).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cache_volume import (  # noqa: F401 - the volume's API, re-exported for the cache's callers
    _MAX_NAME, ABANDONED_SECONDS, DEFAULT_LEASE_SECONDS, ENTRY_FILE, KINDS, Entry, _flat, _os_error, _remove,
    _touch, _write_json, cache_root, choose_evictions, dataset_key, escape, fill, filling, lease_id, lease_seconds,
    live_keys, locked, lookup, max_bytes, model_key, read_entry, read_leases, scan, sweep, tree_bytes, write_lease)
from .errors import StorageError

log = logging.getLogger("kubetune_trainer.cache")


# --------------------------------------------------------------------------- what the preflight fills

def s3_revision(uri: str) -> str:
    """A digest of the objects under an s3:// prefix (keys, sizes, ETags): a changed object is a new entry."""
    from . import storage

    parsed = storage.parse_uri(uri)
    prefix = parsed.path.rstrip("/") + "/" if parsed.path else ""
    client = storage.s3_client()
    try:
        objects = sorted((o.object_name, o.size, o.etag or "")
                         for o in client.list_objects(parsed.authority, prefix=prefix, recursive=True)
                         if not o.is_dir)
    except Exception as exc:  # the MinIO client raises several types; all mean "cannot list"
        raise storage._s3_error(parsed, exc, "list objects") from exc  # noqa: SLF001
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix")
    listing = "\n".join(f"{k}\t{s}\t{e}" for k, s, e in objects)
    return "s3-" + hashlib.sha256(listing.encode()).hexdigest()[:16]


def model_download(uri: str, revision: str) -> Callable[[Path], None]:
    """A function downloading the model at `revision` into a directory (the trainer's own fetch code)."""
    from . import storage

    parsed = storage.parse_uri(uri)
    if parsed.scheme == "hf":
        def hub(target: Path) -> None:
            from huggingface_hub import snapshot_download

            try:
                snapshot_download(repo_id=parsed.authority, repo_type=parsed.repo_type, revision=revision,
                                  token=storage._hf_token(), local_dir=str(target),  # noqa: SLF001
                                  ignore_patterns=storage.HF_MODEL_IGNORE)
            except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types
                raise storage._hf_error(parsed, exc) from exc  # noqa: SLF001
            shutil.rmtree(target / ".cache", ignore_errors=True)  # the hub's resume bookkeeping
        return hub
    if parsed.scheme == "s3":
        def s3(target: Path) -> None:
            storage._s3_download_dir(parsed, target, resume=True)  # noqa: SLF001 - an interrupted fill resumes
        return s3
    raise ValueError(f"{uri}: only hf:// and s3:// models are cached")


def cacheable(uri: str) -> bool:
    """Remote models and datasets (hf://, s3://) are cached; pvc:// and local ones are already on a volume."""
    from . import storage

    return storage.local_path(uri) is None


class Filler:
    """The preflight's use of the cache for one job: a sweep first, then each model and dataset file filled (or found)
    under the job's lease, which names an entry before its fill starts (so no sweep takes it meanwhile); `report()`
    sweeps again and gives the `cache` block of the preflight's report (status.preflight.cache)."""

    def __init__(self, root: Path, job: str, now: float | None = None) -> None:
        self.root, self.job = root, job
        self.now = time.time() if now is None else now
        self.cap = max_bytes()
        self.lease = lease_id() or job
        self.models: dict[str, str] = {}
        self.files: dict[str, str] = {}
        self.filled: list[str] = []
        self.hits: list[str] = []
        self.notes: dict[str, str] = {}
        self.first = sweep(root, self.cap, self.now)

    def _fill(self, key: str, download: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        # Under the sweep lock: a sweep either sees this lease or has finished before it (then the fill below finds
        # the entry gone and downloads it again), so an entry found here is never evicted from under the job.
        try:
            with locked(self.root, "sweep"):
                write_lease(self.root, self.lease, self.job, self.models, self.files, self.now, lease_seconds())
        except OSError as exc:
            raise _os_error(exc, self.root, "write the job's lease") from exc
        path, new = fill(self.root, key, download, meta)
        (self.filled if new else self.hits).append(key)
        return path

    def model(self, uri: str, revision: str = "") -> Path | None:
        """The model's cache directory (filled now or found), or None when it is not cached (pvc://, local, or no
        revision to key it by)."""
        if uri in self.models:
            return self.root / self.models[uri]
        if not cacheable(uri):
            self.notes["model"] = "not cached: already on a volume"
            return None
        from . import storage

        parsed = storage.parse_uri(uri)
        revision = revision or (s3_revision(uri) if parsed.scheme == "s3" else parsed.revision)
        if not revision:
            self.notes["model"] = "not cached: no revision to key it by"
            return None
        base = uri.split("@", 1)[0] if parsed.scheme == "hf" else uri.rstrip("/")
        key = model_key(base, revision)
        self.models[uri] = key
        return self._fill(key, model_download(uri, revision), {"uri": uri, "revision": revision})

    def dataset(self, uri: str, path: Path, sha256: str) -> Path | None:
        """The cached copy of a dataset file the preflight read (by its SHA-256), or None for pvc:// and local
        files."""
        if uri in self.files:
            return self.root / self.files[uri]
        if not cacheable(uri):
            self.notes.setdefault("dataset", "not cached: already on a volume")
            return None
        key = dataset_key(sha256)
        self.files[uri] = f"{key}/{path.name}"

        def copy(target: Path) -> None:
            shutil.copyfile(path, target / path.name)

        return self._fill(key, copy, {"uri": uri, "sha256": sha256}) / path.name

    def report(self) -> dict[str, Any]:
        """Sweep again; the `cache` block: volume, the model's and dataset's entries, filled/hits, evicted, bytes."""
        second = sweep(self.root, self.cap, self.now)
        out: dict[str, Any] = {"volume": os.environ.get("KUBETUNE_CACHE_VOLUME", "") or str(self.root)}
        out["model"] = next(iter(self.models.values()), self.notes.get("model", ""))
        out["dataset"] = next(("/".join(v.split("/")[:2]) for v in self.files.values()), self.notes.get("dataset", ""))
        out.update({"filled": self.filled, "hits": self.hits,
                    "evicted": len(self.first["evicted"]) + len(second["evicted"]), "bytes": second["bytes"]})
        return out


def start(job: str, now: float | None = None) -> Filler | None:
    """A Filler when this pod fills a configured cache (the preflight), else None (no cache: report "none")."""
    root = cache_root()
    if root is None or not filling():
        return None
    return Filler(root, job, now)


def prepare(model_uri: str, model_revision: str, datasets: dict[str, tuple[Path, str]],
            *, job: str, now: float | None = None) -> dict[str, Any]:
    """Fill the model and the dataset files for one job (URI -> (local file, SHA-256)); the `cache` report block,
    with `modelDir` when the model is cached. {"volume": "none"} without a cache."""
    filler = start(job, now)
    if filler is None:
        return {"volume": "none"}
    model_dir = filler.model(model_uri, model_revision)
    for uri, (path, sha) in datasets.items():
        filler.dataset(uri, path, sha)
    out = filler.report()
    if model_dir is not None:
        out["modelDir"] = str(model_dir)
    return out
