"""Run `kubetune operator` as a child process (integration tests, the local demo) and install the CRDs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from kubetune_dev.devcluster.cluster import track_live, untrack_live

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO_ROOT / "crds"
FTJ_CRD = "finetunejobs.kubetune.io"
POLICY = "finetunejobs.kubetune.io"
_POLICY_PROBE = json.dumps({
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "policy-probe"},
    "spec": {"model": {"uri": "hf://probe/probe"}, "dataset": {"uri": "pvc://probe/train.jsonl"}, "method": "lora",
             "training": {"epochs": 1, "learningRate": "not-a-number"}, "output": {"uri": "pvc://probe/out"}}})


def install_crds(kubectl: Any, timeout: float = 60) -> None:
    """`kubectl apply -f crds/` and wait until the FineTuneJob CRD is served and its admission policy enforced.

    kubectl: a callable like devcluster's `cluster.kubectl(*args, input=None, check=True)`."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS_DIR))
    deadline = time.monotonic() + timeout
    # `kubectl wait --for=condition=established` fails at once on a CRD whose status has no conditions yet
    # (a moment after its first creation), so read the condition until it is True.
    established = '{.status.conditions[?(@.type=="Established")].status}'
    while kubectl("get", f"crd/{FTJ_CRD}", "-o", f"jsonpath={established}", check=False).stdout.strip() != "True":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{FTJ_CRD} is not established after {timeout:.0f} s")
        time.sleep(0.2)
    # The new resource is served a moment after it is established.
    while kubectl("get", "finetunejobs", "-A", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("finetunejobs.kubetune.io is established but not served")
        time.sleep(0.2)
    # The admission policy (crds/kubetune.io_finetunejobs-policy.yaml) is enforced a moment after it is created:
    # wait until a server-side dry run of a bad learning rate is denied by it.
    while f"ValidatingAdmissionPolicy '{POLICY}'" not in kubectl("create", "--dry-run=server", "-n", "default", "-f", "-", input=_POLICY_PROBE,
                                check=False).stderr:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ValidatingAdmissionPolicy {POLICY} is not enforced")
        time.sleep(0.2)


class OperatorProcess:
    """`python -m kubetune operator ARGS` with KUBECONFIG set; logs go to a file."""

    def __init__(self, kubeconfig: str | os.PathLike[str], args: Sequence[str], log_path: str | os.PathLike[str],
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig = str(kubeconfig)
        self.args = list(args)
        self.log_path = Path(log_path)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "OperatorProcess":
        """Start the process (returns at once)."""
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubetune", "operator", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
        log.close()
        track_live(self)  # stopped with the clusters if this process is ended by a signal
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the operator logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 30) -> None:
        """Wait until the log contains `needle` (fails with the log tail)."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if not self.alive():
                raise RuntimeError(f"operator exited ({self.proc.returncode}) before logging {needle!r}:\n"
                                   + self.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator did not log {needle!r} in {timeout}s:\n" + self.log_text()[-3000:])
            time.sleep(0.1)

    @contextlib.contextmanager
    def leading(self, timeout: float = 60, log_tail: int = 4000) -> Iterator["OperatorProcess"]:
        """Start, wait until it leads (holds its Lease), and on exit stop it and print its log tail (pytest shows
        it for a failing test)."""
        self.start()
        try:
            self.wait_for_log("leading as", timeout)
            yield self
        finally:
            self.stop()
            print(self.log_text()[-log_tail:])

    def kill(self) -> None:
        """SIGKILL (a crash: no Lease release, no cleanup)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        untrack_live(self)
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
