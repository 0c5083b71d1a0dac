"""Helpers for end-to-end tests of the shared model cache (tests/e2e/test_cache_*): a tiny model in a local S3
endpoint, a namespace with a workspace claim and the S3 credentials, quickstart FineTuneJobs on that model, an
operator process watching one namespace, and an S3 endpoint that holds one object's download until released."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from kubetune_dev.devcluster.process_node import create_local_pvc
from kubetune_dev.operator_process import OperatorProcess
from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import FtjClient, free_port
from tests.trainer.test_storage import LocalS3

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
DATASET = REPO / "examples" / "data" / "quickstart.jsonl"
MODEL_URI = "s3://models/tiny-llama"
TERMINAL = ("Succeeded", "Failed", "Cancelled")


class GatedS3(LocalS3):
    """LocalS3 that holds the GET of one object (`hold`, a URL path such as /models/tiny-llama/model.safetensors)
    until `release` is set: `arrived` is set when a download of it is waiting."""

    def __init__(self, hold: str) -> None:
        self.hold = hold
        self.arrived = threading.Event()
        self.release = threading.Event()
        super().__init__()

    def _handler(self):
        base = super()._handler()
        gate = self

        class Held(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:  # noqa: N802
                if unquote(urlparse(self.path).path) == gate.hold and not gate.release.is_set():
                    gate.arrived.set()
                    gate.release.wait(600)
                try:
                    super().do_GET()
                except OSError:  # the client was killed while its download was held
                    pass

        return Held


def upload_tiny_model(s3: LocalS3, work: Path) -> list[str]:
    """Make the tiny test model and put it under s3://models/tiny-llama/; its object keys, sorted."""
    tiny = work / "tiny-llama"
    subprocess.run([sys.executable, "-m", "kubetune_trainer.tiny", "--out", str(tiny)], check=True,
                   capture_output=True, timeout=600)
    for path in sorted(p for p in tiny.rglob("*") if p.is_file()):
        s3.put("models", f"tiny-llama/{path.relative_to(tiny).as_posix()}", path.read_bytes())
    return sorted(k for b, k in s3.objects if b == "models")


def gets(s3: LocalS3, key: str) -> int:
    """How many GETs of models/<key> the endpoint answered (or held)."""
    return sum(1 for r in s3.requests if r == f"GET /models/{key}")


def prepare_namespace(k8s: Any, namespace: str, data_root: Path, s3: LocalS3, claims: tuple[str, ...] = ()) -> str:
    """The workspace claim (with the quickstart dataset), the given extra claims, and Secret `s3`; returns the
    workspace claim's name."""
    from kubernetes import client

    work = f"e2e-{namespace}"[:60]
    for claim in claims:  # process nodes keep a claim's files by its name for every namespace: start empty
        shutil.rmtree(data_root / "pvc" / claim, ignore_errors=True)
    for claim in (work, *claims):
        create_local_pvc(k8s, namespace, claim, data_root)
    (data_root / "pvc" / work / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DATASET, data_root / "pvc" / work / "data" / "train.jsonl")
    secret = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret",
              "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}"}
    client.CoreV1Api(k8s).create_namespaced_secret(namespace, {
        "metadata": {"name": "s3"}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}})
    return work


def apply_job(cluster: Any, namespace: str, name: str, work: str) -> None:
    """The quickstart FineTuneJob on the tiny S3 model, 4 steps, its output on the workspace claim."""
    m = copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))
    m["metadata"] = {"name": name}
    m["spec"]["model"]["uri"] = MODEL_URI
    m["spec"]["dataset"]["uri"] = f"pvc://{work}/data/train.jsonl"
    m["spec"]["output"]["uri"] = f"pvc://{work}/outputs/{name}"
    m["spec"]["training"].update(maxSteps=4, checkpointEverySteps=1000)
    m["spec"]["secrets"] = {"s3CredentialsSecretRef": {"name": "s3"}}
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(m))


def wait_status(ftj: FtjClient, namespace: str, name: str, done, what: str, timeout: float = 600) -> dict:
    """Poll the FineTuneJob's status until `done(status)`; fails with the last status seen."""
    last: dict = {}

    def check():
        nonlocal last
        last = ftj.status(namespace, name)
        return last if done(last) else None

    return wait_for(check, timeout, lambda: f"{namespace}/{name} {what}; last status: {json.dumps(last)[:2000]}")


def wait_terminal(ftj: FtjClient, namespace: str, name: str, timeout: float = 600) -> dict:
    """The FineTuneJob's status once it is Succeeded, Failed or Cancelled."""
    return wait_status(ftj, namespace, name, lambda st: st.get("phase") in TERMINAL, "terminal", timeout)


def cache_operator(cluster: Any, namespace: str, log: Path, args: list[str], lease: str = "") -> OperatorProcess:
    """An operator process (not started) watching only `namespace`, running pods on the process nodes."""
    return OperatorProcess(cluster.kubeconfig, [
        "--namespace", namespace, "--liveness-port", "0", "--metrics-port", str(free_port()),
        "--resync-seconds", "1", "--progress-seconds", "1", "--lease-namespace", "default",
        "--lease-name", lease or f"e2e-cache-{uuid.uuid4().hex[:6]}", "--lease-seconds", "5",
        "--cpu-node-selector", "kubetune.io/process-node=true", *args,
    ], log)
