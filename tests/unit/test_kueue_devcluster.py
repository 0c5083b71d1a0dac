"""The devcluster's Kueue wiring that needs no cluster: webhooks called on loopback, conversion for the
multi-version CRDs, and the manager's Configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_dev.devcluster.kueue import conversion_patched, loopback_webhooks, manager_config

pytestmark = pytest.mark.unit


def _hook(name: str, group: str, path: str) -> dict:
    return {"name": name, "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "sideEffects": "None",
            "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
            "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["x"]}]}


def test_webhooks_call_loopback_for_kueue_kinds_and_jobs_only() -> None:
    manifests = [{"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                  "metadata": {"name": "mutating-webhook-configuration"},
                  "webhooks": [_hook("mjob.kb.io", "batch", "/mutate-batch-v1-job"),
                               _hook("mpod.kb.io", "", "/mutate--v1-pod"),
                               _hook("mrayjob.kb.io", "ray.io", "/mutate-ray-io-v1-rayjob"),
                               _hook("mworkload.kb.io", "kueue.x-k8s.io", "/mutate-kueue-x-k8s-io-v1beta2-workload")]}]
    [out] = loopback_webhooks(manifests, "https://127.0.0.1:9443", "Q0E=")
    assert out["metadata"]["name"] == "kubetune-dev-kueue-mutating"
    assert [h["name"] for h in out["webhooks"]] == ["mjob.kb.io", "mworkload.kb.io"]
    assert out["webhooks"][0]["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-batch-v1-job",
                                                  "caBundle": "Q0E="}


def test_conversion_webhook_only_for_crds_with_several_versions() -> None:
    one = {"spec": {"versions": [{"name": "v1beta2"}]}}
    two = {"spec": {"versions": [{"name": "v1beta1"}, {"name": "v1beta2"}]}}
    assert conversion_patched(one, "https://127.0.0.1:1/convert", "Q0E=") == one
    conv = conversion_patched(two, "https://127.0.0.1:1/convert", "Q0E=")["spec"]["conversion"]
    assert conv["strategy"] == "Webhook" and conv["webhook"]["clientConfig"]["url"].endswith("/convert")
    assert "conversion" not in two["spec"]


def test_manager_config_uses_our_certificates_and_only_batch_jobs() -> None:
    cfg = manager_config(webhook_port=9443, health_port=8081, cert_dir=Path("/certs"))
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["webhook"] == {"port": 9443, "host": "127.0.0.1", "certDir": "/certs"}
    assert cfg["integrations"]["frameworks"] == ["batch/job"]
    assert cfg["leaderElection"] == {"leaderElect": False}
