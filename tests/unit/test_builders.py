"""Golden-file tests of the child builders: tests/data/builders/<case>/input.yaml → expected.yaml.

Set KUBETUNE_UPDATE_GOLDEN=1 to rewrite the expected files after an intended rendering change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from kubetune.api import parse_spec
from kubetune.builders import (BuildConfig, JobRef, build_children, build_job, build_plan, spec_hash)
from kubetune.sizing.layout import Layout, layout_from_resources

pytestmark = pytest.mark.unit

CASES_DIR = Path(__file__).resolve().parents[1] / "data" / "builders"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "input.yaml").exists())
CONFIG = BuildConfig(image="registry.example/kubetune-trainer:test")


def case_config(data: dict) -> BuildConfig:
    """CONFIG with the case's `buildConfig` (BuildConfig field names) applied, e.g. a cache claim."""
    return dataclasses.replace(CONFIG, **(data.get("buildConfig") or {}))


class _GoldenDumper(yaml.SafeDumper):
    """Writes multi-line strings (plan.json) as literal blocks so golden diffs stay readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_GoldenDumper.add_representer(str, _str_representer)


def _render(case: str) -> list[dict]:
    data = yaml.safe_load((CASES_DIR / case / "input.yaml").read_text())
    meta = data["metadata"]
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"], meta.get("labels") or {})
    spec = parse_spec(data["spec"])
    if data["layout"] == "fromSpec":
        layout = layout_from_resources(spec)
    else:
        lay = data["layout"]
        layout = Layout(gpu_type=lay["gpuType"], gpus_per_pod=lay["gpusPerPod"], pods=lay["pods"],
                        strategy=lay["strategy"], zero_stage=lay.get("zeroStage", 0),
                        node_selector=lay.get("nodeSelector", {}))
    return build_children(ref, data["spec"], spec, layout, case_config(data))


@pytest.mark.parametrize("case", CASES)
def test_children_match_golden(case: str) -> None:
    rendered = _render(case)
    expected_path = CASES_DIR / case / "expected.yaml"
    text = yaml.dump_all(rendered, Dumper=_GoldenDumper, sort_keys=True, default_flow_style=False)
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        expected_path.write_text(text)
    assert expected_path.exists(), f"{expected_path} missing: run with KUBETUNE_UPDATE_GOLDEN=1 to create it"
    expected = list(yaml.safe_load_all(expected_path.read_text()))
    assert rendered == expected, f"rendering of {case} changed; rerun with KUBETUNE_UPDATE_GOLDEN=1 if intended"


def _job(case: str) -> dict:
    return next(c for c in _render(case) if c["kind"] == "Job")


def _env(job: dict) -> dict:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("case", CASES)
def test_job_invariants(case: str) -> None:
    """Properties every rendered Job must have, independent of the golden files."""
    job = _job(case)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 1
    children = _render(case)
    services = [c for c in children if c["kind"] == "Service"]
    if spec["completions"] > 1:  # pods rendezvous at pod 0 through the headless Service
        assert pod["subdomain"] == job["metadata"]["name"] == services[0]["metadata"]["name"]
        assert services[0]["spec"]["clusterIP"] == "None"
        assert _env(job)["KUBETUNE_MASTER_ADDR"]["value"].startswith(f"{job['metadata']['name']}-0.")
    else:  # one pod: no Service, the trainer's processes meet on localhost
        assert "subdomain" not in pod and services == []
        assert _env(job)["KUBETUNE_MASTER_ADDR"]["value"] == "127.0.0.1"
    assert [c["kind"] for c in children] == ["ConfigMap", *(["Service"] if services else []), "Job"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["terminationMessagePolicy"] == "File"
    env = _env(job)
    assert env["KUBETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["KUBETUNE_NUM_NODES"]["value"] == str(spec["completions"])
    for item in env.values():  # secrets only by reference
        assert "secret" not in json.dumps(item.get("value", "")).lower()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/kubetune"] == "plan" and mounts["/dev/shm"] == "dshm"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["controller"] is True


def test_gpu_job_has_limits_selector_tolerations() -> None:
    job = _job("qlora-70b-one-h100")
    pod = job["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = _env(job)
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert not any(v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v)


def test_cpu_job_has_no_gpu_and_mounts_claim() -> None:
    job = _job("cpu-quickstart")
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod and "nodeSelector" not in pod
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "kubetune-demo", "readOnly": False}]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["pvc-kubetune-demo"] == "/mnt/pvc/kubetune-demo"


def test_multinode_claims_readonly_except_output_and_kueue_suspends() -> None:
    job = _job("multinode-zero3-kueue")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    assert job["spec"]["activeDeadlineSeconds"] == 172800 and job["spec"]["backoffLimit"] == 6
    pod = job["spec"]["template"]["spec"]
    ro = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
          for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert ro == {"datasets": True, "eval-sets": True, "outputs": False}
    env = _env(job)
    assert env["KUBETUNE_PROCS_PER_NODE"]["value"] == "8"
    assert env["KUBETUNE_MASTER_ADDR"]["value"] == "big-trainer-0.big-trainer.research.svc"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


def test_plan_matches_contract() -> None:
    data = yaml.safe_load((CASES_DIR / "multinode-zero3-kueue" / "input.yaml").read_text())
    spec = parse_spec(data["spec"])
    ref = JobRef("big", "research", "uid-1")
    plan = build_plan(ref, spec, layout_from_resources(spec))
    assert set(plan) == {"version", "job", "model", "dataset", "method", "lora", "quantization",
                         "training", "distributed", "output"}
    assert plan["version"] == 1 and plan["lora"] is None and plan["quantization"] is None
    assert plan["training"]["learningRate"] == pytest.approx(5e-6)
    assert plan["training"]["epochs"] == 0 and plan["training"]["maxSteps"] == 2000
    assert plan["distributed"] == {"strategy": "deepspeed", "zeroStage": 3, "offloadOptimizer": True,
                                   "offloadParams": False, "numNodes": 2, "procsPerNode": 8}


def test_spec_hash_ignores_lifecycle_fields_only() -> None:
    data = yaml.safe_load((CASES_DIR / "cpu-quickstart" / "input.yaml").read_text())
    spec = parse_spec(data["spec"])
    layout = layout_from_resources(spec)
    base = spec_hash(data["spec"])
    assert spec_hash({**data["spec"], "suspend": True, "ttlSecondsAfterFinished": 5, "cancel": True}) == base
    assert spec_hash({**data["spec"], "backoffLimit": 9}) != base
    job = build_job(JobRef("quickstart", "demo", "u"), spec, layout, CONFIG, hash_=base)
    assert job["metadata"]["annotations"]["kubetune.io/spec-hash"] == base
