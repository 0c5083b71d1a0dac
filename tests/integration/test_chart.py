"""The Helm chart against the real local control plane: server-side dry-run of rendered manifests,
helm install/upgrade/uninstall, and the chart's ServiceAccount running the real operator (its RBAC
is sufficient) while `kubectl auth can-i` shows it is not excessive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from kubetune_dev.devcluster.binaries import helm_binary
from tests.support.cluster_helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
MONITORING_CRDS = ROOT / "tests" / "data" / "prometheus-operator-crds"




HELM = helm_binary()
if HELM is None:
    pytest.skip("helm not found (devcluster/build.sh builds it into ~/.cache/kubetune/bin/current)",
                allow_module_level=True)


# ----------------------------------------------------------------------------- helpers
class Helm:
    """helm bound to the test cluster's kubeconfig, with its caches in a temporary directory."""

    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        self.home = home

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([HELM, *args], capture_output=True, text=True, env=self.env, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def values_file(self, values: dict[str, Any]) -> str:
        path = self.home / f"values-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    def template(self, release: str, namespace: str, values: dict[str, Any]) -> str:
        return self("template", release, str(CHART), "-n", namespace, "--include-crds",
                    "--kube-version", "1.33.13", "-f", self.values_file(values)).stdout


def crd_names(directory: Path) -> list[str]:
    """The names of the CustomResourceDefinitions in a directory of manifests."""
    return [d["metadata"]["name"] for p in sorted(directory.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if d and d.get("kind") == "CustomResourceDefinition"]


def make_namespace(cluster: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    return name


def delete_namespaces(cluster: Any, names: list[str]) -> None:
    for name in names:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def sa_kubeconfig(cluster: Any, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a TokenRequest token of ServiceAccount namespace/sa."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(Path(cluster.kubeconfig).read_text())
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "sa",
           "clusters": admin["clusters"],
           "users": [{"name": sa, "user": {"token": token}}],
           "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": sa,
                                                   "namespace": namespace}}]}
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


def can_i(cluster: Any, kubeconfig: Path, *args: str) -> bool:
    """`kubectl auth can-i ARGS` as the identity in kubeconfig."""
    result = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "auth", "can-i", *args],
                            capture_output=True, text=True, timeout=30)
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, f"kubectl auth can-i {' '.join(args)}: {result.stdout}{result.stderr}"
    return answer == "yes"


def free_port() -> int:
    from kubetune_dev.devcluster.cluster import free_port as fp

    return fp()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def crds(cluster: Any) -> None:
    """kubetune's CRDs (crds/) and the minimal Prometheus Operator CRDs, established."""
    for directory in (ROOT / "crds", MONITORING_CRDS):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(directory))
    names = crd_names(ROOT / "crds") + crd_names(MONITORING_CRDS)
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s", *[f"crd/{n}" for n in names],
                    timeout=70)
    for plural in ("finetunejobs.kubetune.io", "servicemonitors.monitoring.coreos.com"):
        wait_for(lambda: cluster.kubectl("get", plural, "-A", check=False).returncode == 0, 30,
                 f"{plural} served")


@pytest.fixture(scope="module")
def helm(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(Path(cluster.kubeconfig), tmp_path_factory.mktemp("helm"))


@pytest.fixture
def watch_namespaces(cluster: Any) -> Iterator[list[str]]:
    names = [make_namespace(cluster, "watched"), make_namespace(cluster, "watched")]
    yield names
    delete_namespaces(cluster, names)


# ----------------------------------------------------------------------------- dry-run
CASES = {
    "defaults": {},
    "namespaced-monitoring": {"watchNamespaces": "WATCHED",
                              "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                                             "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}},
    "ha-namespaced": {"replicaCount": 2, "watchNamespaces": "WATCHED"},
    "ha-cluster-wide": {"replicaCount": 2, "monitoring": {"prometheusRule": {"enabled": True}},
                        "trainer": {"image": {"repository": "r.example/kt/trainer", "digest": "sha256:" + "e" * 64},
                                    "imagePullSecrets": [{"name": "regcred"}],
                                    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
                                    "gpuNodeSelector": {"pool": "gpu"}}},
    "namespaced-cache-storage-class": {"watchNamespaces": "WATCHED",
                                       "trainer": {"cache": {"storageClass": "nfs-rwx", "sizeGi": 500}}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_chart_passes_server_side_dry_run(case, cluster, crds, helm, namespace, watch_namespaces):
    values = json.loads(json.dumps(CASES[case]).replace('"WATCHED"', json.dumps(watch_namespaces)))
    release = f"dry-{case}"[:20]
    manifest = helm.template(release, namespace, values)
    objects = [d for d in yaml.safe_load_all(manifest) if d]
    # Every namespaced object names its namespace (the release's or a watched one).
    assert all(o["metadata"].get("namespace") for o in objects
               if o["kind"] not in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                                    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"})
    result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts",
                             "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objects), result.stdout
    kinds = {o["kind"] for o in objects}
    if case == "namespaced-monitoring":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    if case.startswith("ha"):
        # High availability is the leader-election Lease alone: its Role, and nothing of kopf peering.
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        assert "--leader-election" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert ("Role", f"{release}-kubetune-leader-election") in {(o["kind"], o["metadata"]["name"]) for o in objects}
        assert not [o for o in objects if o["apiVersion"].startswith("kopf.dev/")
                    or any("kopf.dev" in r["apiGroups"] for r in o.get("rules") or [])]
        # and a PodDisruptionBudget over the operator pods (validated by the same dry-run).
        pdb = next(o for o in objects if o["kind"] == "PodDisruptionBudget")
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_server_side_dry_run_really_validates(cluster, crds, helm, namespace):
    """Control: the same dry-run rejects a Deployment the apiserver finds invalid."""
    objects = [d for d in yaml.safe_load_all(helm.template("dry-bad", namespace, {})) if d]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["name"] = "Not_A_DNS_Label"
    result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-",
                             input=yaml.safe_dump(deployment), check=False)
    assert result.returncode != 0 and "Not_A_DNS_Label" in result.stderr


# ----------------------------------------------------------------------------- install / upgrade
def test_helm_install_upgrade_uninstall(cluster, crds, helm, namespace, watch_namespaces):
    release = f"it-{uuid.uuid4().hex[:5]}"
    full = f"{release}-kubetune"
    helm("install", release, str(CHART), "-n", namespace)
    get = lambda *a: cluster.kubectl("get", *a, "-o", "json", check=False)  # noqa: E731
    dep = json.loads(get("deployment", full, "-n", namespace).stdout)
    assert dep["spec"]["replicas"] == 1
    assert "--all-namespaces" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert get("clusterrole", full).returncode == 0
    assert get("clusterrolebinding", full).returncode == 0
    assert get("serviceaccount", full, "-n", namespace).returncode == 0
    assert get("service", f"{full}-metrics", "-n", namespace).returncode == 0
    assert get("servicemonitor", full, "-n", namespace).returncode != 0, "monitoring objects are opt-in"

    assert get("poddisruptionbudget", full, "-n", namespace).returncode != 0, "one replica: no PodDisruptionBudget"
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"].startswith("ghcr.io/kubetune/trainer:")

    values = helm.values_file({"replicaCount": 2, "watchNamespaces": watch_namespaces,
                               "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                                              "prometheusRule": {"enabled": True}},
                               "trainer": {"image": {"repository": "r.example/kt/trainer", "tag": "9.9.9",
                                                     "pullPolicy": "Always"},
                                           "imagePullSecrets": [{"name": "regcred"}],
                                           "gpuNodeSelector": {"pool": "gpu"}}})
    helm("upgrade", release, str(CHART), "-n", namespace, "-f", values)
    status = json.loads(helm("status", release, "-n", namespace, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"
    dep = json.loads(get("deployment", full, "-n", namespace).stdout)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["spec"]["replicas"] == 2 and {"--leader-election", f"--lease-name={full}"} <= set(args)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {k: env.get(k) for k in ("KUBETUNE_TRAINER_IMAGE", "KUBETUNE_TRAINER_IMAGE_PULL_POLICY",
                                    "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS", "KUBETUNE_GPU_NODE_SELECTOR")} == {
        "KUBETUNE_TRAINER_IMAGE": "r.example/kt/trainer:9.9.9", "KUBETUNE_TRAINER_IMAGE_PULL_POLICY": "Always",
        "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS": "regcred", "KUBETUNE_GPU_NODE_SELECTOR": "pool=gpu"}
    pdb = json.loads(get("poddisruptionbudget", full, "-n", namespace).stdout)
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert not [a for a in args if a.startswith(("--peering", "--standalone"))]
    assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={n}" for n in watch_namespaces]
    assert get("clusterrole", full).returncode != 0, "the cluster-wide ClusterRole is removed in namespaced mode"
    assert get("clusterrole", f"{full}-cluster-read").returncode == 0
    for ns in watch_namespaces:
        assert get("role", full, "-n", ns).returncode == 0
        assert get("rolebinding", full, "-n", ns).returncode == 0
    for kind, name in (("servicemonitor", full), ("podmonitor", f"{full}-trainers"), ("prometheusrule", full)):
        assert get(kind, name, "-n", namespace).returncode == 0, kind
    # The replicas' only coordination right is their own Lease; nothing of kopf peering.
    kc = sa_kubeconfig(cluster, namespace, full, helm.home / f"{release}.kubeconfig")
    assert allowed(kc, "update", "leases.coordination.k8s.io", namespace, name=full)
    for ns in watch_namespaces:
        assert not allowed(kc, "patch", "kopfpeerings.kopf.dev", ns, name=full)
    assert not allowed(kc, "patch", "clusterkopfpeerings.kopf.dev", name=full)
    # Several replicas without leader election would all reconcile: the chart refuses that upgrade.
    refused = helm("upgrade", release, str(CHART), "-n", namespace, "-f", values, "--set", "operator.leaderElection=false",
                   check=False)
    assert refused.returncode != 0 and "replicaCount 2 needs operator.leaderElection: true" in refused.stderr
    assert json.loads(helm("status", release, "-n", namespace, "-o", "json").stdout)["version"] == 2

    helm("uninstall", release, "-n", namespace)
    assert get("deployment", full, "-n", namespace).returncode != 0
    assert get("poddisruptionbudget", full, "-n", namespace).returncode != 0
    assert get("clusterrole", f"{full}-cluster-read").returncode != 0
    assert get("role", full, "-n", watch_namespaces[0]).returncode != 0
    assert get("crd", "finetunejobs.kubetune.io").returncode == 0, "CRDs from crds/ are never deleted by helm"


# ----------------------------------------------------------------------------- CRD upgrade path
def probe_crd(group: str, drop_field: str | None) -> dict[str, Any]:
    """kubetune's CRD under another group and kind (so it cannot clash with the real one), optionally without
    one spec field: the "old release" of the CRD."""
    crd = yaml.safe_load((ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    crd["metadata"] = {"name": f"upgradeprobes.{group}"}
    crd["spec"]["group"] = group
    crd["spec"]["names"] = {"kind": "UpgradeProbe", "listKind": "UpgradeProbeList", "plural": "upgradeprobes",
                            "singular": "upgradeprobe"}
    if drop_field:
        for version in crd["spec"]["versions"]:
            del version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][drop_field]
    return crd


def crd_only_chart(directory: Path, crd: dict[str, Any]) -> Path:
    """A copy of the chart's metadata with crds/ holding only this CRD (no templates: the test is about crds/)."""
    directory.mkdir()
    (directory / "Chart.yaml").write_text((CHART / "Chart.yaml").read_text())
    (directory / "crds").mkdir()
    # JSON (which is YAML): PyYAML writes strings such as 2e-4 unquoted, and Go's YAML reads them back as numbers.
    (directory / "crds" / "crd.yaml").write_text(json.dumps(crd, indent=1))
    return directory


def test_crd_upgrade_path(cluster, helm, tmp_path):
    """docs/upgrading.md: `helm upgrade` leaves crds/ alone, a plain server-side apply conflicts with the fields
    helm created, and the documented `helm show crds | kubectl apply --server-side --force-conflicts` upgrades it."""
    group = f"u{uuid.uuid4().hex[:6]}.kubetune.test"
    name = f"upgradeprobes.{group}"
    new_crd = probe_crd(group, None)
    field = "ttlSecondsAfterFinished"  # optional, and no validation rule names it: the old CRD stays valid
    assert field in new_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    old_chart = crd_only_chart(tmp_path / "old", probe_crd(group, field))
    new_chart = crd_only_chart(tmp_path / "new", new_crd)
    release = f"crd-{uuid.uuid4().hex[:5]}"

    def spec_fields() -> set[str]:
        crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
        return set(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])

    try:
        helm("install", release, str(old_chart), "-n", "default")
        assert field not in spec_fields()
        helm("upgrade", release, str(new_chart), "-n", "default")
        assert field not in spec_fields(), "helm upgrade changed a CRD from crds/"
        shown = helm("show", "crds", str(new_chart)).stdout
        plain = cluster.kubectl("apply", "--server-side", "-f", "-", input=shown, check=False)
        assert plain.returncode != 0 and "conflict" in plain.stderr.lower(), plain.stdout + plain.stderr
        assert field not in spec_fields()
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=shown)
        cluster.kubectl("wait", "--for=condition=established", "--timeout=60s", f"crd/{name}", timeout=70)
        assert field in spec_fields()
    finally:
        helm("uninstall", release, "-n", "default", check=False)
        cluster.kubectl("delete", "crd", name, "--ignore-not-found", "--wait=false", check=False)


# ----------------------------------------------------------------------------- RBAC with the real operator
FTJ = """
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  model:
    uri: hf://kubetune-test/tiny-llama
  dataset:
    uri: s3://kubetune-test/train.jsonl
  method: lora
  training:
    maxSteps: 10
    maxSeqLength: 128
    precision: fp32
  resources:
    gpusPerPod: 0
    pods: 1
    cpu: "1"
    memory: 1Gi
  output:
    uri: s3://kubetune-test/outputs/{name}
"""


@pytest.fixture(scope="module")
def namespaced_release(cluster: Any, crds: None, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The chart installed in namespaced mode: release namespace + one watched + one other namespace,
    and a kubeconfig that authenticates as the chart's ServiceAccount."""
    release_ns = make_namespace(cluster, "kubetune-sys")
    watched = make_namespace(cluster, "team")
    other = make_namespace(cluster, "other")
    release = f"rb-{uuid.uuid4().hex[:5]}"
    helm("install", release, str(CHART), "-n", release_ns, "-f", helm.values_file({"watchNamespaces": [watched]}))
    full = f"{release}-kubetune"
    kubeconfig = sa_kubeconfig(cluster, release_ns, full, tmp_path_factory.mktemp("sa") / "kubeconfig")
    dep = json.loads(cluster.kubectl("get", "deployment", full, "-n", release_ns, "-o", "json").stdout)
    try:
        yield {"release": release, "fullname": full, "release_ns": release_ns, "watched": watched,
               "other": other, "kubeconfig": kubeconfig,
               "args": dep["spec"]["template"]["spec"]["containers"][0]["args"]}
    finally:
        helm("uninstall", release, "-n", release_ns, check=False)
        delete_namespaces(cluster, [release_ns, watched, other])


def test_operator_reconciles_as_the_chart_service_account(cluster, namespaced_release, tmp_path):
    from kubetune_dev.devcluster.cluster import free_port as _fp  # noqa: F401 - fails early if devcluster is absent

    r = namespaced_release
    live, metrics = free_port(), free_port()
    # The chart's own arguments, with local ports (several operators may run on this machine).
    args = [a for a in r["args"][1:] if not a.startswith(("--liveness-port", "--metrics-port"))]
    args += [f"--liveness-port={live}", f"--metrics-port={metrics}", "--progress-host=127.0.0.1",
             f"--progress-port={free_port()}", "--resync-seconds=2", "--progress-seconds=2",
             "--no-preflight"]  # KWOK pods run no preflight; the trainer Job is what this test looks for
    log_path = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(r["kubeconfig"]), "POD_NAMESPACE": r["release_ns"],
           "POD_NAME": "operator-test", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune", *(["operator"] + args)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    ns, name = r["watched"], "rbac-probe"

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=FTJ.format(name=name))

        def reconciled() -> Any:
            assert proc.poll() is None, f"operator exited with {proc.returncode}:\n{log_tail()}"
            obj = json.loads(cluster.kubectl("get", "finetunejob", name, "-n", ns, "-o", "json").stdout)
            st = obj.get("status") or {}
            return obj if st.get("observedGeneration") == obj["metadata"]["generation"] and st.get("layout") else None

        obj = wait_for(reconciled, 60, lambda: f"FineTuneJob {ns}/{name} reconciled; operator log:\n{log_tail()}")
        status = obj["status"]
        assert status["phase"] in {"Pending", "Running"}, status
        types = {c["type"]: c["status"] for c in status["conditions"]}
        assert types.get("Sized") == "True", status["conditions"]
        # Children (docs/contracts.md §7), created by the operator with the chart's RBAC.
        for kind, child in (("configmap", f"{name}-plan"), ("job", f"{name}-trainer")):
            got = json.loads(cluster.kubectl("get", kind, child, "-n", ns, "-o", "json").stdout)
            owners = got["metadata"].get("ownerReferences") or []
            assert any(o["uid"] == obj["metadata"]["uid"] for o in owners), (kind, owners)
        # A single-pod run needs no rendezvous Service.
        assert cluster.kubectl("get", "service", f"{name}-trainer", "-n", ns, check=False).returncode != 0
        # The trainer pod runs (KWOK) and the operator folds that into status: pods watch + status patch work.
        running = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("phase") == "Running" else None)(
            json.loads(cluster.kubectl("get", "finetunejob", name, "-n", ns, "-o", "json").stdout)), 60,
            lambda: f"phase Running; status {cluster.kubectl('get', 'finetunejob', name, '-n', ns, '-o', 'jsonpath={.status}').stdout}; "
                    f"pods {cluster.kubectl('get', 'pods', '-n', ns, '-o', 'wide').stdout}; operator log:\n{log_tail()}")
        assert {c["type"]: c["status"] for c in running["status"]["conditions"]}["Running"] == "True"
        # Events were posted (core/v1 events create).
        events = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json",
                                            f"--field-selector=involvedObject.name={name}").stdout)["items"]
        assert events, "the operator posted no Events"
        # Leader election used its Lease in the release namespace.
        lease = json.loads(cluster.kubectl("get", "lease", r["fullname"], "-n", r["release_ns"], "-o", "json").stdout)
        assert lease["spec"]["holderIdentity"]
        # Health and metrics endpoints the chart's probes and Service point at.
        with urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'kubetune_jobs{phase="Running"} 1.0' in text, text[:2000]
        # (the text after the timestamp: "11:11:32,403" is not a 403)
        forbidden = [line for line in log_tail().splitlines()
                     if "403" in line.split(" ", 2)[-1] or "orbidden" in line]
        assert not forbidden, "\n".join(forbidden)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def allowed(kubeconfig: Path, verb: str, resource: str, namespace: str = "", name: str = "",
            subresource: str = "") -> bool:
    """SelfSubjectAccessReview (what `kubectl auth can-i` asks) as the identity in kubeconfig;
    resource is "plural" or "plural.group"."""
    from kubernetes import client, config

    plural, _, group = resource.partition(".")
    attrs = {"verb": verb, "resource": plural, "group": group, "namespace": namespace, "name": name,
             "subresource": subresource}
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        review = client.AuthorizationV1Api(api).create_self_subject_access_review(
            {"spec": {"resourceAttributes": {k: v for k, v in attrs.items() if v}}})
        return bool(review.status.allowed)
    finally:
        api.close()


def test_service_account_rights_are_not_excessive(cluster, namespaced_release):
    r = namespaced_release
    kc, watched, other, release_ns = r["kubeconfig"], r["watched"], r["other"], r["release_ns"]
    # With kubectl itself: no Secrets, in its namespaces or anywhere else.
    assert can_i(cluster, kc, "create", "jobs.batch", "-n", watched), "positive control"
    assert not can_i(cluster, kc, "get", "secrets", "-n", watched)
    assert not can_i(cluster, kc, "list", "secrets", "--all-namespaces")
    assert not can_i(cluster, kc, "create", "configmaps", "-n", other)
    # The same question (SelfSubjectAccessReview) for the rest, without a process per check.
    assert allowed(kc, "patch", "finetunejobs.kubetune.io", watched)
    assert allowed(kc, "patch", "finetunejobs.kubetune.io", watched, subresource="status")
    assert allowed(kc, "list", "nodes")
    for ns in (watched, other, release_ns, "default", "kube-system"):
        for verb in ("get", "list", "watch"):
            assert not allowed(kc, verb, "secrets", ns), (verb, ns)
    # Outside its namespaces only the pod list and watch of operator.occupancy (on by default): the GPUs other
    # pods hold.
    assert allowed(kc, "list", "pods", other) and allowed(kc, "list", "pods")
    assert allowed(kc, "watch", "pods", other) and allowed(kc, "watch", "pods")
    # Nothing else in namespaces it does not watch.
    for verb, resource in (("get", "finetunejobs.kubetune.io"), ("get", "pods"), ("create", "configmaps"),
                           ("create", "jobs.batch"), ("delete", "services"), ("create", "events")):
        assert not allowed(kc, verb, resource, other), (verb, resource)
        assert not allowed(kc, verb, resource), (verb, resource, "all namespaces")
    # No writes to cluster-scoped objects, no pod creation, no privilege plumbing.
    assert not allowed(kc, "delete", "nodes")
    assert not allowed(kc, "patch", "customresourcedefinitions.apiextensions.k8s.io")
    assert not allowed(kc, "create", "pods", watched)
    assert not allowed(kc, "create", "pods", watched, subresource="exec")
    assert not allowed(kc, "create", "rolebindings.rbac.authorization.k8s.io", watched)
    assert not allowed(kc, "create", "serviceaccounts", watched, name="default", subresource="token")
    # The release namespace: only its own Lease.
    assert allowed(kc, "update", "leases.coordination.k8s.io", release_ns, name=r["fullname"])
    assert not allowed(kc, "update", "leases.coordination.k8s.io", release_ns, name="someone-else")
    assert not allowed(kc, "create", "configmaps", release_ns)


def test_cluster_wide_service_account_cannot_read_secrets(cluster, crds, helm, namespace, tmp_path):
    release = f"cw-{uuid.uuid4().hex[:5]}"
    helm("install", release, str(CHART), "-n", namespace)
    try:
        kc = sa_kubeconfig(cluster, namespace, f"{release}-kubetune", tmp_path / "kubeconfig")
        assert can_i(cluster, kc, "create", "jobs.batch", "-n", "default"), "positive control"
        assert not can_i(cluster, kc, "list", "secrets", "--all-namespaces")
        assert allowed(kc, "watch", "finetunejobs.kubetune.io")
        for verb in ("get", "list", "watch"):
            assert not allowed(kc, verb, "secrets"), verb
            assert not allowed(kc, verb, "secrets", "kube-system"), verb
        assert not allowed(kc, "create", "pods", "default")
        assert not allowed(kc, "delete", "namespaces")
        assert not allowed(kc, "list", "namespaces"), "cluster-wide kopf does not need the namespace list"
    finally:
        helm("uninstall", release, "-n", namespace, check=False)


def test_storage_class_cache_lets_the_operator_create_claims_but_never_change_them(cluster, crds, helm, namespace,
                                                                                  tmp_path):
    release = f"sc-{uuid.uuid4().hex[:5]}"
    values = helm.values_file({"trainer": {"cache": {"storageClass": "nfs-rwx"}}})
    helm("install", release, str(CHART), "-n", namespace, "-f", values)
    try:
        kc = sa_kubeconfig(cluster, namespace, f"{release}-kubetune", tmp_path / "kubeconfig")
        for verb in ("get", "create"):  # the cache claim in any job namespace (docs/cache.md)
            assert allowed(kc, verb, "persistentvolumeclaims", "default"), verb
        for verb in ("update", "patch", "delete", "deletecollection"):  # the cache outlives every job
            assert not allowed(kc, verb, "persistentvolumeclaims", "default"), verb
        assert not allowed(kc, "create", "persistentvolumes")
    finally:
        helm("uninstall", release, "-n", namespace, check=False)
