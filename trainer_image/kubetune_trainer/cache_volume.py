"""The shared cache volume as trainer pods and the preflight both see it: configuration from the pod
environment, the content-addressed layout, locks, leases, the eviction policy and the lookup trainer pods
make. It never downloads (kubetune_trainer.cache fills entries through kubetune_trainer.storage), so
storage can ask it for a cached copy without an import circle. The design is in kubetune_trainer.cache."""


from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import KubetuneTrainerError, NoSpaceError, PermissionDeniedError, StorageError

log = logging.getLogger("kubetune_trainer.cache")

ENTRY_FILE = ".kubetune-entry.json"
KINDS = ("models", "datasets")
DEFAULT_LEASE_SECONDS = 7 * 24 * 3600
# An interrupted download (a `tmp/` directory nobody holds the lock of) is kept this long after its last write, so
# the retried preflight finishes it instead of starting again; older ones are removed by the sweep.
ABANDONED_SECONDS = 3600
_MAX_NAME = 200  # a directory name stays under the usual 255-byte limit


# --------------------------------------------------------------------------- configuration (pod environment)

def cache_root() -> Path | None:
    """The mounted cache volume (`KUBETUNE_CACHE_DIR`), or None when no cache is configured."""
    value = os.environ.get("KUBETUNE_CACHE_DIR", "").strip()
    return Path(value) if value else None


def filling() -> bool:
    """Whether this pod fills the cache (the preflight) rather than only reading it (trainer pods)."""
    return os.environ.get("KUBETUNE_CACHE_FILL", "").lower() in ("1", "true", "yes")


def lease_id() -> str:
    """This job's lease name (`KUBETUNE_CACHE_LEASE`: the FineTuneJob's uid)."""
    return os.environ.get("KUBETUNE_CACHE_LEASE", "").strip()


def max_bytes() -> int:
    """The size cap (`KUBETUNE_CACHE_MAX_BYTES`; 0: no cap)."""
    try:
        return max(0, int(os.environ.get("KUBETUNE_CACHE_MAX_BYTES") or 0))
    except ValueError:
        return 0


def lease_seconds() -> int:
    """How long a job's lease protects its entries (`KUBETUNE_CACHE_LEASE_SECONDS`)."""
    try:
        return max(1, int(os.environ.get("KUBETUNE_CACHE_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS))
    except ValueError:
        return DEFAULT_LEASE_SECONDS


# --------------------------------------------------------------------------- layout (pure)

def escape(text: str) -> str:
    """`text` as one directory name: percent-escaped (no '/'), long ones shortened with a digest."""
    name = quote(text, safe="")
    if len(name) > _MAX_NAME:
        name = name[:_MAX_NAME - 17] + "~" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return name


def model_key(uri: str, revision: str) -> str:
    """`models/<uri-escaped>@<revision>` (the URI without its own @revision)."""
    if not revision:
        raise ValueError(f"{uri}: a cached model needs a revision")
    return f"models/{escape(uri)}@{escape(revision)}"


def dataset_key(sha256: str) -> str:
    """`datasets/<sha256>`."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"{sha256!r} is not a SHA-256 hex digest")
    return f"datasets/{sha256}"


def _flat(key: str) -> str:
    return key.replace("/", "__")


# --------------------------------------------------------------------------- eviction policy (pure)

@dataclass(frozen=True)
class Entry:
    """A complete cache entry: its key, size and when it was last used (seconds since the epoch)."""

    key: str
    bytes: int
    last_used: float


def choose_evictions(entries: Iterable[Entry], cap_bytes: int, in_use: Iterable[str] = ()) -> list[str]:
    """Keys to remove, least recently used first, until the entries fit in `cap_bytes`; never a key in `in_use`.

    A cap of 0 means no cap. When the entries in use alone exceed the cap, every other entry goes and the cache
    stays over the cap (an entry a running job reads is never taken from under it)."""
    if cap_bytes <= 0:
        return []
    entries = list(entries)
    protected = set(in_use)
    total = sum(e.bytes for e in entries)
    out: list[str] = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.key)):
        if total <= cap_bytes:
            break
        if entry.key in protected:
            continue
        out.append(entry.key)
        total -= entry.bytes
    return out


def live_keys(leases: Iterable[dict[str, Any]], now: float) -> set[str]:
    """Entry keys named by leases that have not expired."""
    keys: set[str] = set()
    for lease in leases:
        if float(lease.get("expiresAt") or 0) <= now:
            continue
        for kind in KINDS:
            for rel in (lease.get(kind) or {}).values():
                keys.add("/".join(str(rel).split("/")[:2]))
    return keys


# --------------------------------------------------------------------------- the volume

def _os_error(exc: OSError, root: Path, action: str) -> KubetuneTrainerError:
    where = f"model cache volume {root}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{where} is full ({action}): {exc}; raise the claim's size or lower the cache cap "
                            "so that eviction makes room")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return PermissionDeniedError(f"{where} is not writable ({action}): {exc}; the preflight needs the claim "
                                     "mounted read-write (ReadWriteMany)")
    return StorageError(f"{where}: cannot {action}: {exc}")


@contextlib.contextmanager
def locked(root: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Hold `locks/<name>.lock` (flock; released by the kernel when the holder dies). Yields False when
    `blocking` is off and another holder has it."""
    path = root / "locks" / f"{_flat(name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_entry(root: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete entry, or None (absent, or a directory without a manifest)."""
    try:
        data = json.loads((root / key / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _touch(root: Path, key: str) -> None:
    with contextlib.suppress(OSError):
        os.utime(root / key / ENTRY_FILE)


def fill(root: Path, key: str, download: Callable[[Path], None], meta: dict[str, Any]) -> tuple[Path, bool]:
    """The entry `key`, downloaded by `download(tmp_dir)` unless already complete: (its path, whether this call
    filled it). Under the entry's lock; the download goes to `tmp/<entry>/` on the same volume and is renamed into
    place only when complete, so a reader sees the whole entry or none."""
    final = root / key
    try:
        with locked(root, key):
            if read_entry(root, key) is not None:
                _touch(root, key)
                return final, False
            staging = root / "tmp" / _flat(key)
            resumed = staging.exists()
            staging.mkdir(parents=True, exist_ok=True)
            if resumed:
                log.info("finishing the interrupted download of %s", key)
            download(staging)
            manifest = {**meta, "key": key, "bytes": tree_bytes(staging), "filledAt": time.time()}
            _write_json(staging / ENTRY_FILE, manifest)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a directory without a manifest cannot be produced by a rename; remove it anyway
                shutil.rmtree(final)
            os.rename(staging, final)
            with contextlib.suppress(OSError):
                fd = os.open(final.parent, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            return final, True
    except OSError as exc:
        raise _os_error(exc, root, f"fill {key}") from exc


def read_leases(root: Path) -> list[dict[str, Any]]:
    """Every readable lease."""
    out = []
    for path in sorted((root / "leases").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                out.append({**data, "_path": str(path)})
    return out


def write_lease(root: Path, lease: str, job: str, models: dict[str, str], datasets: dict[str, str],
                now: float, ttl: float) -> Path:
    """`leases/<lease>.json`: the entries (paths relative to the root) the job uses, until `now + ttl`."""
    path = root / "leases" / f"{escape(lease)}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"job": job, "createdAt": now, "expiresAt": now + ttl, "models": models,
                           "datasets": datasets})
    except OSError as exc:
        raise _os_error(exc, root, "write the job's lease") from exc
    return path


def scan(root: Path) -> list[Entry]:
    """The complete entries, their sizes and last use (the manifest's mtime, touched at each use)."""
    out = []
    for kind in KINDS:
        base = root / kind
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            key = f"{kind}/{child.name}"
            manifest = read_entry(root, key)
            if manifest is None:
                continue
            with contextlib.suppress(OSError):
                out.append(Entry(key, int(manifest.get("bytes") or 0), (child / ENTRY_FILE).stat().st_mtime))
    return out


def _remove(root: Path, path: Path) -> None:
    trash = root / "trash" / f"{path.name}.{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, trash)  # gone from its name at once; the files go after, outside the sweep lock


def _last_write(path: Path) -> float:
    """The newest mtime of `path` and everything under it."""
    times = [path.stat().st_mtime]
    times += [p.stat().st_mtime for p in path.rglob("*") if not p.is_symlink()]
    return max(times)


def sweep(root: Path, cap_bytes: int, now: float, abandoned_after: float = ABANDONED_SECONDS) -> dict[str, Any]:
    """Apply the policy: drop expired leases, remove abandoned downloads (tmp/ entries nobody holds the lock of and
    nothing wrote to for `abandoned_after` seconds: a younger one is left for the retried fill to finish) and, over
    the cap, the least recently used entries no live lease names. Returns what it did."""
    removed: list[str] = []
    abandoned = 0
    try:
        with locked(root, "sweep"):
            leases = read_leases(root)
            for lease in leases:
                if float(lease.get("expiresAt") or 0) <= now:
                    with contextlib.suppress(OSError):
                        os.unlink(lease["_path"])
            tmp = root / "tmp"
            for staging in sorted(tmp.iterdir()) if tmp.is_dir() else []:
                key = staging.name.replace("__", "/", 1)
                with locked(root, key, blocking=False) as got:
                    if got and staging.exists() and now - _last_write(staging) >= abandoned_after:
                        _remove(root, staging)
                        abandoned += 1
            entries = scan(root)
            for key in choose_evictions(entries, cap_bytes, live_keys(leases, now)):
                with locked(root, key, blocking=False) as got:
                    if got:
                        _remove(root, root / key)
                        removed.append(key)
            left = scan(root)
    except OSError as exc:
        raise _os_error(exc, root, "apply the eviction policy") from exc
    for trash in (root / "trash").glob("*") if (root / "trash").is_dir() else []:
        shutil.rmtree(trash, ignore_errors=True)
    if removed:
        log.info("evicted %s", ", ".join(removed))
    return {"evicted": removed, "abandoned": abandoned, "bytes": sum(e.bytes for e in left), "entries": len(left)}


# --------------------------------------------------------------------------- what trainer pods read

def lookup(kind: str, uri: str) -> Path | None:
    """The cached copy of a model (`kind` "models") or dataset file ("datasets") the job's preflight put in the
    cache, or None: no cache configured, this pod is the filler, no lease, or the entry is gone (then the caller
    downloads as without a cache)."""
    root = cache_root()
    lease = lease_id()
    if root is None or not lease or filling():
        return None
    try:
        data = json.loads((root / "leases" / f"{escape(lease)}.json").read_text())
    except (OSError, ValueError):
        log.info("no cache lease for this job in %s: downloading %s", root, uri)
        return None
    rel = ((data.get(kind) or {}) if isinstance(data, dict) else {}).get(uri)
    if not rel:
        return None
    key = "/".join(str(rel).split("/")[:2])
    if read_entry(root, key) is None:
        log.warning("cache entry %s for %s is gone (evicted?): downloading", key, uri)
        return None
    path = root / rel
    if not path.exists():
        return None
    log.info("%s from the cache: %s", uri, path)
    return path


