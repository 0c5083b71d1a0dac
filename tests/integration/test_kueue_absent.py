"""A FineTuneJob labelled for a Kueue queue on a cluster without Kueue: the operator says so (condition and
Warning Event) instead of leaving the suspended trainer Job waiting in silence."""

from __future__ import annotations

import pytest

from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import ftj_manifest, wait_phase
from tests.support.operator_fixtures import ftj, operator, progress  # noqa: F401 - module-scoped operator

pytestmark = pytest.mark.integration


def test_queue_label_without_kueue_gives_kueue_not_installed(ftj, namespace, cluster):  # noqa: F811
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout
    assert "workloads.kueue.x-k8s.io" not in crds, "this test needs a cluster without Kueue"
    ftj.create(namespace, ftj_manifest("lonely", labels={"kueue.x-k8s.io/queue-name": "team"}))
    st = wait_for(lambda: (lambda s: s if s.get("reason") == "KueueNotInstalled" else None)(
        ftj.status(namespace, "lonely")), 60, "reason KueueNotInstalled")
    assert st["phase"] == "Queued" and "Kueue is not installed" in st["message"], st
    admitted = next(c for c in st["conditions"] if c["type"] == "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "KueueNotInstalled", admitted
    wait_for(lambda: [m for r, m in ftj.events(namespace, "lonely") if r == "KueueNotInstalled"], 30,
             "a KueueNotInstalled Event")
    assert ftj.batch.read_namespaced_job("lonely-trainer", namespace).spec.suspend is True
    # The user removes the label and recreates: it runs without Kueue.
    ftj.delete(namespace, "lonely")
    wait_for(lambda: not ftj.jobs(namespace), 60, "the old trainer Job gone")
    ftj.create(namespace, ftj_manifest("lonely"))
    wait_phase(ftj, namespace, "lonely", "Running", 60)
