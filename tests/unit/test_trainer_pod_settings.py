"""Operator-wide trainer pod settings (the chart's `trainer` values): pull policy, pull secrets, extra
tolerations and the GPU/CPU nodeSelector, from the operator's flags and env to the rendered trainer Job."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import main
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_job
from kubetune.sizing.layout import GPU_PRODUCT_LABEL, Layout, layout_from_resources

pytestmark = pytest.mark.unit

CASES_DIR = Path(__file__).resolve().parents[1] / "data" / "builders"
BASE = BuildConfig(image="registry.example/kubetune-trainer:test")


def pod_spec(case: str, cfg: BuildConfig) -> dict[str, Any]:
    """The trainer pod template spec of a golden-file case rendered with cfg."""
    data = yaml.safe_load((CASES_DIR / case / "input.yaml").read_text())
    meta = data["metadata"]
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"], meta.get("labels") or {})
    spec = parse_spec(data["spec"])
    if data["layout"] == "fromSpec":
        layout = layout_from_resources(spec)
    else:
        lay = data["layout"]
        layout = Layout(gpu_type=lay["gpuType"], gpus_per_pod=lay["gpusPerPod"], pods=lay["pods"],
                        strategy=lay["strategy"], node_selector=lay.get("nodeSelector", {}))
    return build_job(ref, spec, layout, cfg)["spec"]["template"]["spec"]


GPU_CASE = "lora-8b-l4-secrets"  # one L4 GPU, layout nodeSelector nvidia.com/gpu.product=NVIDIA-L4
CPU_CASE = "cpu-quickstart"


def test_defaults_add_no_pull_secrets_and_keep_if_not_present():
    for case in (GPU_CASE, CPU_CASE):
        pod = pod_spec(case, BASE)
        assert "imagePullSecrets" not in pod
        assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"


def test_pull_policy_and_secrets_reach_the_trainer_pod():
    cfg = dataclasses.replace(BASE, image_pull_policy="Always", image_pull_secrets=("regcred", "mirror"))
    for case in (GPU_CASE, CPU_CASE):
        pod = pod_spec(case, cfg)
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
        assert pod["containers"][0]["imagePullPolicy"] == "Always"


def test_gpu_node_selector_applies_to_gpu_pods_only_and_the_layout_wins():
    cfg = dataclasses.replace(BASE, gpu_node_selector=(("pool", "gpu"), (GPU_PRODUCT_LABEL, "NVIDIA-A100")),
                              cpu_node_selector=(("pool", "cpu"),))
    gpu = pod_spec(GPU_CASE, cfg)
    # The sizer's GPU product is job-specific: an operator-wide default never overrides it.
    assert gpu["nodeSelector"] == {"pool": "gpu", GPU_PRODUCT_LABEL: "NVIDIA-L4"}
    assert list(gpu["nodeSelector"]) == sorted(gpu["nodeSelector"])
    assert pod_spec(CPU_CASE, cfg)["nodeSelector"] == {"pool": "cpu"}


def test_extra_tolerations_follow_the_gpu_toleration():
    extra = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    cfg = dataclasses.replace(BASE, extra_tolerations=(extra,))
    assert pod_spec(GPU_CASE, cfg)["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, extra]
    assert pod_spec(CPU_CASE, cfg)["tolerations"] == [extra]


# ----------------------------------------------------------------------------- flags and env
def build_config(argv: list[str]) -> BuildConfig:
    return main.operator_config(main.build_parser().parse_args(argv)).build


def test_flags_reach_build_config():
    cfg = build_config(["--trainer-image", "r.example/t@sha256:" + "b" * 64, "--trainer-image-pull-policy", "Never",
                        "--trainer-image-pull-secrets", "regcred, mirror ,", "--gpu-node-selector", "pool=gpu,tier=a",
                        "--extra-tolerations", '[{"key": "k", "operator": "Exists"}]'])
    assert cfg.image == "r.example/t@sha256:" + "b" * 64
    assert cfg.image_pull_policy == "Never"
    assert cfg.image_pull_secrets == ("regcred", "mirror")
    assert cfg.gpu_node_selector == (("pool", "gpu"), ("tier", "a"))
    assert cfg.extra_tolerations == ({"key": "k", "operator": "Exists"},)


def test_env_reaches_build_config(monkeypatch):
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE_PULL_POLICY", "Always")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE_PULL_SECRETS", "regcred")
    monkeypatch.setenv("KUBETUNE_GPU_NODE_SELECTOR", "pool=gpu")
    cfg = build_config([])
    assert (cfg.image_pull_policy, cfg.image_pull_secrets, cfg.gpu_node_selector) == (
        "Always", ("regcred",), (("pool", "gpu"),))


def test_defaults_match_build_config(monkeypatch):
    for name in ("KUBETUNE_TRAINER_IMAGE_PULL_POLICY", "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS",
                 "KUBETUNE_GPU_NODE_SELECTOR", "KUBETUNE_TRAINER_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    cfg = build_config([])
    default = BuildConfig()
    assert (cfg.image, cfg.image_pull_policy, cfg.image_pull_secrets, cfg.gpu_node_selector) == (
        default.image, default.image_pull_policy, (), ())


@pytest.mark.parametrize("argv,needle", [
    (["--gpu-node-selector", "pool"], "--gpu-node-selector: 'pool' is not key=value"),
    (["--gpu-node-selector", "=gpu"], "--gpu-node-selector: '=gpu' is not key=value"),
])
def test_bad_gpu_node_selector_is_refused(argv, needle):
    with pytest.raises(SystemExit, match=needle):
        build_config(argv)


def test_bad_pull_policy_is_refused(capsys):
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["--trainer-image-pull-policy", "Sometimes"])
    assert "Sometimes" in capsys.readouterr().err
