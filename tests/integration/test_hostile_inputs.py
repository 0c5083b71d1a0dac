"""Hostile and unlucky inputs against the real control plane. Each case names the input, the rejection or
condition the user must see (from `kubectl get/describe ftj` alone), and checks that nothing was lost,
adopted or duplicated. Add a case here for every bug of this kind.

Cases elsewhere: names too long or with dots (test_crd_validation.py), orphaned children of a deleted job
of the same name (test_lifecycle.py), a missing Secret (tests/e2e, where a process node reports it)."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import FtjClient, ftj_manifest, wait_phase
from tests.support.operator_fixtures import ftj, operator, progress  # noqa: F401 - module-scoped operator

pytestmark = pytest.mark.integration

HOLD = "kubetune.test/hold"


def wait_reason(ftj: FtjClient, ns: str, name: str, reason: str, timeout: float = 30) -> dict:
    last: dict = {}

    def check():
        nonlocal last
        last = ftj.status(ns, name)
        return last if last.get("reason") == reason else None
    return wait_for(check, timeout, lambda: f"{ns}/{name} reason {reason}; last status {json.dumps(last)[:1500]}")


def test_recreated_job_waits_for_old_children_held_by_a_finalizer(ftj, namespace):
    """Input: delete a FineTuneJob whose plan ConfigMap a finalizer holds (slow garbage collection), then
    apply the same name. Expected: the new job says the old ConfigMap is being deleted and waits; it never
    patches it; once the finalizer goes, it creates its own children, owned by its own UID, exactly once."""
    ns = namespace
    ftj.create(ns, ftj_manifest("slowgc"))
    wait_phase(ftj, ns, "slowgc", "Running")
    ftj.core.patch_namespaced_config_map("slowgc-plan", ns, {"metadata": {"finalizers": [HOLD]}})
    old_plan = ftj.core.read_namespaced_config_map("slowgc-plan", ns).data
    ftj.delete(ns, "slowgc")
    wait_for(lambda: ftj.core.read_namespaced_config_map("slowgc-plan", ns).metadata.deletion_timestamp, 90,
             "the old ConfigMap marked for deletion")
    wait_for(lambda: not ftj.jobs(ns) or None, 60, "the old Job garbage-collected")
    ftj.create(ns, ftj_manifest("slowgc", training={"maxSteps": 55}))
    st = wait_reason(ftj, ns, "slowgc", "ChildNotOwned")
    assert "slowgc-plan" in st["message"] and "is being deleted" in st["message"], st["message"]
    assert ftj.core.read_namespaced_config_map("slowgc-plan", ns).data == old_plan  # untouched
    assert not ftj.jobs(ns)  # no Job before its plan exists
    uid = ftj.get(ns, "slowgc")["metadata"]["uid"]
    ftj.core.patch_namespaced_config_map("slowgc-plan", ns, {"metadata": {"finalizers": None}})
    wait_phase(ftj, ns, "slowgc", "Running", timeout=60)
    plan_cm = ftj.core.read_namespaced_config_map("slowgc-plan", ns)
    assert [o.uid for o in plan_cm.metadata.owner_references] == [uid]
    assert json.loads(plan_cm.data["plan.json"])["training"]["maxSteps"] == 55
    jobs = ftj.jobs(ns)
    assert len(jobs) == 1 and [o.uid for o in jobs[0].metadata.owner_references] == [uid]
    mine = ftj.core.list_namespaced_event(ns, field_selector=f"involvedObject.uid={uid}").items
    assert [e.reason for e in mine].count("ChildrenCreated") == 1, [e.reason for e in mine]


def test_a_quota_that_refuses_the_children_is_reported_then_the_job_proceeds(ftj, namespace):
    """Input: a ResourceQuota that allows no ConfigMap in the namespace. Expected: phase Pending with reason
    ChildRejected and the apiserver's own words (403, exceeded quota) in the status and an Event; once the
    quota is lifted the job starts, with one set of children."""
    ns = namespace
    ftj.core.create_namespaced_resource_quota(ns, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-configmaps"), spec=client.V1ResourceQuotaSpec(hard={"count/configmaps": "1"})))
    # kube-root-ca.crt already takes the one ConfigMap the quota allows.
    wait_for(lambda: (ftj.core.read_namespaced_resource_quota("no-configmaps", ns).status.used or {})
             .get("count/configmaps") == "1" or None, 30, "the quota's usage counted")
    ftj.create(ns, ftj_manifest("quota"))
    st = wait_reason(ftj, ns, "quota", "ChildRejected")
    assert "403" in st["message"] and "exceeded quota" in st["message"], st["message"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "exceeded quota" in ready["message"]
    assert any(reason == "ChildRejected" and "exceeded quota" in message for reason, message in ftj.wait_events(ns, "quota", "ChildRejected"))
    assert not ftj.jobs(ns)
    ftj.core.delete_namespaced_resource_quota("no-configmaps", ns)
    wait_phase(ftj, ns, "quota", "Running", timeout=60)
    assert len(ftj.jobs(ns)) == 1


def test_a_terminating_namespace_is_nothing_to_do(ftj, operator, namespace):  # noqa: F811
    """Input: delete the namespace of a running job whose FineTuneJob a finalizer keeps (so the operator keeps
    seeing it while the namespace controller removes its children). Expected: no traceback, exactly one log
    line saying the namespace is being deleted, no child re-created, and the job goes once the finalizer does."""
    ns = namespace
    manifest = ftj_manifest("leaving")
    manifest["metadata"]["finalizers"] = [HOLD]
    ftj.create(ns, manifest)
    wait_phase(ftj, ns, "leaving", "Running")
    before = len(operator.log_text())
    ftj.core.delete_namespace(ns)
    wait_for(lambda: not ftj.jobs(ns) or None, 60, "the namespace controller removed the trainer Job")
    time.sleep(5)  # five resyncs of the job (1 s each) in the terminating namespace
    log = operator.log_text()[before:]
    mine = [line for line in log.splitlines() if ns in line]
    assert "Traceback" not in log, log[-3000:]
    assert len([line for line in mine if "is being deleted" in line]) == 1, mine
    assert not [line for line in mine if "could not post event" in line], mine  # a 403 the namespace explains
    assert not ftj.jobs(ns) and not [cm for cm in ftj.core.list_namespaced_config_map(ns).items
                                      if cm.metadata.name == "leaving-plan"]
    ftj.objects.patch_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", "leaving",
                                               {"metadata": {"finalizers": None}})
    wait_for(lambda: ftj.core.list_namespace(field_selector=f"metadata.name={ns}").items == [] or None, 90,
             f"namespace {ns} deleted")
