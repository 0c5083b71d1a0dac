"""Child-process supervision for the local control plane and the process node.

Every child runs in its own session (process group), so a stop signal reaches the whole tree
it spawned. On Linux each child also gets a parent-death signal (via `setpriv --pdeathsig`),
so even a SIGKILLed parent leaves nothing running. `ProcessSet.stop()` stops children in the
reverse order of their start (KWOK before the scheduler before the apiserver before etcd).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_SETPRIV = shutil.which("setpriv")


def _pdeathsig_prefix() -> list[str]:
    """Argv prefix that makes the child receive SIGKILL when its parent thread dies."""
    return [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV and os.name == "posix" else []


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: str | Path | None = None,
          die_with_parent: bool = True) -> subprocess.Popen:
    """Start argv in a new session with stdout+stderr appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        prefix = _pdeathsig_prefix() if die_with_parent else []
        return subprocess.Popen(prefix + list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in {"Z", "X"}
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def group_alive(pgid: int) -> bool:
    """True when any non-zombie process is left in process group pgid."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in {"Z", "X"}:
            return True
    return False


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after `grace` seconds; returns the exit code."""
    pgid = proc.pid  # start_new_session makes the child a group leader
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(pgid):
                return proc.returncode
            time.sleep(0.05)
    return proc.poll()


class ComponentExited(RuntimeError):
    """A supervised component exited while it should be running."""


@dataclass
class Child:
    """One supervised component."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    stop_grace: float = 5.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of this component's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcessSet:
    """Children started in order and stopped in reverse order."""

    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
              stop_grace: float = 5.0) -> Child:
        """Spawn a component and remember it."""
        child = Child(name, spawn(argv, log_path, env=env), log_path, stop_grace)
        self.children.append(child)
        return child

    def get(self, name: str) -> Child:
        """The child called name."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def check_alive(self) -> None:
        """Raise with the log tail of the first child that exited."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise ComponentExited(f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                                   f"{child.log_tail()}")

    def stop_child(self, name: str) -> None:
        """Stop one child (and forget it); the others keep running."""
        child = self.get(name)
        self.children.remove(child)
        kill_group(child.proc, child.stop_grace)

    def stop(self) -> None:
        """Stop all children, last started first, and wait until their process groups are gone."""
        while self.children:
            child = self.children.pop()
            kill_group(child.proc, child.stop_grace)
