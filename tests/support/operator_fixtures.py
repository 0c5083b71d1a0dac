"""pytest fixtures: one operator subprocess per test module, with a fake rank-0 /progress server.

Import them into a test module (`from tests.support.operator_fixtures import ftj, operator, progress`):
each module that does gets its own operator (module scope), so its tests share one."""

from __future__ import annotations

import uuid

import pytest

from kubetune_dev.operator_process import OperatorProcess, install_crds
from tests.support.finetunejobs import FtjClient, ProgressServer, free_port


@pytest.fixture(scope="module")
def progress():
    """A local HTTP server answering /progress like a rank-0 trainer (tests set its payload)."""
    server = ProgressServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def operator(cluster, progress, tmp_path_factory):
    """The operator leading on the session's cluster: 1 s resync and progress, 2 s sizing retries."""
    install_crds(cluster.kubectl)
    metrics_port = free_port()
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, [
        "--all-namespaces", "--liveness-port", "0", "--metrics-port", str(metrics_port),
        "--resync-seconds", "1", "--progress-seconds", "1", "--sizing-retry-seconds", "2",
        "--lease-namespace", "default", "--lease-name", f"ops-{uuid.uuid4().hex[:6]}",
        "--lease-seconds", "5", "--progress-host", "127.0.0.1", "--progress-port", str(progress.port),
        "--no-preflight",  # KWOK pods run no preflight; tests/e2e covers it on process nodes
    ], log)
    op.metrics_port = metrics_port
    with op.leading():
        yield op


@pytest.fixture
def ftj(k8s, operator, progress):
    """A FineTuneJob client; the fake progress server starts each test silent."""
    progress.set(None)
    return FtjClient(k8s)
