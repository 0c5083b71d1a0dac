"""The operator's cluster writes reuse pooled connections (real apiserver).

Raw (`_preload_content=False`) responses that were never read kept their connections out of the pool, so
every create, patch and Event opened a new TLS connection: a third of the operator's CPU in a burst of
1,000 FineTuneJobs, and a handshake for the apiserver each time."""

from __future__ import annotations

import pytest
import urllib3.connectionpool

from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children
from kubetune.children import ChildClient, NotOwned
from kubetune.sizing.layout import layout_from_resources

pytestmark = pytest.mark.integration

SPEC = {
    "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": "lora",
    "resources": {"gpuType": "NVIDIA-L4", "gpusPerPod": 1, "pods": 2},  # two pods: a Service as well
    "output": {"uri": "s3://out/run"},
}


@pytest.fixture
def new_connections(monkeypatch):
    opened: list[str] = []
    original = urllib3.connectionpool.HTTPSConnectionPool._new_conn

    def counting(self):  # noqa: ANN001, ANN202 - urllib3's signature
        opened.append(self.host)
        return original(self)

    monkeypatch.setattr(urllib3.connectionpool.HTTPSConnectionPool, "_new_conn", counting)
    return opened


def test_creates_patches_deletes_and_events_reuse_one_connection(cluster, namespace, new_connections):
    api = cluster.api_client()
    try:
        children = ChildClient(api)
        spec = parse_spec(SPEC)
        for i in range(4):
            name = f"pool-{i}"
            objs = build_children(JobRef(name, namespace, f"00000000-0000-0000-0000-00000000000{i}"), SPEC, spec,
                                  layout_from_resources(spec), BuildConfig())
            assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
            for obj in objs:
                obj["metadata"].pop("ownerReferences", None)  # no FineTuneJob behind them here
                result, created = children.apply(obj)
                assert result == "created"
                assert (created is not None) == (obj["kind"] == "Job")
            assert children.apply(objs[0]) == ("updated", None)  # ConfigMap again: patched
            assert children.apply(objs[1]) == ("exists", None)  # Service again: kept
            result, existing = children.apply(objs[-1])  # Job again: kept, and returned
            assert result == "exists" and existing["metadata"]["uid"]
            children.set_job_suspend(namespace, name, True)
            assert children.read_job(namespace, name)["spec"]["suspend"] is True
            assert children.other_children_exist(namespace, name)
            children.delete_children(namespace, name)
        assert len(new_connections) <= 1, f"{len(new_connections)} connections opened for 4 x 11 requests"
    finally:
        api.close()


def test_a_child_name_held_by_an_orphan_is_never_adopted_or_patched(cluster, namespace):
    """An object with our child's name that this FineTuneJob does not control (an orphan left by
    `kubectl delete --cascade=orphan`, or a child of a deleted FineTuneJob of the same name) is reported,
    not patched."""
    api = cluster.api_client()
    try:
        children = ChildClient(api)
        spec = parse_spec(SPEC)
        objs = build_children(JobRef("taken", namespace, "00000000-0000-0000-0000-0000000000aa"), SPEC, spec,
                              layout_from_resources(spec), BuildConfig())
        orphan = {**objs[0], "metadata": {k: v for k, v in objs[0]["metadata"].items() if k != "ownerReferences"},
                  "data": {"plan.json": "{\"the\": \"old plan\"}"}}
        assert children.apply(orphan)[0] == "created"
        with pytest.raises(NotOwned) as raised:
            children.apply(objs[0])  # the FineTuneJob's ConfigMap, with its ownerReference
        assert raised.value.kind == "ConfigMap" and raised.value.name == orphan["metadata"]["name"]
        kept = children.core.read_namespaced_config_map(orphan["metadata"]["name"], namespace)
        assert kept.data == orphan["data"]  # untouched
        children.delete_children(namespace, "taken")
    finally:
        api.close()
