"""The preflight: a small CPU Job `<job>-preflight` that checks the model and the data before the trainer Job.

It runs `kubetune-train preflight` from the trainer image on the same plan ConfigMap the trainer reads (the plan
carries the sized layout, so the step count is the one the trainer will take), with no GPU request and modest CPU
and memory. Its termination message (JSON) becomes `status.preflight`; a bad dataset line fails the job here,
before any GPU pod exists. Pure functions: the Job builder (golden files in tests/data/builders/*/
expected-preflight.yaml) and the fold of the message into the status.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import (CACHE_VOLUME, CONTAINER, SPEC_HASH_ANNOTATION, BuildConfig, JobRef, _env,
                               _meta, _volumes, child_labels, pod_failure_policy, tolerations)
from kubetune.preflight_trace import trace_status
from kubetune.sizing.layout import Layout

COMPONENT = "preflight"


def preflight_name(job: str) -> str:
    """Name of the preflight Job."""
    return f"{job}-preflight"


def preflight_enabled(spec: FineTuneJobSpec, operator_default: bool) -> bool:
    """Whether this job runs the preflight: the operator's --preflight, unless spec.preflight.enabled says."""
    return spec.preflight.enabled if spec.preflight is not None else operator_default


def build_preflight_job(ref: JobRef, spec: FineTuneJobSpec, layout: Layout, cfg: BuildConfig,
                        *, hash_: str = "") -> dict[str, Any]:
    """batch/v1 Job `<job>-preflight`: one CPU pod running `kubetune-train preflight` on the plan ConfigMap."""
    name = preflight_name(ref.name)
    volumes, mounts = _volumes(ref, spec, layout, cfg)
    volumes = [v for v in volumes if v["name"] != "dshm"]
    mounts = [m for m in mounts if m["name"] != "dshm"]
    for volume in volumes:  # the preflight only reads
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["readOnly"] = True
    for mount in mounts:
        if mount["name"].startswith("pvc-"):
            mount["readOnly"] = True
    skip = {"KUBETUNE_NODE_RANK", "KUBETUNE_MASTER_ADDR", "KUBETUNE_MASTER_PORT", "KUBETUNE_METRICS_PORT"}
    env = [e for e in _env(ref, spec, layout, cfg) if e["name"] not in skip]
    if layout.gpus_per_pod == 0:  # the trace checks GPU memory: a CPU-only layout has none to check
        env.append({"name": "KUBETUNE_PREFLIGHT_TRACE_SKIP",
                    "value": "a CPU-only layout: no GPU memory to check the traced step against"})
    if cfg.cache_claim:  # the preflight fills the shared cache: the only writer (docs/cache.md)
        for volume in volumes:
            if volume["name"] == CACHE_VOLUME:
                volume["persistentVolumeClaim"]["readOnly"] = False
        for mount in mounts:
            if mount["name"] == CACHE_VOLUME:
                mount["readOnly"] = False
        env += [{"name": "KUBETUNE_CACHE_FILL", "value": "true"},
                {"name": "KUBETUNE_CACHE_VOLUME", "value": cfg.cache_claim},
                {"name": "KUBETUNE_CACHE_MAX_BYTES", "value": str(cfg.cache_max_bytes)},
                {"name": "KUBETUNE_CACHE_LEASE_SECONDS", "value": str(cfg.cache_lease_seconds)}]
    memory = cfg.preflight_memory
    container = {
        "name": CONTAINER,
        "image": spec.image or cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["kubetune-train", "preflight"],  # the plan from $KUBETUNE_PLAN, as the trainer reads it
        "env": env,
        "resources": {"requests": {"cpu": cfg.preflight_cpu, "memory": memory}, "limits": {"memory": memory}},
        "volumeMounts": mounts,
        "terminationMessagePath": cfg.termination_log,
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True},
    }
    cpu_layout = Layout(gpu_type="", gpus_per_pod=0, pods=1, strategy="none")
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": cfg.run_as_user,
                            "runAsGroup": cfg.run_as_user, "fsGroup": cfg.run_as_user,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if cfg.cpu_node_selector:
        pod_spec["nodeSelector"] = dict(sorted(cfg.cpu_node_selector))
    tols = tolerations(cpu_layout, cfg)
    if tols:
        pod_spec["tolerations"] = tols
    if cfg.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in cfg.image_pull_secrets]
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        "activeDeadlineSeconds": cfg.preflight_deadline_seconds,
        "template": {"metadata": {"labels": child_labels(ref.name, COMPONENT)}, "spec": pod_spec},
    }
    meta = _meta(ref, name, COMPONENT, {SPEC_HASH_ANNOTATION: hash_} if hash_ else None)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def preflight_status(report: dict[str, Any] | None, spec_hash: str, now: str) -> dict[str, Any]:
    """status.preflight from the preflight's report (the `preflight` block of its termination message)."""
    r = report or {}
    model, dataset = r.get("model") or {}, r.get("dataset") or {}
    lengths = r.get("tokenLengths") or {}
    out: dict[str, Any] = {
        "specHash": spec_hash, "completedAt": now,
        "modelRevision": str(model.get("revision") or ""), "modelType": str(model.get("modelType") or ""),
        "datasetSha256": str(dataset.get("sha256") or ""), "format": str(dataset.get("format") or ""),
        "examples": _int(r.get("examples")), "trainExamples": _int(r.get("trainExamples")),
        "evalExamples": _int(r.get("evalExamples")), "trainRows": _int(r.get("trainRows")),
        "tokensPerEpoch": _int(r.get("tokensPerEpoch")),
        "tokens": _int(r.get("tokens")), "steps": _int(r.get("steps")), "world": _int(r.get("world")),
        "maxSeqLength": _int(r.get("maxSeqLength")), "truncated": _int(r.get("truncated")),
        "duplicates": _int(r.get("duplicates")), "nearDuplicates": _int(r.get("nearDuplicates")),
        "emptyAnswers": _int(r.get("emptyAnswers")),
        "tokenLengths": {k: (float(lengths[k]) if k == "mean" else _int(lengths[k]))
                         for k in ("min", "mean", "p50", "p95", "max") if k in lengths},
    }
    if dataset.get("evalSha256"):
        out["evalDatasetSha256"] = str(dataset["evalSha256"])
    if r.get("truncatedLocations"):
        out["truncatedLocations"] = [str(x) for x in r["truncatedLocations"]][:3]
    if isinstance(r.get("cache"), dict):
        out["cache"] = cache_status(r["cache"])
    trace = trace_status(r.get("trace"))
    if trace is not None:
        out["trace"] = trace
    if not report:
        out["display"] = "validated (the preflight reported no figures)"
    else:
        out["display"] = (f"{out['examples']} examples, {out['tokens']:,} tokens, {out['steps']} steps"
                          + (f", {out['truncated']} truncated" if out["truncated"] else "")
                          + (f", traced peak {trace['peakGiB']} GiB per GPU" if trace and "peakGiB" in trace else ""))
    return out


def cache_status(block: dict[str, Any]) -> dict[str, Any]:
    """status.preflight.cache from the preflight's `cache` block: {"volume": "none"} without a cache."""
    out: dict[str, Any] = {"volume": str(block.get("volume") or "none")}
    if out["volume"] == "none":
        return out
    for key in ("model", "dataset"):
        if block.get(key):
            out[key] = str(block[key])
    for key in ("filled", "hits"):
        out[key] = [str(x) for x in (block.get(key) or [])][:4]
    out["evicted"] = _int(block.get("evicted"))
    out["bytes"] = _int(block.get("bytes"))
    return out


def validated_for(status: dict[str, Any], spec_hash: str) -> bool:
    """Whether the preflight already validated this spec (status.preflight of the same spec hash)."""
    return ((status or {}).get("preflight") or {}).get("specHash") == spec_hash
