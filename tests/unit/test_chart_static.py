"""Static checks of the Helm chart: CRD copy, lint, strict values schema, rendered objects,
alert rules (promtool), the Grafana dashboard and the Argo CD health script. No cluster needed;
helm, promtool and lupa are required (each test skips with the reason when one is missing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubetune_dev.devcluster.binaries import helm_binary
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
KUBE_VERSION = "1.33.13"  # the devcluster's version; helm built without ldflags defaults to 1.20




HELM = helm_binary()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not found (devcluster/build.sh builds it into ~/.cache/kubetune/bin/current)")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (scripts/install-system-deps.sh installs Debian's prometheus)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run helm; raise with its stderr when check and it fails."""
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def render(values: dict[str, Any] | None = None, tmp_path: Path | None = None, release: str = "kt",
           namespace: str = "kubetune", show_only: str | None = None) -> list[dict[str, Any]]:
    """helm template the chart with these values; the rendered objects."""
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    if values:
        assert tmp_path is not None
        vf = tmp_path / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        vf.write_text(yaml.safe_dump(values))
        args += ["-f", str(vf)]
    if show_only:
        args += ["--show-only", show_only]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def operator_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


MONITORING_ON = {"monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                                "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}}


# ----------------------------------------------------------------------------- CRDs
def test_chart_crds_are_byte_identical_to_crds_dir():
    src = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    dst = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert src, "no CRDs in crds/"
    assert sorted(dst) == sorted(src), f"chart CRDs {sorted(dst)} != crds/ {sorted(src)}: run scripts/sync-chart-crds.sh"
    for name in src:
        assert dst[name] == src[name], f"charts/kubetune/crds/{name} differs from crds/{name}: run scripts/sync-chart-crds.sh"


def test_sync_script_check_mode_agrees():
    result = subprocess.run([str(ROOT / "scripts" / "sync-chart-crds.sh"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- lint + schema
@needs_helm
def test_helm_lint_strict():
    result = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("values", [
    {},
    {"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2},
    MONITORING_ON,
    {"image": {"digest": "sha256:" + "a" * 64}, "operator": {"extraArgs": ["--verbose"]},
     "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
     "resources": {"requests": {"cpu": "200m", "memory": "1Gi"}, "limits": {"cpu": 1}}},
    {"trainer": {"image": {"repository": "r.example/trainer", "digest": "sha256:" + "c" * 64, "pullPolicy": "Always"},
                 "imagePullSecrets": [{"name": "regcred"}],
                 "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                 "gpuNodeSelector": {"pool": "gpu", "cloud.example.com/tier": "a"}, "cpuNodeSelector": {"pool": "cpu"}},
     "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%", "unhealthyPodEvictionPolicy": "IfHealthyBudget"}},
], ids=["defaults", "namespaced-ha", "monitoring", "misc", "trainer-pdb"])
def test_valid_values_lint(values, tmp_path):
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    result = helm("lint", "--strict", str(CHART), "-f", str(vf), "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


BAD_VALUES = [
    ("unknown top-level key", {"replicas": 2}, "replicas"),
    ("unknown nested key", {"monitoring": {"serviceMonitor": {"enabeld": True}}}, "enabeld"),
    ("unknown key in security context", {"securityContext": {"privilegd": True}}, "privilegd"),
    ("wrong type: replicaCount string", {"replicaCount": "two"}, "replicaCount"),
    ("wrong type: enabled string", {"monitoring": {"prometheusRule": {"enabled": "yes"}}}, "enabled"),
    ("wrong type: watchNamespaces string", {"watchNamespaces": "team-a"}, "watchNamespaces"),
    ("invalid namespace name", {"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
    ("pullPolicy not in enum", {"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ("port out of range", {"operator": {"metricsPort": 70000}}, "metricsPort"),
    ("bad duration", {"monitoring": {"prometheusRule": {"stalledAfter": "15 minutes"}}}, "stalledAfter"),
    ("label values must be strings", {"commonLabels": {"team": 3}}, "team"),
    ("unknown trainer key", {"trainer": {"imagePullSecret": [{"name": "x"}]}}, "imagePullSecret"),
    ("trainer pullPolicy not in enum", {"trainer": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
    ("trainer digest not sha256", {"trainer": {"image": {"digest": "latest"}}}, "digest"),
    ("trainer pull secret name with a comma", {"trainer": {"imagePullSecrets": [{"name": "a,b"}]}}, "name"),
    ("gpu nodeSelector value with a comma", {"trainer": {"gpuNodeSelector": {"pool": "a,b=c"}}}, "gpuNodeSelector"),
    ("gpu nodeSelector key with =", {"trainer": {"gpuNodeSelector": {"a=b": "c"}}}, "gpuNodeSelector"),
    ("trainer toleration with unknown key", {"trainer": {"tolerations": [{"keys": "x"}]}}, "keys"),
    ("pdb maxUnavailable 0 blocks every drain", {"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable"),
    ("pdb enabled not auto/true/false", {"podDisruptionBudget": {"enabled": "yes"}}, "enabled"),
]


@needs_helm
@pytest.mark.parametrize("values,needle", [(v, n) for _, v, n in BAD_VALUES], ids=[d for d, _, _ in BAD_VALUES])
def test_schema_rejects_bad_values(values, needle, tmp_path):
    vf = tmp_path / "bad.yaml"
    vf.write_text(yaml.safe_dump(values))
    for cmd in (["template", "kt", str(CHART)], ["lint", "--strict", str(CHART)]):
        result = helm(*cmd, "-f", str(vf), "--kube-version", KUBE_VERSION, check=False)
        out = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {cmd[0]} accepted {values}"
        assert "schema" in out and needle in out, out


def test_schema_forbids_additional_properties_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "")
    assert not open_objects, f"objects with properties but open to unknown keys: {open_objects}"


def test_every_value_is_documented():
    """Each key in values.yaml has a comment line above it (keys inside Kubernetes-typed blocks such
    as securityContext or resources are covered by the block's comment)."""
    k8s_blocks = {"podSecurityContext", "securityContext", "resources", "labels"}
    undocumented = []
    stack: list[tuple[int, str]] = []
    prev = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if m:
            indent, key = len(m.group(1)), m.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            inside_k8s = any(k in k8s_blocks for _, k in stack)
            if not inside_k8s and not prev.lstrip().startswith("#"):
                undocumented.append(".".join([k for _, k in stack] + [key]))
            stack.append((indent, key))
        if line.strip():
            prev = line
    assert not undocumented, f"values without a comment: {undocumented}"


def test_schema_covers_every_default_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = []

    def walk(v: Any, s: dict[str, Any], path: str) -> None:
        if isinstance(v, dict) and "properties" in s:
            for k, child in v.items():
                if k not in s["properties"]:
                    missing.append(f"{path}.{k}")
                else:
                    walk(child, s["properties"][k], f"{path}.{k}")

    walk(values, schema, "")
    assert not missing, missing


# ----------------------------------------------------------------------------- rendering
@needs_helm
def test_default_render_is_cluster_wide_single_replica_and_has_no_monitoring():
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                            "Service", "Deployment"]), kinds
    args = operator_container(objs)["args"]
    assert args[0] == "operator"
    assert "--all-namespaces" in args and "--leader-election" in args
    assert "--liveness-port=8080" in args and "--metrics-port=8000" in args
    assert not any(a.startswith(("--namespace", "--peering", "--standalone", "--priority")) for a in args)
    assert one(objs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


@needs_helm
def test_operator_pod_is_hardened():
    objs = render()
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc.get("privileged") is not True
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and {"name": tmp[0]["name"], "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    health = next(p for p in c["ports"] if p["name"] == "health")
    assert health["containerPort"] == 8080
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # Lease identity
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, from a Role/ClusterRole (rules restricted by resourceNames excluded)."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        if rule.get("resourceNames"):
            continue
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


NAMESPACED_NEEDS = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch", "update"},
    ("kubetune.io", "finetunejobs/status"): {"get", "patch", "update"},
    ("", "configmaps"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "services"): {"create", "get", "list", "watch", "patch", "delete"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("kueue.x-k8s.io", "workloads"): {"list", "watch"},  # Kueue's verdict on queued trainer Jobs (read only)
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
CLUSTER_READS = {
    ("", "nodes"): {"get", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
}


def assert_no_wildcards_or_secrets(objs: list[dict[str, Any]]) -> None:
    for role in by_kind(objs, "Role") + by_kind(objs, "ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
            assert not {"secrets", "serviceaccounts/token", "pods/exec"} & set(rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


@needs_helm
def test_cluster_wide_rbac_is_exactly_what_the_operator_needs():
    objs = render()
    assert_no_wildcards_or_secrets(objs)
    cr = one(objs, "ClusterRole")
    assert rules_of(cr) == {**NAMESPACED_NEEDS, **CLUSTER_READS}
    crb = one(objs, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cr["metadata"]["name"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune"}]
    lease_role = one(objs, "Role")
    assert lease_role["metadata"]["namespace"] == "kubetune"
    assert rules_of(lease_role) == {("coordination.k8s.io", "leases"): {"create"}}
    named = [r for r in lease_role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": ["kt-kubetune"], "verbs": ["get", "update", "patch"]}]


@needs_helm
def test_occupancy_off_drops_the_cluster_wide_pod_list(tmp_path):
    objs = render({"watchNamespaces": ["team-a"], "operator": {"occupancy": False, "resizeUnschedulableSeconds": 0}},
                  tmp_path)
    args = operator_container(objs)["args"]
    assert "--no-occupancy" in args and "--resize-unschedulable-seconds=0" in args
    assert rules_of(one(objs, "ClusterRole")) == {**CLUSTER_READS, ("", "namespaces"): {"list", "watch"}}


@needs_helm
def test_namespaced_mode_rbac(tmp_path):
    objs = render({"watchNamespaces": ["team-a", "team-b"]}, tmp_path)
    assert_no_wildcards_or_secrets(objs)
    args = operator_container(objs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    cr = one(objs, "ClusterRole")
    # Only reads cluster-wide: cluster-scoped objects, the namespaces kopf lists/watches in namespaced mode, and
    # (operator.occupancy, on by default) the list of pods whose GPUs the sizer counts as taken.
    assert rules_of(cr) == {**CLUSTER_READS, ("", "namespaces"): {"list", "watch"}, ("", "pods"): {"list", "watch"}}
    assert "--occupancy" in args and "--resize-unschedulable-seconds=300" in args
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(objs, "Role")}
    for ns in ("team-a", "team-b"):
        assert rules_of(roles[(ns, "kt-kubetune")]) == NAMESPACED_NEEDS
        rb = [b for b in by_kind(objs, "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert len(rb) == 1 and rb[0]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                     "name": "kt-kubetune"}
        assert rb[0]["subjects"][0]["namespace"] == "kubetune"
    assert {ns for ns, _ in roles} == {"team-a", "team-b", "kubetune"}  # kubetune: the leader Lease only


LEASE_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
               {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["kt-kubetune"],
                "verbs": ["get", "update", "patch"]}]


@needs_helm
@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster-wide", "namespaced"])
def test_replicas_two_use_the_leader_election_lease_and_no_kopf_peering(namespaced, tmp_path):
    values: dict[str, Any] = {"replicaCount": 2}
    if namespaced:
        values["watchNamespaces"] = ["team-a", "team-b"]
    objs = render(values, tmp_path)
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    args = operator_container(objs)["args"]
    assert {"--leader-election", "--lease-name=kt-kubetune", "--lease-namespace=kubetune"} <= set(args)
    assert not any(a.startswith(("--peering", "--standalone", "--priority", "--no-leader-election")) for a in args)
    # No kopf peering objects, and no rights on anything of kopf.dev.
    assert not [o for o in objs if o["apiVersion"].startswith("kopf.dev/") or "KopfPeering" in o["kind"]]
    assert_no_wildcards_or_secrets(objs)
    for role in by_kind(objs, "Role") + by_kind(objs, "ClusterRole"):
        assert not [r for r in role["rules"] if "kopf.dev" in r["apiGroups"]], role["metadata"]
    # The Lease RBAC: create any Lease, read/renew only the release's own one, in the release namespace.
    lease_role = one(objs, "Role", "kt-kubetune-leader-election")
    assert lease_role["metadata"]["namespace"] == "kubetune" and lease_role["rules"] == LEASE_RULES
    binding = one(objs, "RoleBinding", "kt-kubetune-leader-election")
    assert binding["roleRef"]["name"] == "kt-kubetune-leader-election"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune"}]
    if namespaced:
        for ns in ("team-a", "team-b"):
            role = next(r for r in by_kind(objs, "Role") if r["metadata"]["namespace"] == ns)
            assert rules_of(role) == NAMESPACED_NEEDS
    else:
        assert rules_of(one(objs, "ClusterRole")) == {**NAMESPACED_NEEDS, **CLUSTER_READS}


@needs_helm
@pytest.mark.parametrize("replicas", [2, 3])
def test_several_replicas_without_leader_election_fail_to_render(replicas, tmp_path):
    vf = tmp_path / "v.yaml"
    vf.write_text(yaml.safe_dump({"replicaCount": replicas, "operator": {"leaderElection": False}}))
    # (helm lint only logs a template's `fail` at INFO level: template/install are what stop it.)
    result = helm("template", "kt", str(CHART), "-f", str(vf), "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode != 0, f"helm template accepted {replicas} replicas without leader election"
    assert f"replicaCount {replicas} needs operator.leaderElection: true" in result.stderr
    # Control: one replica without leader election renders (no Lease RBAC, --no-leader-election).
    vf.write_text(yaml.safe_dump({"replicaCount": 1, "operator": {"leaderElection": False}}))
    objs = [d for d in yaml.safe_load_all(helm("template", "kt", str(CHART), "-n", "kubetune", "-f", str(vf),
                                               "--kube-version", KUBE_VERSION).stdout) if d]
    assert "--no-leader-election" in operator_container(objs)["args"]
    assert not [o for o in objs if o["metadata"]["name"].endswith("-leader-election")]
    assert one(objs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


@needs_helm
def test_rendered_args_parse_with_the_operator_cli(tmp_path):
    main = pytest.importorskip("kubetune.main", reason="the operator entry point (kubetune.main) is not importable")
    for values in ({}, {"watchNamespaces": ["a", "b"], "replicaCount": 3}, {"operator": {"leaderElection": False}}):
        args = operator_container(render(values, tmp_path))["args"]
        assert args[0] == "operator"
        parsed = main.build_parser().parse_args(args[1:])
        assert parsed.liveness_port == 8080 and parsed.metrics_port == 8000
        assert parsed.namespace == values.get("watchNamespaces", [])
        assert parsed.leader_election is values.get("operator", {}).get("leaderElection", True)
        assert not hasattr(parsed, "peering") and not hasattr(parsed, "standalone")


# ----------------------------------------------------------------------------- trainer pods
def operator_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator container's plain (value) environment variables."""
    return {e["name"]: e["value"] for e in operator_container(objs)["env"] if "value" in e}


TRAINER_ENV = {"KUBETUNE_TRAINER_IMAGE", "KUBETUNE_TRAINER_IMAGE_PULL_POLICY", "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS",
               "KUBETUNE_EXTRA_TOLERATIONS", "KUBETUNE_GPU_NODE_SELECTOR", "KUBETUNE_CPU_NODE_SELECTOR"}
TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
TRAINER_VALUES = {"trainer": {"image": {"repository": "r.example/kt/trainer", "tag": "1.2.3", "pullPolicy": "Always"},
                              "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
                              "tolerations": [TOLERATION],
                              "gpuNodeSelector": {"pool": "gpu", "cloud.example.com/tier": "a"},
                              "cpuNodeSelector": {"pool": "cpu"}}}


@needs_helm
def test_trainer_defaults_reach_the_operator_env():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    env = operator_env(render())
    trainer_env = {k: v for k, v in env.items() if k in TRAINER_ENV}
    assert trainer_env == {"KUBETUNE_TRAINER_IMAGE": f"ghcr.io/kubetune/trainer:{chart['appVersion']}",
                           "KUBETUNE_TRAINER_IMAGE_PULL_POLICY": "IfNotPresent"}


@needs_helm
def test_trainer_values_reach_the_operator_env(tmp_path):
    env = operator_env(render(TRAINER_VALUES, tmp_path))
    assert env["KUBETUNE_TRAINER_IMAGE"] == "r.example/kt/trainer:1.2.3"
    assert env["KUBETUNE_TRAINER_IMAGE_PULL_POLICY"] == "Always"
    assert env["KUBETUNE_TRAINER_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert json.loads(env["KUBETUNE_EXTRA_TOLERATIONS"]) == [TOLERATION]
    assert env["KUBETUNE_GPU_NODE_SELECTOR"] == "cloud.example.com/tier=a,pool=gpu"
    assert env["KUBETUNE_CPU_NODE_SELECTOR"] == "pool=cpu"
    digest = "sha256:" + "d" * 64
    pinned = render({"trainer": {"image": {"repository": "r.example/kt/trainer", "tag": "1.2.3", "digest": digest}}},
                    tmp_path)
    assert operator_env(pinned)["KUBETUNE_TRAINER_IMAGE"] == f"r.example/kt/trainer@{digest}"


@needs_helm
def test_trainer_env_configures_the_operator(tmp_path, monkeypatch):
    """The chart's env, read by the operator's own flag parser, gives the trainer pods the values' settings."""
    main = pytest.importorskip("kubetune.main", reason="the operator entry point (kubetune.main) is not importable")
    for name in TRAINER_ENV:
        monkeypatch.delenv(name, raising=False)
    default_cfg = main.operator_config(main.build_parser().parse_args([])).build
    objs = render(TRAINER_VALUES, tmp_path)
    for name, value in operator_env(objs).items():
        monkeypatch.setenv(name, value)
    args = operator_container(objs)["args"]
    cfg = main.operator_config(main.build_parser().parse_args(args[1:])).build
    assert cfg.image == "r.example/kt/trainer:1.2.3"
    assert cfg.image_pull_policy == "Always"
    assert cfg.image_pull_secrets == ("regcred", "mirror")
    assert list(cfg.extra_tolerations) == [TOLERATION]
    assert dict(cfg.gpu_node_selector) == {"pool": "gpu", "cloud.example.com/tier": "a"}
    assert dict(cfg.cpu_node_selector) == {"pool": "cpu"}
    # The chart's defaults are the operator's own defaults (same trainer image and pull policy).
    for name in TRAINER_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in operator_env(render()).items():
        monkeypatch.setenv(name, value)
    cfg = main.operator_config(main.build_parser().parse_args([])).build
    assert cfg == default_cfg


# ----------------------------------------------------------------------------- PodDisruptionBudget
@needs_helm
@pytest.mark.parametrize("values,expected", [
    ({}, None),
    ({"replicaCount": 2}, 1),
    ({"replicaCount": 3, "podDisruptionBudget": {"maxUnavailable": "50%"}}, "50%"),
    ({"podDisruptionBudget": {"enabled": True}}, 1),
    ({"replicaCount": 3, "podDisruptionBudget": {"enabled": False}}, None),
], ids=["single-replica", "ha-auto", "ha-percent", "forced-on", "forced-off"])
def test_pod_disruption_budget(values, expected, tmp_path):
    objs = render(values, tmp_path)
    pdbs = by_kind(objs, "PodDisruptionBudget")
    if expected is None:
        assert pdbs == []
        return
    assert len(pdbs) == 1
    pdb = pdbs[0]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == "kubetune"
    assert pdb["spec"]["maxUnavailable"] == expected and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    dep = one(objs, "Deployment")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # It selects the operator pods and nothing else of the release (labels of the pod template).
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


# ----------------------------------------------------------------------------- CRD upgrade path
def test_crd_upgrade_path_is_documented():
    doc = (ROOT / "docs" / "upgrading.md").read_text()
    for command in ("helm show crds charts/kubetune | kubectl apply --server-side --force-conflicts -f -",
                    "kubectl apply --server-side --force-conflicts -f crds/"):
        assert command in doc, command
    assert "docs/upgrading.md" in (CHART / "README.md").read_text()
    assert "docs/upgrading.md" in (CHART / "values.yaml").read_text()
    assert "docs/upgrading.md" in (ROOT / "README.md").read_text()
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "kubectl apply --server-side --force-conflicts" in notes


@needs_helm
def test_helm_show_crds_is_the_crds_dir():
    """`helm show crds` (the documented upgrade command) prints exactly the CRDs of crds/."""
    shown = [d for d in yaml.safe_load_all(helm("show", "crds", str(CHART)).stdout) if d]
    expected = [d for p in sorted((ROOT / "crds").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert {d["kind"] for d in expected} == {"CustomResourceDefinition", "ValidatingAdmissionPolicy",
                                             "ValidatingAdmissionPolicyBinding"}
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(shown, key=key) == sorted(expected, key=key)


@needs_helm
def test_monitoring_objects_render_only_when_enabled(tmp_path):
    default_kinds = {o["kind"] for o in render()}
    assert not default_kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    for key, kind in (("serviceMonitor", "ServiceMonitor"), ("podMonitor", "PodMonitor"),
                      ("prometheusRule", "PrometheusRule"), ("grafanaDashboard", "ConfigMap")):
        objs = render({"monitoring": {key: {"enabled": True}}}, tmp_path)
        extra = {o["kind"] for o in objs} - default_kinds
        assert extra == {kind}, (key, extra)


@needs_helm
def test_service_monitor_and_pod_monitor_target_the_right_ports(tmp_path):
    objs = render({**MONITORING_ON, "watchNamespaces": ["team-a"]}, tmp_path)
    svc = one(objs, "Service")
    sm = one(objs, "ServiceMonitor")
    svc_labels = svc["metadata"]["labels"]
    assert all(svc_labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert {"name": "metrics", "containerPort": 8000, "protocol": "TCP"} in operator_container(objs)["ports"]
    assert all(svc["spec"]["selector"][k] == v
               for k, v in one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
               if k in svc["spec"]["selector"])
    pm = one(objs, "PodMonitor")
    # docs/contracts.md §7: trainer pods' labels and their `metrics` port.
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "kubetune",
                                                     "kubetune.io/component": "trainer"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    cluster_pm = one(render({"monitoring": {"podMonitor": {"enabled": True}}}, tmp_path), "PodMonitor")
    assert cluster_pm["spec"]["namespaceSelector"] == {"any": True}


@needs_helm
def test_service_monitor_needs_the_metrics_service(tmp_path):
    vf = tmp_path / "v.yaml"
    vf.write_text(yaml.safe_dump({"metrics": {"service": {"enabled": False}},
                                  "monitoring": {"serviceMonitor": {"enabled": True}}}))
    result = helm("template", "kt", str(CHART), "-f", str(vf), "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode != 0 and "metrics.service.enabled" in result.stderr


@needs_helm
def test_dashboard_configmap_holds_valid_dashboard_json(tmp_path):
    cm = one(render({"monitoring": {"grafanaDashboard": {"enabled": True}}}, tmp_path), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["kubetune.json"])
    assert dash["uid"] == "kubetune-overview" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


# ----------------------------------------------------------------------------- metric names
def _expr_metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(kubetune_[a-z_]+)", expr))
    # histogram series → family name
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def chart_exprs(tmp_path: Path) -> list[str]:
    objs = render({"monitoring": {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}}, tmp_path)
    rules = one(objs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    dash = json.loads(one(objs, "ConfigMap")["data"]["kubetune.json"])
    return [r["expr"] for r in rules] + [t["expr"] for p in dash["panels"] for t in p["targets"]]


@needs_helm
def test_rules_and_dashboard_use_metrics_the_operator_exports(tmp_path):
    metrics_mod = pytest.importorskip("kubetune.metrics", reason="operator metrics module (kubetune.metrics) not importable")
    registry = metrics_mod.OperatorMetrics().registry
    families = {m.name: m for m in registry.collect()}
    exported = set()
    labels: dict[str, set[str]] = {}
    for fam in families.values():
        base = fam.name
        exported.add(base + "_total" if fam.type == "counter" else base)
        for sample in fam.samples:
            labels.setdefault(re.sub(r"_(bucket|sum|count|created|total)$", "", sample.name), set()).update(sample.labels)
    # Gauges with labels have no samples until set: read their declared label names.
    for attr in vars(metrics_mod.OperatorMetrics()).values():
        if hasattr(attr, "_labelnames") and hasattr(attr, "_name"):
            labels.setdefault(attr._name, set()).update(attr._labelnames)
    used = set().union(*(_expr_metric_names(e) for e in chart_exprs(tmp_path)))
    missing = {n for n in used if n not in exported and n + "_total" not in exported and n not in families}
    assert not missing, f"chart queries metrics the operator does not export: {missing}"
    # Per-job series are joined/labelled by namespace + name in the alerts and the dashboard.
    for per_job in ("kubetune_job_train_loss", "kubetune_job_tokens_per_second", "kubetune_job_progress_ratio"):
        assert {"namespace", "name"} <= labels.get(per_job, set()), (per_job, labels.get(per_job))
    assert "phase" in labels.get("kubetune_jobs", set())
    assert "gpu_type" in labels.get("kubetune_gpus_requested", set())


# ----------------------------------------------------------------------------- promtool
def write_rules_file(tmp_path: Path) -> Path:
    """Render the chart's PrometheusRule (release/namespace kubetune, default thresholds) as a rules file."""
    objs = render({"monitoring": {"prometheusRule": {"enabled": True}}}, tmp_path, release="kubetune",
                  namespace="kubetune", show_only="templates/prometheusrule.yaml")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(one(objs, "PrometheusRule")["spec"]))
    return rules


@needs_helm
@needs_promtool
def test_promtool_check_rules(tmp_path):
    rules = write_rules_file(tmp_path)
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
    names = {r["alert"] for r in yaml.safe_load(rules.read_text())["groups"][0]["rules"]}
    assert {"KubetuneJobFailed", "KubetuneTrainingStalled", "KubetuneTrainingLossNotFinite", "KubetuneJobOverBudget",
            "KubetuneOperatorDown"} <= names


@needs_helm
@needs_promtool
def test_promtool_unit_tests_for_alerts(tmp_path):
    write_rules_file(tmp_path)
    shutil.copy(CHART / "tests" / "rules-test.yaml", tmp_path / "rules-test.yaml")
    result = subprocess.run(["promtool", "test", "rules", "rules-test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (tmp_path / "rules-test.yaml").read_text()))
    assert tested == {r["alert"] for r in yaml.safe_load((tmp_path / "rules.yaml").read_text())["groups"][0]["rules"]}


# ----------------------------------------------------------------------------- Argo CD Lua
LUA_SCRIPT = CHART / "argocd" / "health-finetunejob.lua"


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the Argo CD health script on a FineTuneJob dict; (status, message)."""
    pytest.importorskip("lupa", reason="lupa (dev extra) is not installed")
    from tests.support.finetunejobs import ARGOCD_HEALTH_SCRIPT, argocd_health as run_script

    assert ARGOCD_HEALTH_SCRIPT == LUA_SCRIPT
    return run_script(obj)


def _ftj(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    obj = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "x", "namespace": "ns", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


def _cond(ctype: str, status: str, reason: str = "R", message: str = "") -> dict[str, Any]:
    return {"type": ctype, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize("obj,expected", [
    (_ftj(1, None), "Progressing"),
    (_ftj(1, {}), "Progressing"),
    (_ftj(2, {"phase": "Succeeded", "observedGeneration": 1}), "Progressing"),
    (_ftj(1, {"phase": "Pending", "observedGeneration": 1, "conditions": [_cond("Ready", "False")]}), "Progressing"),
    (_ftj(1, {"phase": "Queued", "observedGeneration": 1}), "Progressing"),
    (_ftj(1, {"phase": "Running", "observedGeneration": 1, "progress": {"display": "40%"},
              "conditions": [_cond("Ready", "True", "PodsRunning", "1/1 trainer pod(s) running")]}), "Progressing"),
    (_ftj(1, {"phase": "Succeeded", "observedGeneration": 1, "conditions": [_cond("Ready", "True")]}), "Healthy"),
    (_ftj(3, {"phase": "Failed", "observedGeneration": 3,
              "conditions": [_cond("Failed", "True", "DataError", "bad line 7")]}), "Degraded"),
    (_ftj(1, {"phase": "Cancelled", "observedGeneration": 1}), "Degraded"),
    (_ftj(1, {"phase": "Suspended", "observedGeneration": 1}), "Suspended"),
], ids=["no-status", "empty-status", "old-generation", "pending", "queued", "running", "succeeded", "failed",
        "cancelled", "suspended"])
def test_argocd_health_script_rules(obj, expected):
    status, message = argocd_health(obj)
    assert status == expected, message
    assert message


def test_argocd_health_messages_carry_the_reason():
    _, msg = argocd_health(_ftj(3, {"phase": "Failed", "observedGeneration": 3,
                                    "conditions": [_cond("Failed", "True", "DataError", "bad line 7")]}))
    assert msg == "DataError: bad line 7"
    _, msg = argocd_health(_ftj(1, {"phase": "Running", "observedGeneration": 1, "message": "1/1 running",
                                    "progress": {"display": "40%"}}))
    assert msg == "Running: 1/1 running (40%)"
    _, msg = argocd_health(_ftj(5, {"phase": "Running", "observedGeneration": 4}))
    assert "generation 5" in msg
