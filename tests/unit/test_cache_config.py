"""The shared model cache on the operator side (docs/cache.md): chart values -> operator flags -> the pods' volume and
environment, and the preflight's cache report folded into status.preflight.cache ("none" without a cache)."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.builders import CACHE_VOLUME, BuildConfig, JobRef, build_job
from kubetune.preflight import build_preflight_job, preflight_status
from kubetune.sizing.layout import layout_from_resources

from tests.unit.test_chart_static import needs_helm, operator_container, operator_env, render

pytestmark = pytest.mark.unit

SPEC = {"model": {"uri": "hf://org/tiny"}, "dataset": {"uri": "s3://data/train.jsonl"}, "method": "lora",
        "resources": {"gpusPerPod": 0, "pods": 1}, "output": {"uri": "pvc://out/run"}}
REF = JobRef("tiny", "ns", "uid-1")


def _pod(job: dict) -> tuple[dict, dict, dict]:
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    return env, volumes, mounts


def test_without_a_cache_claim_no_pod_sees_a_cache():
    spec = parse_spec(SPEC)
    layout = layout_from_resources(spec)
    for job in (build_job(REF, spec, layout, BuildConfig()), build_preflight_job(REF, spec, layout, BuildConfig())):
        env, volumes, _ = _pod(job)
        assert CACHE_VOLUME not in volumes and not [k for k in env if k.startswith("KUBETUNE_CACHE")]


def test_trainer_pods_read_the_cache_and_only_the_preflight_writes_it():
    spec = parse_spec(SPEC)
    layout = layout_from_resources(spec)
    cfg = BuildConfig(cache_claim="model-cache", cache_max_bytes=10 * 1024**3, cache_lease_seconds=3600)
    env, volumes, mounts = _pod(build_job(REF, spec, layout, cfg))
    assert volumes[CACHE_VOLUME]["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": True}
    assert mounts[CACHE_VOLUME] == {"name": CACHE_VOLUME, "mountPath": "/var/cache/kubetune", "readOnly": True}
    assert env["KUBETUNE_CACHE_DIR"] == "/var/cache/kubetune" and env["KUBETUNE_CACHE_LEASE"] == "uid-1"
    assert "KUBETUNE_CACHE_FILL" not in env
    env, volumes, mounts = _pod(build_preflight_job(REF, spec, layout, cfg))
    assert volumes[CACHE_VOLUME]["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": False}
    assert mounts[CACHE_VOLUME]["readOnly"] is False
    assert env["KUBETUNE_CACHE_FILL"] == "true" and env["KUBETUNE_CACHE_VOLUME"] == "model-cache"
    assert env["KUBETUNE_CACHE_MAX_BYTES"] == str(10 * 1024**3) and env["KUBETUNE_CACHE_LEASE_SECONDS"] == "3600"
    assert env["KUBETUNE_CACHE_LEASE"] == "uid-1"  # the trainer finds its entries through the preflight's lease


def test_status_says_whether_and_how_the_cache_was_used():
    none = preflight_status({"cache": {"volume": "none"}}, "h", "t")
    assert none["cache"] == {"volume": "none"}
    used = preflight_status({"cache": {"volume": "model-cache", "model": "models/hf%3A%2F%2Forg%2Ftiny@abc",
                                       "dataset": "datasets/" + "a" * 64, "filled": ["models/x"], "hits": [],
                                       "evicted": 2, "bytes": 123}}, "h", "t")
    assert used["cache"] == {"volume": "model-cache", "model": "models/hf%3A%2F%2Forg%2Ftiny@abc",
                             "dataset": "datasets/" + "a" * 64, "filled": ["models/x"], "hits": [], "evicted": 2,
                             "bytes": 123}
    assert "cache" not in preflight_status({}, "h", "t")  # an older trainer image reports nothing


def test_operator_flags_configure_the_cache(monkeypatch):
    from kubetune import main

    for name in ("KUBETUNE_CACHE_CLAIM", "KUBETUNE_CACHE_MAX_GIB", "KUBETUNE_CACHE_LEASE_HOURS"):
        monkeypatch.delenv(name, raising=False)
    assert main.operator_config(main.build_parser().parse_args([])).build.cache_claim == ""
    args = main.build_parser().parse_args(["--cache-claim", "model-cache", "--cache-max-gib", "1.5",
                                           "--cache-lease-hours", "2"])
    cfg = main.operator_config(args).build
    assert (cfg.cache_claim, cfg.cache_max_bytes, cfg.cache_lease_seconds) == ("model-cache", 3 * 2**29, 7200)


@needs_helm
def test_chart_values_reach_the_operator(tmp_path, monkeypatch):
    from kubetune import main

    assert not [k for k in operator_env(render()) if k.startswith("KUBETUNE_CACHE")]  # default: no cache
    objs = render({"trainer": {"cache": {"existingClaim": "model-cache", "maxSizeGi": 500, "leaseHours": 48}}},
                  tmp_path)
    env = operator_env(objs)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = main.operator_config(main.build_parser().parse_args(operator_container(objs)["args"][1:])).build
    assert cfg.cache_claim == "model-cache" and cfg.cache_mount_path == "/var/cache/kubetune"
    assert cfg.cache_max_bytes == 500 * 1024**3 and cfg.cache_lease_seconds == 48 * 3600
