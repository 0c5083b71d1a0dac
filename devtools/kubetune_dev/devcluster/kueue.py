"""Kueue's controller manager as a local process against a running devcluster `Cluster`.

    from kubetune_dev.devcluster.kueue import start_kueue
    kueue = start_kueue(cluster)      # builds it first when the pins changed (devcluster/build-kueue.sh)
    ...
    kueue.stop()                      # also stopped with the cluster

What `start` does:
- installs Kueue's CRDs as shipped in the pinned module (server-side apply), with the conversion webhook of
  the multi-version CRDs pointed at the local webhook server;
- writes a serving certificate for 127.0.0.1 signed by the cluster CA and a Kueue `Configuration` with
  internal certificate management off, webhooks on 127.0.0.1:<free port> reading that certificate, no
  leader election, no metrics listener and only the batch/job integration;
- starts the manager (its own process group, stopped with the cluster) and waits until it is ready;
- registers Kueue's mutating and validating webhooks for Kueue's own kinds and batch Jobs with
  `url: https://127.0.0.1:<port>/<path>` and the cluster CA as caBundle.

`stop` stops the manager and removes the webhook configurations, then (by default) the CRDs, so the
cluster is left as it was: no webhook that points at a stopped server, no Kueue API.
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .certs import generate_loopback_serving_cert
from .cluster import Cluster, _http_ok, free_port
from .fleet import REPO_ROOT

BUILD_SCRIPT = REPO_ROOT / "devcluster" / "build-kueue.sh"
API_GROUP = "kueue.x-k8s.io"
NAMESPACE = "kueue-system"
WEBHOOK_CONFIG_NAMES = {"MutatingWebhookConfiguration": "kubetune-dev-kueue-mutating",
                        "ValidatingWebhookConfiguration": "kubetune-dev-kueue-validating"}
# The API groups whose webhooks are registered: Kueue's own kinds and the one integration that runs (Jobs).
# Webhooks of integrations that are off are left out: the manager does not serve them.
WEBHOOK_GROUPS = {API_GROUP, "batch"}
# With its internal certificate management off, Kueue v0.17 loads a metrics serving certificate from this fixed
# path at start and exits when there is none, even with its metrics listener off (as here).
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


class KueueBuildError(RuntimeError):
    """devcluster/build-kueue.sh failed."""


def build_kueue() -> Path:
    """Run devcluster/build-kueue.sh (reuses a complete build) and return the directory it prints: the
    `kueue` binary, `crds/` and `webhook.yaml`. Raises KueueBuildError with the script's output when it fails."""
    if shutil.which("go") is None:
        raise FileNotFoundError("go is not installed: Kueue is built from its pinned Go module "
                                "(devcluster/kueue/go.mod)")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise KueueBuildError(f"{BUILD_SCRIPT} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def conversion_patched(crd: dict[str, Any], url: str, ca_bundle: str) -> dict[str, Any]:
    """The CRD with a conversion webhook at `url` when it serves more than one version (as Kueue's
    kustomization patches them), unchanged otherwise."""
    if len((crd.get("spec") or {}).get("versions") or []) < 2:
        return crd
    out = copy.deepcopy(crd)
    out["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
        "clientConfig": {"url": url, "caBundle": ca_bundle}, "conversionReviewVersions": ["v1"]}}
    return out


def loopback_webhooks(manifests: list[dict[str, Any]], base_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations with each webhook calling `base_url + path` (instead of a Service),
    keeping only the webhooks for WEBHOOK_GROUPS, under our own configuration names."""
    out = []
    for doc in manifests:
        kind = doc.get("kind")
        if kind not in WEBHOOK_CONFIG_NAMES:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            hook = copy.deepcopy(hook)
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": base_url + path, "caBundle": ca_bundle}
            hooks.append(hook)
        out.append({"apiVersion": doc["apiVersion"], "kind": kind,
                    "metadata": {"name": WEBHOOK_CONFIG_NAMES[kind]}, "webhooks": hooks})
    return out


def manager_config(*, webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration for a local manager: loopback webhooks with our certificate, batch Jobs only."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
    }


def ensure_metrics_cert(crt: Path, key: Path, directory: Path = METRICS_CERT_DIR) -> None:
    """Put a certificate where Kueue insists on loading its metrics certificate (kept when one is there: the
    metrics listener is off, so it only has to load)."""
    if (directory / "tls.crt").is_file() and (directory / "tls.key").is_file():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(crt, directory / "tls.crt")
        shutil.copy(key, directory / "tls.key")
    except OSError as exc:
        raise RuntimeError(f"Kueue v0.17 needs a certificate in {directory} (tls.crt, tls.key) to start; "
                           f"could not write one ({exc}): create it once with any certificate") from exc


@dataclass
class Kueue:
    """A Kueue controller manager serving one devcluster."""

    cluster: Cluster
    build_dir: Path
    remove_crds_on_stop: bool = True
    ports: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _started: bool = False

    @property
    def work_dir(self) -> Path:
        return self.cluster._dir / "kueue"

    @property
    def log_path(self) -> Path:
        return self.cluster.logs_dir / "kueue.log"

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['webhook']}"

    def _ca_bundle(self) -> str:
        assert self.cluster.pki is not None
        return base64.b64encode(self.cluster.pki.ca_crt.read_bytes()).decode()

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        text = "\n---\n".join(json.dumps(d) for d in docs)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-dev",
                             "-f", "-", input=text, timeout=180)

    def start(self, timeout: float = 120.0) -> "Kueue":
        """Install the CRDs, start the manager, register its webhooks; stops what it started on failure."""
        t0 = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {"webhook": free_port(), "health": free_port()}
        ca = self._ca_bundle()
        assert self.cluster.pki is not None
        crt, key = generate_loopback_serving_cert(self.cluster.pki, "kueue-webhook")
        cert_dir = self.work_dir / "certs"
        cert_dir.mkdir(exist_ok=True)
        shutil.copy(crt, cert_dir / "tls.crt")
        shutil.copy(key, cert_dir / "tls.key")
        ensure_metrics_cert(crt, key)
        self._started = True
        try:
            crds = [yaml.safe_load(p.read_text()) for p in sorted((self.build_dir / "crds").glob("*.yaml"))]
            self._apply([conversion_patched(c, self.webhook_url + "/convert", ca) for c in crds])
            self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                                 *[f"crd/{c['metadata']['name']}" for c in crds], timeout=90)
            self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
            config = self.work_dir / "config.yaml"
            config.write_text(json.dumps(manager_config(webhook_port=self.ports["webhook"],
                                                        health_port=self.ports["health"], cert_dir=cert_dir)))
            env = {"KUBECONFIG": str(self.cluster.kubeconfig), "PATH": "/usr/bin:/bin"}
            self.cluster.procs.start("kueue", [
                str(self.build_dir / "kueue"), f"--config={config}", "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=2",
            ], self.log_path, env=env)
            self.cluster._wait("kueue ready", lambda: _http_ok(f"http://127.0.0.1:{self.ports['health']}/readyz"),
                               timeout)
            manifests = list(yaml.safe_load_all((self.build_dir / "webhook.yaml").read_text()))
            self._apply(loopback_webhooks(manifests, self.webhook_url, ca))
            self._wait_webhooks_serving(timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _wait_webhooks_serving(self, timeout: float) -> None:
        """Until the apiserver reaches the webhooks: a dry-run ResourceFlavor create passes Kueue's webhook."""
        flavor = json.dumps({"apiVersion": f"{API_GROUP}/v1beta2", "kind": "ResourceFlavor",
                             "metadata": {"name": "kubetune-dev-webhook-probe"}})

        def ok() -> bool:
            r = self.cluster.kubectl("create", "--dry-run=server", "-f", "-", input=flavor, check=False)
            return r.returncode == 0
        self.cluster._wait("kueue webhooks reachable from the apiserver", ok, timeout)

    def stop(self) -> None:
        """Stop the manager; remove its webhook configurations (and the CRDs unless told to keep them)."""
        if not self._started:
            return
        self._started = False
        try:
            self.cluster.procs.stop_child("kueue")
        except KeyError:
            pass
        if self.cluster._stopped:
            return
        for kind, name in WEBHOOK_CONFIG_NAMES.items():
            self.cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
        if self.remove_crds_on_stop:
            crds = [yaml.safe_load(p.read_text()) for p in sorted((self.build_dir / "crds").glob("*.yaml"))]
            names = [c["metadata"]["name"] for c in crds]
            self._drop_conversion([c["metadata"]["name"] for c in crds if len(c["spec"]["versions"]) > 1])
            self._drop_finalizers(names)
            self.cluster.kubectl("delete", "crd", *names, "--ignore-not-found", "--wait=true", check=False,
                                 timeout=180)

    def _drop_conversion(self, crd_names: list[str]) -> None:
        """The conversion webhook is gone with the manager: convert nothing, so deleting does not call it."""
        from kubernetes import client

        with self.cluster.api_client() as api:
            ext = client.ApiextensionsV1Api(api)
            for name in crd_names:
                try:
                    ext.patch_custom_resource_definition(
                        name, {"spec": {"conversion": {"strategy": "None", "webhook": None}}})
                except client.ApiException:
                    pass

    def _drop_finalizers(self, crd_names: list[str]) -> None:
        """Remove Kueue's finalizers from its objects (the manager that would remove them is stopped), so
        deleting the CRDs does not wait forever."""
        from kubernetes import client

        with self.cluster.api_client() as api:
            objects = client.CustomObjectsApi(api)
            for crd in crd_names:
                plural = crd.split(".", 1)[0]
                for version in ("v1beta2", "v1beta1"):
                    try:
                        items = objects.list_cluster_custom_object(API_GROUP, version, plural)["items"]
                        break
                    except client.ApiException:
                        items = []
                for obj in items:
                    meta = obj["metadata"]
                    if not meta.get("finalizers"):
                        continue
                    patch = {"metadata": {"finalizers": None}}
                    try:
                        if meta.get("namespace"):
                            objects.patch_namespaced_custom_object(API_GROUP, version, meta["namespace"], plural,
                                                                   meta["name"], patch)
                        else:
                            objects.patch_cluster_custom_object(API_GROUP, version, plural, meta["name"], patch)
                    except client.ApiException:
                        pass


def start_kueue(cluster: Cluster, build_dir: Path | None = None, **kwargs: Any) -> Kueue:
    """Build (when needed) and start Kueue for this cluster."""
    return Kueue(cluster, build_dir or build_kueue(), **kwargs).start()
