"""The output volume in plain words: is it writable, is there room for a checkpoint, and what a failed write
means ("no space left on <output> (checkpoint needs ~N MB, M MB free)" instead of a serializer's assertion)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from kubetune_trainer.errors import NoSpaceError, PermissionDeniedError

PROBE_NAME = ".kubetune-write-probe"
MB = 1024 * 1024

# What torch's serializer says when the disk fills in the middle of a file (it loses the OSError's errno).
_FULL_DISK_SIGNS = ("no space left on device", "unexpected pos", "failed writing file", "file write failed")


def free_bytes(path: Path) -> int:
    """Bytes available to this (unprivileged) process on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tree_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def size_text(value: int) -> str:
    """Bytes for people: "146 KB", "380 MB", "61 GB"."""
    if value >= 10 * 1024 * MB:
        return f"{value / (1024 * MB):.0f} GB"
    if value >= MB:
        return f"{value / MB:.0f} MB"
    return f"{value / 1024:.0f} KB"


def _where(directory: Path, uri: str) -> str:
    return uri if uri.rstrip("/") == str(directory).rstrip("/") else f"{uri} ({directory})"


def estimate_checkpoint_bytes(model, optimizer_name: str) -> int:
    """A resumable checkpoint: the trainable parameters plus the optimizer's state for them."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in trainable)
    count = sum(p.numel() for p in trainable)
    if "8bit" in optimizer_name:
        state = 2 * count  # two 8-bit moments
    elif "adam" in optimizer_name:
        state = 8 * count  # two fp32 moments
    else:
        state = 0
    return weights + state


def check_output(directory: Path, uri: str, need_bytes: int) -> None:
    """Before training: `directory` (where `uri` is written) accepts a file and has room for one checkpoint."""
    probe = directory / PROBE_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"kubetune")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(exc, directory, uri, need_bytes) or PermissionDeniedError(
            f"cannot write to the output {_where(directory, uri)}: {exc.strerror or exc}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = free_bytes(directory)
    if free < need_bytes:
        raise NoSpaceError(no_space_message(directory, uri, need_bytes, free))


def no_space_message(directory: Path, uri: str, need_bytes: int, free: int) -> str:
    """The plain-words full-disk message."""
    return (f"no space left on {_where(directory, uri)}: a checkpoint needs ~{size_text(need_bytes)}, "
            f"{size_text(free)} free; "
            "free space on the output volume or use a larger one (completed checkpoints are kept)")


def write_error(exc: BaseException, directory: Path, uri: str, need_bytes: int) -> Exception | None:
    """A NoSpaceError / PermissionDeniedError for an exception raised while writing under `directory`, or None
    when it is something else."""
    text = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "read-only" if exc.errno == errno.EROFS else "not writable by this user"
        return PermissionDeniedError(f"the output {_where(directory, uri)} is {what}: {exc.strerror or exc}; "
                                     "mount the output volume read-write for the trainer's user")
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "no space left on device" in text or "disk quota exceeded" in text
    if not full and any(sign in text for sign in _FULL_DISK_SIGNS):
        try:
            full = free_bytes(directory) < need_bytes
        except OSError:
            full = False
    if not full:
        return None
    try:
        free = free_bytes(directory)
    except OSError:
        free = 0
    return NoSpaceError(no_space_message(directory, uri, need_bytes, free))


def remove_quietly(path: Path) -> None:
    """Remove a directory tree, ignoring errors (cleanup after a failed save)."""
    shutil.rmtree(path, ignore_errors=True)
