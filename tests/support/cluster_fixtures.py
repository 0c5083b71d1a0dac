"""pytest fixtures for tests against the real local control plane.

Registered in tests/conftest.py with `pytest_plugins = ["tests.support.cluster_fixtures"]`.

Fixtures (stable names):
- `cluster` (session): a started `kubetune_dev.devcluster.Cluster` — etcd, kube-apiserver,
  kube-controller-manager (all controllers), kube-scheduler and KWOK with the default fleet
  (devcluster/fleet.yaml: 2x8 H100-80GB, 2x8 A100-80GB, 2x4 L4). Started lazily, only when a test
  asks for it, once per session, stopped at the end. Useful members:
    cluster.kubeconfig (Path), cluster.server (URL), cluster.api_client() (new kubernetes ApiClient),
    cluster.kubectl(*args, input=None, check=True) (CompletedProcess from the real kubectl),
    cluster.fleet (Fleet; .node_names, .groups), cluster.start_process_node(name, data_root, cpu=..),
    cluster.pids, cluster.logs_dir.
- `k8s` (session): one ApiClient for the cluster (`kubernetes.client.CoreV1Api(k8s)` etc.).
- `namespace` (function): a fresh namespace (name returned) whose `default` service account exists;
  deleted after the test.
- `process_nodes` (session): two process nodes, `process-node-0` and `process-node-1`, that run pods
  bound to them as local processes; they share one data root (`process_nodes[0].config.data_root`,
  PVC `c` lives in `<data_root>/pvc/c`). See kubetune_dev.devcluster.process_node.

Helpers (import from tests.support.cluster_helpers): `wait_for(predicate, timeout, describe)`,
`complete_pod(api, ns, name, exit_code=0, message="")`, `pod_events(api, ns, name)`.

The binaries come from $KUBETUNE_BIN_DIR or ~/.cache/kubetune/bin/current (devcluster/build.sh).
"""

from __future__ import annotations

import re
import uuid
from typing import Iterator

import pytest

from kubetune_dev.devcluster.cluster import Cluster, ClusterOptions
from tests.support.cluster_helpers import wait_for


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's local control plane with the default simulated GPU fleet."""
    c = Cluster(ClusterOptions())
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def k8s(cluster: Cluster) -> Iterator[object]:
    """A kubernetes ApiClient for the session's cluster."""
    api = cluster.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster: Cluster, k8s: object) -> Iterator[str]:
    """A fresh namespace for one test (deleted afterwards)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30,
             f"service account default in namespace {name}")
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except client.ApiException:
            pass


@pytest.fixture(scope="session")
def process_nodes(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list:
    """process-node-0 and process-node-1 sharing one data root, Ready in the cluster."""
    from kubernetes import client

    root = tmp_path_factory.mktemp("process-nodes")
    nodes = [cluster.start_process_node(f"process-node-{i}", root, cpu="4", memory="8Gi") for i in range(2)]
    core = client.CoreV1Api(cluster.api_client())

    def ready() -> bool:
        for n in nodes:
            status = core.read_node(n.name).status
            if not any(c.type == "Ready" and c.status == "True" for c in status.conditions or []):
                return False
        return True

    wait_for(ready, 30, "process nodes Ready")
    return nodes
