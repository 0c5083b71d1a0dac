"""End to end, the StorageClass variant of the shared cache (docs/cache.md): an operator started with
`--cache-storage-class` creates the cache claim in the namespace of the first job applied there (kubetune's labels,
no owner, the StorageClass, size and access modes asked for); while no PersistentVolume can bind it, the job says
so (reason CacheClaimNotBound, a Warning Event) instead of waiting silently; once an available PersistentVolume of
that StorageClass exists, the cluster's own binder binds the claim (no provisioner runs locally), the preflight fills
the cache through it and the job trains from it. Deleting the job leaves the claim in place."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from kubetune import reasons as R
from kubetune.cache_claim import DEFAULT_CLAIM
from tests.support.cache_jobs import apply_job, cache_operator, gets, prepare_namespace, upload_tiny_model, \
    wait_status, wait_terminal
from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import FtjClient
from kubetune_dev.devcluster.process_node import PROCESS_NODE_LABEL
from kubetune_dev.operator_process import install_crds
from tests.trainer.test_storage import LocalS3

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def s3():
    pytest.importorskip("minio")
    server = LocalS3()
    yield server
    server.close()


@pytest.fixture
def storage_class(k8s):
    """A StorageClass with no provisioner and immediate binding: its claims bind only to PersistentVolumes made
    beforehand (the test's own, deleted afterwards)."""
    from kubernetes import client

    storage = client.StorageV1Api(k8s)
    name = f"kt-cache-{uuid.uuid4().hex[:6]}"
    storage.create_storage_class({"metadata": {"name": name}, "provisioner": "kubernetes.io/no-provisioner",
                                  "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"})
    volumes: list[str] = []
    yield name, volumes
    core = client.CoreV1Api(k8s)
    for pv in volumes:
        try:
            core.delete_persistent_volume(pv)
        except client.ApiException:
            pass
    storage.delete_storage_class(name)


def test_the_operator_creates_the_cache_claim_and_the_job_runs_from_it(cluster, k8s, namespace, process_nodes, s3,
                                                                       storage_class, tmp_path):
    from kubernetes import client

    install_crds(cluster.kubectl)
    core, ftj = client.CoreV1Api(k8s), FtjClient(k8s)
    sc_name, volumes = storage_class
    keys = upload_tiny_model(s3, tmp_path)
    data_root = Path(process_nodes[0].config.data_root)
    work = prepare_namespace(k8s, namespace, data_root, s3)
    op = cache_operator(cluster, namespace, tmp_path / "operator.log",
                        ["--cache-storage-class", sc_name, "--cache-size-gib", "2"])
    with op.leading():
        assert core.list_namespaced_persistent_volume_claim(namespace).items[0].metadata.name == work  # only ours
        apply_job(cluster, namespace, "from-a-class", work)
        claim = wait_for(lambda: next((c for c in core.list_namespaced_persistent_volume_claim(namespace).items
                                       if c.metadata.name == DEFAULT_CLAIM), None), 60, "the cache claim")
        assert claim.spec.storage_class_name == sc_name and claim.spec.access_modes == ["ReadWriteMany"]
        assert claim.spec.resources.requests == {"storage": "2Gi"}
        assert claim.metadata.owner_references is None  # the cache outlives the job
        assert claim.metadata.labels == {"app.kubernetes.io/managed-by": "kubetune",
                                         "kubetune.io/component": "model-cache"}

        # no volume for it yet: the job says what it waits for, as a condition and a Warning Event
        waiting = wait_status(ftj, namespace, "from-a-class", lambda st: st.get("reason") == R.CACHE_CLAIM_NOT_BOUND,
                              "waiting for the cache claim", timeout=120)
        assert waiting["phase"] == "Preparing" and f"'{DEFAULT_CLAIM}' is Pending" in waiting["message"], waiting
        validated = next(c for c in waiting["conditions"] if c["type"] == "Validated")
        assert (validated["status"], validated["reason"]) == ("Unknown", R.CACHE_CLAIM_NOT_BOUND)
        events = wait_for(lambda: [e for e in core.list_namespaced_event(namespace).items
                                   if e.reason == R.CACHE_CLAIM_NOT_BOUND], 30, "the Warning Event")
        assert events[0].type == "Warning" and events[0].involved_object.name == "from-a-class"
        assert not [p for p in core.list_namespaced_pod(namespace).items if p.spec.node_name]  # nothing ran

        # an available PersistentVolume of the class: the kube-controller-manager's binder binds the claim to it
        pv = f"{namespace}-{DEFAULT_CLAIM}"
        path = data_root / "pvc" / DEFAULT_CLAIM  # where the process nodes mount the claim
        path.mkdir(parents=True, exist_ok=True)
        core.create_persistent_volume({"metadata": {"name": pv, "labels": {PROCESS_NODE_LABEL: "true"}},
                                       "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteMany"],
                                                "persistentVolumeReclaimPolicy": "Retain",
                                                "storageClassName": sc_name, "hostPath": {"path": str(path)}}})
        volumes.append(pv)
        done = wait_terminal(ftj, namespace, "from-a-class")
        assert done["phase"] == "Succeeded", done
        bound = core.read_namespaced_persistent_volume_claim(DEFAULT_CLAIM, namespace)
        assert bound.status.phase == "Bound" and bound.spec.volume_name == pv
        cache = done["preflight"]["cache"]
        assert cache["volume"] == DEFAULT_CLAIM and cache["filled"] == [cache["model"]], cache
        assert (path / cache["model"] / ".kubetune-entry.json").is_file()
        for key in keys:  # the preflight downloaded each file into the claim; the trainer read them from there
            assert gets(s3, key) == 1, (key, s3.requests)

        ftj.delete(namespace, "from-a-class")
        wait_for(lambda: _gone(ftj, namespace, "from-a-class"), 60, "the FineTuneJob gone")
        wait_for(lambda: not ftj.jobs(namespace), 60, "its Jobs garbage-collected")
        kept = core.read_namespaced_persistent_volume_claim(DEFAULT_CLAIM, namespace)
        assert kept.metadata.uid == claim.metadata.uid and kept.metadata.deletion_timestamp is None
    assert "created PersistentVolumeClaim kubetune-cache" in op.log_text()


def _gone(ftj: FtjClient, namespace: str, name: str) -> bool:
    from kubernetes import client

    try:
        ftj.get(namespace, name)
    except client.ApiException as exc:
        return exc.status == 404
    return False
