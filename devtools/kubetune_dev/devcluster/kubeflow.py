"""Kubeflow Trainer v2 and JobSet controller managers as local processes against a running devcluster `Cluster`.

    from kubetune_dev.devcluster.kubeflow import start_kubeflow
    peer = start_kubeflow(cluster)    # builds them first when the pins changed (devcluster/build-kubeflow.sh)
    ...
    peer.stop()                       # also stopped with the cluster

What `start` does:
- installs the JobSet and Trainer CRDs as shipped in the pinned modules (server-side apply);
- JobSet: writes a serving certificate for 127.0.0.1 signed by the cluster CA and a JobSet `Configuration` with
  internal certificate management off, webhooks on 127.0.0.1:<free port> reading that certificate, no leader
  election and no metrics listener;
- Trainer: v2.0.0 always runs its certificate rotator (no flag turns it off). The rotator keeps an existing
  Secret whose CA is valid for its CA name and whose server certificate is valid for its Service DNS name, so we
  create that Secret first with our own CA and a server certificate that is also valid for 127.0.0.1; the
  rotator then finds nothing to rotate and only re-injects the same CA. Its webhook server reads the certificate
  from $TMPDIR/k8s-webhook-server/serving-certs (TMPDIR is the manager's own work directory); the rotator's
  "certificate mounted" check looks at the fixed /tmp path, which we fill when it is empty (and empty again on
  stop);
- registers both managers' webhooks (JobSet's pod webhooks only for JobSet pods, as its kustomization patches
  them) with `url: https://127.0.0.1:<port>/<path>` and the matching caBundle;
- starts both managers (own process groups, stopped with the cluster) and waits until both are ready and the
  apiserver reaches their webhooks.

`stop` stops the managers and removes the webhook configurations (and the CRDs when asked), so no webhook points
at a stopped server.
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

BUILD_SCRIPT = REPO_ROOT / "devcluster" / "build-kubeflow.sh"
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
TRAINER_NAME, JOBSET_NAME = "trainer-controller-manager", "jobset-controller-manager"

# What Trainer v2.0.0's rotator expects (pkg/util/cert): its namespace when not in a pod, Secret, CA name,
# Service name (-> DNS name of the serving certificate) and the validating webhook configuration it injects.
TRAINER_NAMESPACE = "kubeflow-system"
TRAINER_SECRET = "kubeflow-trainer-webhook-cert"
TRAINER_CA_NAME = "kubeflow-trainer-ca"
TRAINER_SERVICE_DNS = f"kubeflow-trainer-controller-manager.{TRAINER_NAMESPACE}.svc"
TRAINER_WEBHOOK_CONFIG = "validator.trainer.kubeflow.org"
ROTATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
JOBSET_WEBHOOK_CONFIGS = {"MutatingWebhookConfiguration": "jobset-mutating-webhook-configuration",
                          "ValidatingWebhookConfiguration": "jobset-validating-webhook-configuration"}


class KubeflowBuildError(RuntimeError):
    """devcluster/build-kubeflow.sh failed."""


def build_kubeflow() -> Path:
    """Run devcluster/build-kubeflow.sh (reuses a complete build) and return the directory it prints.
    Raises FileNotFoundError without `go`, KubeflowBuildError with the script's output when it fails."""
    if shutil.which("go") is None:
        raise FileNotFoundError("go is not installed: Kubeflow Trainer and JobSet are built from their pinned Go "
                                "modules (devcluster/kubeflow/go.mod)")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise KubeflowBuildError(f"{BUILD_SCRIPT} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ pure renderers

def loopback_webhook_configs(manifests: list[dict[str, Any]], base_url: str, ca_bundle: str,
                             names: dict[str, str], pod_selector_label: str | None = None) -> list[dict[str, Any]]:
    """Webhook configurations as shipped, each webhook calling `base_url + path` instead of a Service, named by
    kind from `names`. With pod_selector_label, webhooks on pods only see pods carrying that label."""
    out = []
    for doc in manifests:
        kind = doc.get("kind")
        if kind not in names:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            hook = copy.deepcopy(hook)
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": base_url + path, "caBundle": ca_bundle}
            on_pods = any("pods" in (rule.get("resources") or []) for rule in hook.get("rules") or [])
            if on_pods and pod_selector_label:
                hook["objectSelector"] = {"matchExpressions": [{"key": pod_selector_label, "operator": "Exists"}]}
            hooks.append(hook)
        out.append({"apiVersion": doc["apiVersion"], "kind": kind, "metadata": {"name": names[kind]},
                    "webhooks": hooks})
    return out


def jobset_config(*, webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """JobSet's Configuration for a local manager: loopback webhooks with our certificate."""
    return {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
    }


def probe_jobset(namespace: str) -> dict[str, Any]:
    """A minimal JobSet, for a server dry-run that goes through JobSet's webhooks."""
    pod = {"restartPolicy": "Never", "containers": [{"name": "probe", "image": "registry.k8s.io/pause:3.10"}]}
    return {"apiVersion": f"{JOBSET_GROUP}/{JOBSET_VERSION}", "kind": "JobSet",
            "metadata": {"name": "webhook-probe", "namespace": namespace},
            "spec": {"replicatedJobs": [{"name": "probe", "template": {"spec": {"template": {"spec": pod}}}}]}}


def rotator_secret(files: dict[str, bytes]) -> dict[str, Any]:
    """The Trainer's webhook Secret holding our CA and serving certificate (keys as its rotator reads them)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": TRAINER_SECRET, "namespace": TRAINER_NAMESPACE},
            "data": {k: base64.b64encode(v).decode() for k, v in files.items()}}


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def generate_rotator_certs(d: Path, days: int = 365) -> dict[str, bytes]:
    """A CA the Trainer's rotator accepts (RSA key in PKCS#1, valid for the DNS name TRAINER_CA_NAME, beyond the
    rotator's 90-day look-ahead) and a serving certificate it signs, valid for TRAINER_SERVICE_DNS and
    127.0.0.1. Returns the Secret's files: ca.crt, ca.key, tls.crt, tls.key."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-traditional", "-out", "ca.key", "2048", cwd=d)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", f"/O=kubeflow-trainer/CN={TRAINER_CA_NAME}",
             "-days", str(days), "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
             "-addext", f"subjectAltName=DNS:{TRAINER_CA_NAME}", "-out", "ca.crt", cwd=d)
    _openssl("genrsa", "-traditional", "-out", "tls.key", "2048", cwd=d)
    _openssl("req", "-new", "-key", "tls.key", "-subj", f"/CN={TRAINER_SERVICE_DNS}", "-out", "tls.csr", cwd=d)
    (d / "tls.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                               f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{TRAINER_SERVICE_DNS},IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", str(days), "-sha256", "-extfile", "tls.ext", "-out", "tls.crt", cwd=d)
    return {name: (d / name).read_bytes() for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")}


# ------------------------------------------------------------------------------------------ the managers

@dataclass
class Kubeflow:
    """The Kubeflow Trainer and JobSet controller managers serving one devcluster."""

    cluster: Cluster
    build_dir: Path
    remove_crds_on_stop: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _started: bool = False
    _placed_rotator_cert: bool = False

    @property
    def work_dir(self) -> Path:
        return self.cluster._dir / "kubeflow"

    def log_path(self, name: str) -> Path:
        """Where a manager's log goes (TRAINER_NAME or JOBSET_NAME)."""
        return self.cluster.logs_dir / f"{name}.log"

    @property
    def pids(self) -> dict[str, int]:
        """Manager name -> pid."""
        return {name: self.cluster.procs.get(name).pid for name in (TRAINER_NAME, JOBSET_NAME)}

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        text = "\n---\n".join(json.dumps(d) for d in docs)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-dev",
                             "-f", "-", input=text, timeout=180)

    def _crds(self) -> list[dict[str, Any]]:
        return [yaml.safe_load(p.read_text()) for p in sorted((self.build_dir / "crds").glob("*/*.yaml"))]

    def start(self, timeout: float = 180.0) -> "Kubeflow":
        """Install the CRDs, register the webhooks, start both managers; stops what it started on failure."""
        t0 = time.monotonic()
        assert self.cluster.pki is not None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {"jobset-webhook": free_port(), "jobset-health": free_port(),
                      "trainer-webhook": free_port(), "trainer-health": free_port()}
        self._started = True
        try:
            crds = self._crds()
            self._apply(crds)
            self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                                 *[f"crd/{c['metadata']['name']}" for c in crds], timeout=90)
            self._start_jobset()
            self._start_trainer()
            for name in (JOBSET_NAME, TRAINER_NAME):
                port = self.ports[f"{name.split('-')[0]}-health"]
                self.cluster._wait(f"{name} ready", lambda p=port: _http_ok(f"http://127.0.0.1:{p}/readyz"), timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 2)
        return self

    def _start_jobset(self) -> None:
        cert_dir = self.work_dir / "jobset-certs"
        cert_dir.mkdir(exist_ok=True)
        crt, key = generate_loopback_serving_cert(self.cluster.pki, "jobset-webhook")
        shutil.copy(crt, cert_dir / "tls.crt")
        shutil.copy(key, cert_dir / "tls.key")
        ca = base64.b64encode(self.cluster.pki.ca_crt.read_bytes()).decode()
        manifests = list(yaml.safe_load_all((self.build_dir / "webhooks" / "jobset.yaml").read_text()))
        self._apply(loopback_webhook_configs(manifests, f"https://127.0.0.1:{self.ports['jobset-webhook']}", ca,
                                             JOBSET_WEBHOOK_CONFIGS, pod_selector_label=JOBSET_NAME_LABEL))
        config = self.work_dir / "jobset-config.yaml"
        config.write_text(json.dumps(jobset_config(webhook_port=self.ports["jobset-webhook"],
                                                   health_port=self.ports["jobset-health"], cert_dir=cert_dir)))
        env = {"KUBECONFIG": str(self.cluster.kubeconfig), "PATH": "/usr/bin:/bin"}
        self.cluster.procs.start(JOBSET_NAME, [str(self.build_dir / JOBSET_NAME), f"--config={config}",
                                               "--zap-devel=false"], self.log_path(JOBSET_NAME), env=env)

    def _start_trainer(self) -> None:
        files = generate_rotator_certs(self.work_dir / "trainer-pki")
        self.cluster.kubectl("create", "namespace", TRAINER_NAMESPACE, check=False)
        self._apply([rotator_secret(files)])
        tmp = self.work_dir / "trainer-tmp"
        serving = tmp / "k8s-webhook-server" / "serving-certs"
        serving.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            (serving / name).write_bytes(files[name])
        if not (ROTATOR_CERT_DIR / "tls.crt").exists():
            ROTATOR_CERT_DIR.mkdir(parents=True, exist_ok=True)
            (ROTATOR_CERT_DIR / "tls.crt").write_bytes(files["tls.crt"])
            self._placed_rotator_cert = True
        ca = base64.b64encode(files["ca.crt"]).decode()
        manifests = list(yaml.safe_load_all((self.build_dir / "webhooks" / "trainer.yaml").read_text()))
        self._apply(loopback_webhook_configs(manifests, f"https://127.0.0.1:{self.ports['trainer-webhook']}", ca,
                                             {"ValidatingWebhookConfiguration": TRAINER_WEBHOOK_CONFIG}))
        env = {"KUBECONFIG": str(self.cluster.kubeconfig), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp)}
        self.cluster.procs.start(TRAINER_NAME, [
            str(self.build_dir / TRAINER_NAME), f"--webhook-server-port={self.ports['trainer-webhook']}",
            f"--health-probe-bind-address=127.0.0.1:{self.ports['trainer-health']}", "--metrics-bind-address=0",
        ], self.log_path(TRAINER_NAME), env=env)

    def wait_webhooks(self, namespace: str, timeout: float = 60.0) -> None:
        """Until the apiserver reaches JobSet's webhooks: a server dry-run create of a JobSet in `namespace`
        passes its defaulting and validating webhooks (the Trainer's own is reached by creating a runtime)."""
        text = json.dumps(probe_jobset(namespace))

        def ok() -> bool:
            return self.cluster.kubectl("create", "--dry-run=server", "-f", "-", input=text,
                                        check=False).returncode == 0
        self.cluster._wait("JobSet webhooks reachable from the apiserver", ok, timeout)

    def log_error_lines(self) -> dict[str, list[str]]:
        """Error-level lines of each manager's log (zap JSON or console encoding)."""
        out = {}
        for name in (TRAINER_NAME, JOBSET_NAME):
            try:
                text = self.log_path(name).read_text(errors="replace")
            except OSError:
                text = ""
            out[name] = [line for line in text.splitlines() if '"level":"error"' in line or "\tERROR\t" in line]
        return out

    def stop(self) -> None:
        """Stop both managers; remove their webhook configurations (and the CRDs when asked)."""
        if not self._started:
            return
        self._started = False
        for name in (TRAINER_NAME, JOBSET_NAME):
            try:
                self.cluster.procs.stop_child(name)
            except KeyError:
                pass
        if self._placed_rotator_cert:
            (ROTATOR_CERT_DIR / "tls.crt").unlink(missing_ok=True)
            for d in (ROTATOR_CERT_DIR, ROTATOR_CERT_DIR.parent):
                try:
                    d.rmdir()  # only when empty: another manager's certificates stay
                except OSError:
                    break
            self._placed_rotator_cert = False
        if self.cluster._stopped:
            return
        self.cluster.kubectl("delete", "validatingwebhookconfiguration", TRAINER_WEBHOOK_CONFIG,
                             *JOBSET_WEBHOOK_CONFIGS.values(), "--ignore-not-found", check=False)
        self.cluster.kubectl("delete", "mutatingwebhookconfiguration",
                             JOBSET_WEBHOOK_CONFIGS["MutatingWebhookConfiguration"], "--ignore-not-found", check=False)
        if self.remove_crds_on_stop:
            self.cluster.kubectl("delete", "crd", *[c["metadata"]["name"] for c in self._crds()],
                                 "--ignore-not-found", "--wait=false", check=False, timeout=180)


def start_kubeflow(cluster: Cluster, build_dir: Path | None = None, **kwargs: Any) -> Kubeflow:
    """Build (when needed) and start the Kubeflow Trainer and JobSet managers for this cluster."""
    return Kubeflow(cluster, build_dir or build_kubeflow(), **kwargs).start()
