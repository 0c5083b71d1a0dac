"""The StorageClass variant of the shared cache (docs/cache.md): the claim the operator creates (golden file), what a
claim that is not bound tells a waiting job, the operator flags, and the chart values and RBAC that configure it.

Set KUBETUNE_UPDATE_GOLDEN=1 to rewrite tests/data/cache_claim/expected.yaml after an intended rendering change."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.builders import BuildConfig
from kubetune.cache_claim import KnownClaims, build_cache_claim, claim_not_ready_message

from tests.unit.test_chart_static import helm, needs_helm, operator_container, operator_env, render
from tests.unit.test_preflight_flow import cond, observed, pod, preflight_job, run

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "cache_claim" / "expected.yaml"
MANAGED = BuildConfig(cache_claim="kubetune-cache", cache_storage_class="nfs-rwx", cache_size_gib=500)


def test_the_claim_matches_golden():
    rendered = build_cache_claim("team-a", MANAGED)
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(yaml.safe_dump(rendered, sort_keys=True, default_flow_style=False))
    assert GOLDEN.exists(), f"{GOLDEN} missing: run with KUBETUNE_UPDATE_GOLDEN=1 to create it"
    assert rendered == yaml.safe_load(GOLDEN.read_text()), "the cache claim's rendering changed"


def test_the_claim_outlives_jobs_and_says_whose_it_is():
    claim = build_cache_claim("team-a", MANAGED)
    meta = claim["metadata"]
    assert "ownerReferences" not in meta  # no FineTuneJob owns it: the garbage collector never takes it
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/component": "model-cache"}
    assert "kubetune.io/job-name" not in meta["labels"]
    assert (meta["name"], meta["namespace"]) == ("kubetune-cache", "team-a")
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs-rwx",
                             "resources": {"requests": {"storage": "500Gi"}}}
    rwo = dataclasses.replace(MANAGED, cache_access_modes=("ReadWriteOnce",), cache_size_gib=1)
    assert build_cache_claim("b", rwo)["spec"]["accessModes"] == ["ReadWriteOnce"]
    with pytest.raises(ValueError):
        build_cache_claim("team-a", BuildConfig(cache_claim="model-cache"))  # an existing claim is never created


def test_a_claim_that_is_not_bound_is_named_with_what_it_needs():
    claim = build_cache_claim("team-a", MANAGED)
    pending = claim_not_ready_message({**claim, "status": {"phase": "Pending"}}, MANAGED)
    assert "'kubetune-cache' is Pending" in pending and "StorageClass nfs-rwx, 500Gi, ReadWriteMany" in pending
    assert claim_not_ready_message({**claim, "status": {"phase": "Bound"}}, MANAGED) == ""
    assert "is Lost" in claim_not_ready_message({**claim, "status": {"phase": "Lost"}}, MANAGED)
    assert "operator creates it (StorageClass nfs-rwx)" in claim_not_ready_message(None, MANAGED)
    existing = BuildConfig(cache_claim="model-cache")
    assert "does not exist in this namespace: create it" in claim_not_ready_message(None, existing)


def test_a_preflight_waiting_for_the_cache_claim_says_so_with_a_warning():
    unscheduled = pod("Pending")
    unscheduled["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                            "message": "0/3 nodes are available: pod has unbound immediate "
                                                       "PersistentVolumeClaims."}]
    obs = observed(preflight_job([]), [unscheduled])
    obs.cache_claim_wait = "the cache claim 'kubetune-cache' is Pending: no PersistentVolume is bound to it"
    d = run(obs, {"phase": "Preparing", "reason": R.PREFLIGHT_RUNNING})
    assert d.status["phase"] == "Preparing" and d.status["reason"] == R.CACHE_CLAIM_NOT_BOUND
    assert obs.cache_claim_wait in d.status["message"]
    assert cond(d.status, C.VALIDATED)["reason"] == R.CACHE_CLAIM_NOT_BOUND
    assert [(e[0], e[1]) for e in d.events] == [("Warning", R.CACHE_CLAIM_NOT_BOUND)]
    obs.cache_claim_wait = ""  # bound: the scheduler's own words again, no warning
    d = run(obs, d.status)
    assert d.status["reason"] == R.PREFLIGHT_RUNNING and "unbound immediate" in d.status["message"]


def _flags(*argv: str) -> BuildConfig:
    from kubetune import main

    return main.operator_config(main.build_parser().parse_args(list(argv))).build


def test_operator_flags_configure_the_claim_it_creates(monkeypatch):
    for name in ("KUBETUNE_CACHE_CLAIM", "KUBETUNE_CACHE_STORAGE_CLASS", "KUBETUNE_CACHE_SIZE_GIB",
                 "KUBETUNE_CACHE_ACCESS_MODES"):
        monkeypatch.delenv(name, raising=False)
    assert (_flags().cache_claim, _flags().cache_storage_class) == ("", "")
    existing = _flags("--cache-claim", "model-cache", "--cache-size-gib", "7")  # size only with a StorageClass
    assert (existing.cache_claim, existing.cache_storage_class, existing.cache_size_gib) == ("model-cache", "", 100)
    cfg = _flags("--cache-storage-class", "nfs-rwx", "--cache-size-gib", "250")
    assert (cfg.cache_claim, cfg.cache_storage_class, cfg.cache_size_gib, cfg.cache_access_modes) == (
        "kubetune-cache", "nfs-rwx", 250, ("ReadWriteMany",))
    cfg = _flags("--cache-storage-class", "rwo", "--cache-claim", "my-cache", "--cache-access-modes",
                 "ReadWriteOnce, ReadOnlyMany")
    assert (cfg.cache_claim, cfg.cache_access_modes) == ("my-cache", ("ReadWriteOnce", "ReadOnlyMany"))
    for bad in (["--cache-access-modes", "ReadWriteAll"], ["--cache-access-modes", ","], ["--cache-size-gib", "0"]):
        with pytest.raises(SystemExit):
            _flags("--cache-storage-class", "nfs-rwx", *bad)


def _pvc_rules(role: dict) -> list[dict]:
    return [r for r in role["rules"] if "persistentvolumeclaims" in r["resources"]]


@needs_helm
def test_chart_values_create_the_claim_with_rbac_to_do_it(tmp_path, monkeypatch):
    from kubetune import main

    assert not _pvc_rules(next(o for o in render() if o["kind"] == "ClusterRole"))  # no cache: no claim access
    values = {"trainer": {"cache": {"storageClass": "nfs-rwx", "sizeGi": 300}}}
    objs = render(values, tmp_path)
    env = operator_env(objs)
    assert (env["KUBETUNE_CACHE_CLAIM"], env["KUBETUNE_CACHE_STORAGE_CLASS"], env["KUBETUNE_CACHE_SIZE_GIB"],
            env["KUBETUNE_CACHE_ACCESS_MODES"]) == ("kubetune-cache", "nfs-rwx", "300", "ReadWriteMany")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = main.operator_config(main.build_parser().parse_args(operator_container(objs)["args"][1:])).build
    assert (cfg.cache_claim, cfg.cache_storage_class, cfg.cache_size_gib, cfg.cache_access_modes) == (
        "kubetune-cache", "nfs-rwx", 300, ("ReadWriteMany",))
    role = next(o for o in objs if o["kind"] == "ClusterRole")
    assert _pvc_rules(role) == [{"apiGroups": [""], "resources": ["persistentvolumeclaims"],
                                 "verbs": ["get", "create"]}]  # never update or delete: the cache outlives jobs
    namespaced = render({**values, "watchNamespaces": ["team-a", "team-b"]}, tmp_path)
    roles = [o for o in namespaced if o["kind"] == "Role" and o["metadata"]["name"] == "kt-kubetune"]
    assert len(roles) == 2 and all(_pvc_rules(r)[0]["verbs"] == ["get", "create"] for r in roles)
    existing = render({"trainer": {"cache": {"existingClaim": "model-cache"}}}, tmp_path)
    assert _pvc_rules(next(o for o in existing if o["kind"] == "ClusterRole"))[0]["verbs"] == ["get"]
    assert "KUBETUNE_CACHE_STORAGE_CLASS" not in operator_env(existing)


@needs_helm
def test_chart_rejects_both_an_existing_claim_and_a_storage_class(tmp_path):
    vf = tmp_path / "both.yaml"
    vf.write_text(yaml.safe_dump({"trainer": {"cache": {"existingClaim": "c", "storageClass": "nfs"}}}))
    from tests.unit.test_chart_static import CHART, KUBE_VERSION

    def template() -> tuple[int, str]:
        result = helm("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(vf), check=False)
        return result.returncode, result.stderr

    code, err = template()
    assert code != 0 and "set existingClaim (a claim you created) or storageClass" in err, err
    vf.write_text(yaml.safe_dump({"trainer": {"cache": {"storageClass": "nfs", "accessModes": ["Sometimes"]}}}))
    code, err = template()
    assert code != 0 and "accessModes" in err, err  # the schema says no
    vf.write_text(yaml.safe_dump({"trainer": {"cache": {"storageClass": "nfs", "accessModes": ["ReadWriteOnce"]}}}))
    assert template()[0] == 0


def test_the_claim_is_checked_once_per_namespace_until_found_missing():
    asked: list[str] = []
    claims = KnownClaims(asked.append)
    for ns in ("team-a", "team-a", "team-b", "team-a"):  # a preflight Job and a trainer Job per FineTuneJob
        claims.ensure(ns)
    assert asked == ["team-a", "team-b"]
    claims.forget("team-a")  # a waiting preflight found it deleted
    claims.ensure("team-a")
    claims.ensure("team-a")
    assert asked == ["team-a", "team-b", "team-a"]


def test_a_refused_claim_is_asked_for_again():
    asked: list[str] = []

    def refuse(ns: str) -> None:
        asked.append(ns)
        raise RuntimeError("forbidden")

    claims = KnownClaims(refuse)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            claims.ensure("team-a")
    assert asked == ["team-a", "team-a"]
