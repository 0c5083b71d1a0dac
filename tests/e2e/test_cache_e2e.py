"""End to end with the shared model cache (docs/cache.md): an operator started with `--cache-claim`, two FineTuneJobs
on the same s3:// model applied together, real preflight and trainer pods on process nodes. The model's files are
fetched from the (local) S3 endpoint once in all, both jobs train from the cache, and status.preflight.cache says
which job filled the entry and which found it."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest
import yaml

from kubetune_dev.operator_process import OperatorProcess, install_crds
from tests.support.cache_jobs import prepare_namespace, upload_tiny_model
from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import FtjClient, free_port
from tests.trainer.test_storage import LocalS3

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
CACHE_CLAIM = "model-cache"


@pytest.fixture(scope="module")
def cache_operator(cluster, process_nodes, tmp_path_factory):
    """The operator with the shared cache on claim `model-cache`."""
    install_crds(cluster.kubectl)
    log = tmp_path_factory.mktemp("operator-cache") / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, [
        "--all-namespaces", "--liveness-port", "0", "--metrics-port", str(free_port()),
        "--resync-seconds", "1", "--progress-seconds", "1", "--lease-namespace", "default",
        "--lease-name", f"e2e-cache-{uuid.uuid4().hex[:6]}", "--lease-seconds", "5",
        "--cpu-node-selector", "kubetune.io/process-node=true", "--cache-claim", CACHE_CLAIM,
    ], log)
    with op.leading():
        yield op


@pytest.fixture
def s3():
    pytest.importorskip("minio")
    server = LocalS3()
    yield server
    server.close()


def test_two_jobs_on_one_model_fetch_it_once(cluster, k8s, namespace, process_nodes, cache_operator, s3,
                                             tmp_path):
    ftj = FtjClient(k8s)
    model_files = upload_tiny_model(s3, tmp_path)
    data_root = Path(process_nodes[0].config.data_root)
    work = prepare_namespace(k8s, namespace, data_root, s3, claims=(CACHE_CLAIM,))  # starts from an empty cache
    cache_root = data_root / "pvc" / CACHE_CLAIM

    names = ("cached-a", "cached-b")
    for name in names:  # applied together: both preflights race for the same entry; its lock lets one download
        m = copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))
        m["metadata"] = {"name": name}
        m["spec"]["model"]["uri"] = "s3://models/tiny-llama"
        m["spec"]["dataset"]["uri"] = f"pvc://{work}/data/train.jsonl"
        m["spec"]["output"]["uri"] = f"pvc://{work}/outputs/{name}"
        m["spec"]["training"].update(maxSteps=4, checkpointEverySteps=1000)
        m["spec"]["secrets"] = {"s3CredentialsSecretRef": {"name": "s3"}}
        cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(m))

    def terminal(name: str) -> dict:
        last: dict = {}

        def check():
            nonlocal last
            last = ftj.status(namespace, name)
            return last if last.get("phase") in ("Succeeded", "Failed", "Cancelled") else None

        return wait_for(check, 600, lambda: f"{namespace}/{name} terminal; last status: {json.dumps(last)[:2000]}")

    statuses = [terminal(name) for name in names]
    for st in statuses:
        assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    for key in model_files:  # two preflights and two trainer pods: each model file fetched once in all
        assert sum(1 for r in s3.requests if r == f"GET /models/{key}") == 1, (key, s3.requests)
    caches = [st["preflight"]["cache"] for st in statuses]
    entry = caches[0]["model"]
    assert entry.startswith("models/s3%3A%2F%2Fmodels%2Ftiny-llama@s3-") and caches[1]["model"] == entry, caches
    assert all(c["volume"] == CACHE_CLAIM and c["dataset"].startswith("not cached") for c in caches), caches
    assert sorted(len(c["filled"]) for c in caches) == [0, 1] and sorted(len(c["hits"]) for c in caches) == [0, 1]
    assert (cache_root / entry / "config.json").is_file() and not list((cache_root / "tmp").glob("*"))
    uids = [ftj.get(namespace, name)["metadata"]["uid"] for name in names]
    assert all((cache_root / "leases" / f"{uid}.json").is_file() for uid in uids)
