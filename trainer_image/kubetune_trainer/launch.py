"""Pod entrypoint: one training process per GPU (KUBETUNE_PROCS_PER_NODE) on each pod via torchrun.

With 1 node x 1 process the run happens in this process (no launcher overhead).
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.errors import PlanError
from kubetune_trainer.outcomes import PREEMPTED_EXIT, exit_code_for
from kubetune_trainer.preemption import STOP_FILE_ENV, child_pids, record_stop_request
from kubetune_trainer.worker import PERMANENT_FAILURE_EXIT, run_worker


@dataclass(frozen=True)
class Rendezvous:
    """The rendezvous the operator sets up (docs/contracts.md §3)."""

    num_nodes: int = 1
    node_rank: int = 0
    procs_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        """Total processes over all pods."""
        return self.num_nodes * self.procs_per_node


def _int_env(env: dict[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PlanError(f"environment {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise PlanError(f"environment {name}={value} must be >= {minimum}")
    return value


def rendezvous_from_env(env: dict[str, str] | None = None) -> Rendezvous:
    """Parse KUBETUNE_NUM_NODES / NODE_RANK / PROCS_PER_NODE / MASTER_ADDR / MASTER_PORT."""
    e = dict(os.environ if env is None else env)
    rdv = Rendezvous(
        num_nodes=_int_env(e, "KUBETUNE_NUM_NODES", 1, 1),
        node_rank=_int_env(e, "KUBETUNE_NODE_RANK", _int_env(e, "JOB_COMPLETION_INDEX", 0, 0), 0),
        procs_per_node=_int_env(e, "KUBETUNE_PROCS_PER_NODE", 1, 1),
        master_addr=e.get("KUBETUNE_MASTER_ADDR") or "127.0.0.1",
        master_port=_int_env(e, "KUBETUNE_MASTER_PORT", 29500, 1),
    )
    if rdv.node_rank >= rdv.num_nodes:
        raise PlanError(f"KUBETUNE_NODE_RANK={rdv.node_rank} is not below KUBETUNE_NUM_NODES={rdv.num_nodes}")
    return rdv


def launch_command(rdv: Rendezvous, python: str = sys.executable) -> list[str]:
    """The torchrun command line that starts `kubetune-train run` on every local process."""
    master = "127.0.0.1" if rdv.num_nodes == 1 else rdv.master_addr
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={rdv.num_nodes}",
        f"--nproc-per-node={rdv.procs_per_node}",
        f"--node-rank={rdv.node_rank}",
        f"--master-addr={master}",
        f"--master-port={rdv.master_port}",
        "--rdzv-backend=static",
        "--max-restarts=0",
        "-m", "kubetune_trainer.cli", "run",
    ]


def worker_env(env: dict[str, str], rdv: Rendezvous) -> dict[str, str]:
    """Environment for the workers: DeepSpeed's CPU accelerator when there is no GPU, sane threading."""
    out = dict(env)
    out["KUBETUNE_NODE_RANK"] = str(rdv.node_rank)
    if not _cuda_available():
        out.setdefault("DS_ACCELERATOR", "cpu")
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _summary_fingerprint(path: Path) -> tuple | None:
    try:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, path.read_bytes())
    except OSError:
        return None


def launch(env: dict[str, str] | None = None) -> int:
    """Start the run: in-process for 1x1, else torchrun; node 0 reports a failure the workers did not."""
    from kubetune_trainer.summary import build_summary, termination_log_path, write_summary

    e = dict(os.environ if env is None else env)
    try:
        rdv = rendezvous_from_env(e)
    except PlanError as exc:
        write_summary(build_summary(status="Failed", reason=exc.reason, message=str(exc)))
        return PERMANENT_FAILURE_EXIT
    if rdv.world_size == 1:
        os.environ.update(worker_env(e, rdv))
        return run_worker()
    log_path = termination_log_path()
    before = _summary_fingerprint(log_path)
    stopping: list[int] = []
    told: set[int] = set()

    def tell_workers() -> None:
        # The workers (not torchrun, which would kill them after its own short timeout) get the signal: they
        # stop together at the next step boundary after a checkpoint and exit; torchrun then exits.
        for worker in child_pids(proc.pid) if proc is not None else ():
            if worker not in told:
                told.add(worker)
                try:
                    os.kill(worker, stopping[0])
                except OSError:
                    pass

    stop_dir = tempfile.mkdtemp(prefix="kubetune-stop-")
    stop_file = os.path.join(stop_dir, "requested")

    def forward(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        stopping.append(signum)
        record_stop_request(stop_file, signum)  # first: a worker not yet listening reads it when it starts
        tell_workers()

    proc = None
    previous = signal.signal(signal.SIGTERM, forward) if _main_thread() else None
    try:
        proc = subprocess.Popen(launch_command(rdv), env={**worker_env(e, rdv), STOP_FILE_ENV: stop_file})
        code = _wait(proc, lambda: stopping and tell_workers())  # workers started after the signal hear it too
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(stop_dir, ignore_errors=True)
    written = _summary_fingerprint(log_path) != before
    if code != 0 and rdv.node_rank == 0 and not written:
        if stopping:
            reason, what = "Preempted", "was stopped (SIGTERM)"
        elif code in (-9, 137):
            reason, what = "OutOfMemory", "killed (SIGKILL: out of memory?)"
        else:
            reason, what = "TrainingError", f"exited with code {code}"
        write_summary(build_summary(status="Failed", reason=reason,
                                    message=f"a training process on node {rdv.node_rank} {what} before "
                                            "writing a summary; see the pod log"))
    return launch_exit_code(code, summary_reason(log_path) if rdv.node_rank == 0 else "", bool(stopping))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _wait(proc: subprocess.Popen, every_second) -> int:
    """Wait for `proc`, calling `every_second()` while it runs."""
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            every_second()


def summary_reason(path: Path) -> str:
    """The `reason` of the termination summary at `path` ('' when there is none)."""
    try:
        return str(json.loads(path.read_bytes()).get("reason") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def launch_exit_code(torchrun_code: int, reason: str, stopped: bool) -> int:
    """The pod's exit code: torchrun reports any worker failure as 1, so the code comes from the summary's
    reason (node 0) - permanent failures fail the Job at once, a preempted run is not counted as a failure."""
    if torchrun_code == 0:
        return 0
    if reason and reason != "Completed":
        return exit_code_for(reason)
    if stopped:
        return PREEMPTED_EXIT
    return 128 - torchrun_code if torchrun_code < 0 else torchrun_code
