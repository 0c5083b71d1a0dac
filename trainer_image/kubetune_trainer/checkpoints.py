"""Checkpoint directories: `checkpoints/step-N/`, written atomically (temp dir + rename), last K kept.

`trainer_state.json` is the completion marker: it is written last (after every rank's files are on disk) and
a directory without it is never resumed from; a restart removes such torn directories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    """`<root>/step-<step>`."""
    return root / f"step-{step}"


def temp_dir(root: Path, step: int) -> Path:
    """Where step N is written before the atomic rename."""
    return root / f".tmp-step-{step}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state file), oldest first."""
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prepare_temp(root: Path, step: int) -> Path:
    """Create a fresh temp dir for step N (removing a leftover from a crashed save)."""
    tmp = temp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def torn_checkpoints(root: Path) -> list[Path]:
    """Directories a save left behind without finishing: temp dirs and `step-N` without the state file."""
    if not root.is_dir():
        return []
    torn = []
    for child in root.iterdir():
        if not child.is_dir():
            continue
        if child.name.startswith(".tmp-step-") or (_STEP_RE.match(child.name) and not (child / STATE_FILE).is_file()):
            torn.append(child)
    return sorted(torn)


def remove_torn(root: Path) -> list[Path]:
    """Remove what `torn_checkpoints` finds (at resume, before any save of this run); returns what it removed."""
    removed = []
    for path in torn_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def sync_tree(directory: Path) -> None:
    """fsync every file under `directory` (and the directories), so the state file is never durable before the
    weights it describes."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [directory, *sorted(p for p in directory.rglob("*") if p.is_dir())]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the trainer state (the completeness marker, so it is written last) with fsync."""
    path = directory / STATE_FILE
    part = directory / (STATE_FILE + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def read_state(directory: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint."""
    return json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))


def publish(root: Path, step: int) -> Path:
    """Atomically rename the temp dir to `step-N` (idempotent when another process already did)."""
    final, tmp = step_dir(root, step), temp_dir(root, step)
    if final.exists() and not tmp.exists():
        return final
    if final.exists():
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except FileNotFoundError:
        if not final.exists():
            raise
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (keep 0: none; the newest complete checkpoint, the one a
    restart resumes from, is always kept) and stale temp dirs; returns what was removed."""
    removed = []
    complete = complete_checkpoints(root)
    for _, path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    newest = complete[-1][0] if complete else -1
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-step-"):
                try:
                    if int(child.name.rsplit("-", 1)[1]) <= newest:
                        shutil.rmtree(child, ignore_errors=True)
                        removed.append(child)
                except ValueError:
                    continue
    return removed


def rng_state() -> dict[str, Any]:
    """Python / numpy / torch (CPU and CUDA) RNG states of this process."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
