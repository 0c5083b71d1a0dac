"""Pure renderers: FineTuneJob spec + layout → plan JSON, ConfigMap, headless Service, Indexed Job."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from typing import Any

from kubetune import API_GROUP, API_VERSION, KIND, reasons
from kubetune.api import Divergence, FineTuneJobSpec, pvc_claim
from kubetune.grace import termination_grace_seconds
from kubetune.sizing.layout import Layout

PLAN_VERSION = 1
PLAN_DIR = "/etc/kubetune"
PLAN_KEY = "plan.json"
METRICS_PORT = 9090
RENDEZVOUS_PORT = 29500
CONTAINER = "trainer"
CACHE_VOLUME = "model-cache"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
SPEC_HASH_ANNOTATION = f"{API_GROUP}/spec-hash"
LAYOUT_ANNOTATION = f"{API_GROUP}/layout"
JOB_NAME_LABEL = f"{API_GROUP}/job-name"
COMPONENT_LABEL = f"{API_GROUP}/component"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune"}
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Spec fields that do not change what the trainer runs (so they are not part of the spec hash).
LIFECYCLE_FIELDS = ("suspend", "cancel", "ttlSecondsAfterFinished", "preflight")
# spec.training fields added after the first release, with their defaults. The plan carries them only when they
# differ, so plans of jobs that do not use them stay readable by older trainer images (which reject unknown keys).
SPEED_FIELD_DEFAULTS: dict[str, Any] = {"attentionImplementation": "auto", "torchCompile": False,
                                        "ligerKernels": False, "masterWeights": "auto", "optimizerInBackward": None,
                                        "activationOffloading": False,
                                        # settings other trainers' configs carry (docs/contracts.md §2)
                                        "warmupSteps": None, "checkpointStrategy": "steps", "keepCheckpoints": 2,
                                        "logEverySteps": 0}
# spec.dataset fields added after the first release, written to the plan only when set (same reason).
DATASET_FIELD_DEFAULTS: dict[str, Any] = {"chatTemplate": "", "promptTemplate": None}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Operator-wide settings the builders need (from the operator's flags/env)."""

    image: str = "ghcr.io/kubetune/trainer:0.1.0"
    pvc_root: str = "/mnt/pvc"
    work_dir: str = "/var/lib/kubetune"
    termination_log: str = "/dev/termination-log"
    cpu_per_gpu: str = "4"
    memory_per_gpu_gi: int = 32
    cpu_only_cpu: str = "2"
    cpu_only_memory: str = "4Gi"
    run_as_user: int = 1000
    extra_tolerations: tuple[dict[str, Any], ...] = ()
    cpu_node_selector: tuple[tuple[str, str], ...] = ()  # nodeSelector for CPU-only runs (e.g. process nodes)
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()  # Secret names for pulling the trainer image (imagePullSecrets)
    gpu_node_selector: tuple[tuple[str, str], ...] = ()  # nodeSelector for GPU runs (the layout's own keys win)
    # terminationGracePeriodSeconds = this (the step in flight, shutdown) + one checkpoint at the write rate below
    termination_grace_base_seconds: int = 60
    checkpoint_write_bytes_per_second: int = 100 * 1024 * 1024
    # the CPU preflight pod (kubetune.preflight): tokenizer + dataset in memory, no GPU
    preflight_cpu: str = "1"
    preflight_memory: str = "4Gi"
    preflight_deadline_seconds: int = 3600
    # the shared model/dataset cache (docs/cache.md): an existing ReadWriteMany claim in each job's namespace, filled
    # by the preflight (read-write) and mounted read-only by trainer pods; "" = no cache, every pod downloads
    cache_claim: str = ""
    cache_mount_path: str = "/var/cache/kubetune"
    cache_max_bytes: int = 0  # size cap enforced by the preflight's eviction (0: none)
    cache_lease_seconds: int = 7 * 24 * 3600  # how long a job's lease keeps its entries from eviction
    # the StorageClass variant (kubetune.cache_claim): the operator creates `cache_claim` in a job's namespace when
    # it is missing, of this StorageClass, size and access modes; "" = the claim exists already
    cache_storage_class: str = ""
    cache_size_gib: int = 100
    cache_access_modes: tuple[str, ...] = ("ReadWriteMany",)


@dataclasses.dataclass(frozen=True)
class JobRef:
    """Identity of the FineTuneJob that owns the children."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


def plan_name(job: str) -> str:
    """ConfigMap name for a job."""
    return f"{job}-plan"


def trainer_name(job: str) -> str:
    """Service and Job name for a job."""
    return f"{job}-trainer"


def master_addr(job: str, namespace: str) -> str:
    """DNS name of pod index 0 through the headless Service."""
    return f"{trainer_name(job)}-0.{trainer_name(job)}.{namespace}.svc"


def needs_service(layout: Layout) -> bool:
    """Only a multi-pod run rendezvouses over the network and needs the headless Service; one pod talks
    to itself on 127.0.0.1. (A Service per single-pod job cost the cluster an Endpoints and an
    EndpointSlice object and their updates: ~4 of the ~15 apiserver writes per job in a burst.)"""
    return layout.pods > 1


def child_labels(job: str, component: str) -> dict[str, str]:
    """Labels of every child (docs/contracts.md §7)."""
    return {**MANAGED_BY, JOB_NAME_LABEL: job, COMPONENT_LABEL: component}


def owner_reference(ref: JobRef) -> dict[str, Any]:
    """Controller owner reference to the FineTuneJob (children are garbage-collected with it)."""
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": ref.name,
            "uid": ref.uid, "controller": True, "blockOwnerDeletion": True}


def _meta(ref: JobRef, name: str, component: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ref.namespace,
                            "labels": child_labels(ref.name, component),
                            "ownerReferences": [owner_reference(ref)]}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def spec_hash(spec: dict[str, Any]) -> str:
    """Short hash of the run-defining spec fields (lifecycle fields excluded): a change means a new Job."""
    run = {k: v for k, v in spec.items() if k not in LIFECYCLE_FIELDS}
    payload = json.dumps(run, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_plan(ref: JobRef, spec: FineTuneJobSpec, layout: Layout,
               memory_replans: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The training plan JSON (docs/contracts.md §2); the last of `memory_replans` (status.memoryReplans, written
    after the trainer ran out of GPU memory: kubetune.oom) overrides the micro batch, accumulation and
    gradient checkpointing."""
    training = spec.training.dump()
    if memory_replans:
        training.update(memory_replans[-1].get("training") or {})
    training["learningRate"] = float(spec.training.learning_rate)
    for key, default in SPEED_FIELD_DEFAULTS.items():
        if training.get(key) == default:
            del training[key]  # only the speed features a job asks for (older trainer images reject the keys)
    if training.get("divergence") == Divergence().dump():
        del training["divergence"]  # the trainer's defaults; only a changed setting travels (older images reject it)
    if spec.training.max_steps > 0:
        training["epochs"] = 0
    if spec.training.warmup_steps is not None:
        del training["warmupRatio"]  # warmup is given in steps (exactly one of the two)
    dataset = {"uri": spec.dataset.uri, "format": spec.dataset.format, "evalUri": spec.dataset.eval_uri,
               "evalSplit": spec.dataset.eval_split}
    for key, default in DATASET_FIELD_DEFAULTS.items():
        value = spec.dataset.dump()[key]
        if value != default:
            dataset[key] = value
    lora = spec.effective_lora()
    effective_quant = spec.effective_quantization()  # qlora without a block gets the defaults, as the sizer
    quant = effective_quant.dump() if effective_quant is not None else None
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "job": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
        "model": {"uri": spec.model.uri, "trustRemoteCode": spec.model.trust_remote_code},
        "dataset": dataset,
        "method": spec.method,
        "lora": lora.dump() if lora is not None else None,
        "quantization": quant,
        "training": training,
        "distributed": layout.distributed(),
        "output": {"uri": spec.output.uri, "mergeAdapter": spec.output.merge_adapter},
    }
    if spec.evaluation is not None:  # only when asked for: older trainer images reject the key
        plan["evaluation"] = spec.evaluation.dump()
    if spec.tracking is not None and (spec.tracking.mlflow or spec.tracking.wandb):  # same rule; keys stay in Secrets
        mlflow, wandb = spec.tracking.mlflow, spec.tracking.wandb
        tracking: dict[str, Any] = {}
        if mlflow is not None:
            tracking["mlflow"] = {"trackingUri": mlflow.tracking_uri, "experiment": mlflow.experiment,
                                  "runName": mlflow.run_name or ref.name}
        if wandb is not None:
            tracking["wandb"] = {"project": wandb.project, "entity": wandb.entity,
                                 "runName": wandb.run_name or ref.name, "mode": wandb.mode}
        plan["tracking"] = {**tracking, "required": spec.tracking.required}
    if spec.output.export is not None:  # the same rule
        plan["output"]["export"] = spec.output.export.dump()
    return plan


def build_configmap(ref: JobRef, spec: FineTuneJobSpec, layout: Layout,
                    memory_replans: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """ConfigMap `<job>-plan` holding plan.json."""
    plan = build_plan(ref, spec, layout, memory_replans)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(ref, plan_name(ref.name), "plan"),
            "data": {PLAN_KEY: json.dumps(plan, indent=2, sort_keys=True) + "\n"}}


def build_service(ref: JobRef) -> dict[str, Any]:
    """Headless Service `<job>-trainer` giving pods stable DNS names for rendezvous."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(ref, trainer_name(ref.name), "trainer"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {JOB_NAME_LABEL: ref.name, COMPONENT_LABEL: "trainer"},
                     "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
                               {"name": "rendezvous", "port": RENDEZVOUS_PORT,
                                "targetPort": RENDEZVOUS_PORT}]}}


def shm_size(layout: Layout) -> str:
    """Size of the /dev/shm memory volume: 2Gi per GPU process (NCCL, dataloaders), 512Mi on CPU."""
    return f"{2 * layout.gpus_per_pod}Gi" if layout.gpus_per_pod > 0 else "512Mi"


def host_memory_gi(layout: Layout, cfg: BuildConfig) -> int:
    """Host RAM a GPU pod requests: memory_per_gpu_gi per GPU, plus, with CPU offload (optimizer states,
    parameters, activations), the sizer's estimate of what is offloaded and 10% (the sizer refused layouts
    whose nodes lack it). A DeepSpeed offload layout pinned by spec.resources has no estimate: twice the
    per-GPU amount, as before."""
    base = cfg.memory_per_gpu_gi * layout.gpus_per_pod
    if layout.host_offload_bytes:
        return base + math.ceil(layout.host_offload_bytes * 1.1 / 1024**3)
    if not (layout.offload_optimizer or layout.offload_params):
        return base
    return 2 * base


def pod_resources(spec: FineTuneJobSpec, layout: Layout, cfg: BuildConfig) -> dict[str, Any]:
    """Container requests/limits: spec.resources cpu/memory or per-GPU defaults; GPUs as limits."""
    gpus = layout.gpus_per_pod
    if gpus > 0:
        cpu = spec.resources.cpu or str(int(float(cfg.cpu_per_gpu) * gpus))
        memory = spec.resources.memory or f"{host_memory_gi(layout, cfg)}Gi"
    else:
        cpu = spec.resources.cpu or cfg.cpu_only_cpu
        memory = spec.resources.memory or cfg.cpu_only_memory
    requests = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if gpus > 0:
        requests["nvidia.com/gpu"] = str(gpus)
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _env(ref: JobRef, spec: FineTuneJobSpec, layout: Layout, cfg: BuildConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_PLAN", "value": f"{PLAN_DIR}/{PLAN_KEY}"},
        {"name": "KUBETUNE_PVC_ROOT", "value": cfg.pvc_root},
        {"name": "KUBETUNE_WORK_DIR", "value": cfg.work_dir},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": cfg.termination_log},
        {"name": "KUBETUNE_NUM_NODES", "value": str(layout.pods)},
        # The pod's CPU request (rounded up): the trainer sizes its CPU thread pool to it, not to the host's cores
        # (kubetune_trainer.threads.cpu_threads), so pods on large nodes do not oversubscribe their share.
        {"name": "KUBETUNE_CPUS", "valueFrom": {"resourceFieldRef": {"containerName": CONTAINER,
                                                                     "resource": "requests.cpu", "divisor": "1"}}},
        {"name": "KUBETUNE_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "KUBETUNE_PROCS_PER_NODE", "value": str(layout.procs_per_node)},
        {"name": "KUBETUNE_MASTER_ADDR",
         "value": master_addr(ref.name, ref.namespace) if needs_service(layout) else "127.0.0.1"},
        {"name": "KUBETUNE_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "KUBETUNE_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "HF_HOME", "value": f"{cfg.work_dir}/hf"},
        {"name": "HOME", "value": f"{cfg.work_dir}/home"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if cfg.cache_claim:  # trainer pods read the entries their preflight's lease names (kubetune_trainer.cache)
        env += [{"name": "KUBETUNE_CACHE_DIR", "value": cfg.cache_mount_path},
                {"name": "KUBETUNE_CACHE_LEASE", "value": ref.uid}]
    hf = spec.secrets.hf_token_secret_ref
    if hf.name:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf.name, "key": hf.key}}})
    s3 = spec.secrets.s3_credentials_secret_ref
    if s3.name:
        for key, optional in (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                              ("AWS_ENDPOINT_URL", True)):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {
                "name": s3.name, "key": key, "optional": optional}}})
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is not None and mlflow.credentials_secret_ref is not None and mlflow.credentials_secret_ref.name:
        for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {
                "name": mlflow.credentials_secret_ref.name, "key": key, "optional": True}}})
    wandb = spec.tracking.wandb if spec.tracking is not None else None
    if wandb is not None and wandb.api_key_secret_ref is not None:
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": wandb.api_key_secret_ref.name, "key": wandb.api_key_secret_ref.key}}})
    return env


def _volumes(ref: JobRef, spec: FineTuneJobSpec, layout: Layout,
             cfg: BuildConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "plan", "configMap": {"name": plan_name(ref.name)}},
        {"name": "work", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(layout)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
        {"name": "work", "mountPath": cfg.work_dir},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    output_claim = pvc_claim(spec.output.uri) if spec.output.uri.startswith("pvc://") else None
    for claim in spec.pvc_claims():
        read_only = claim != output_claim
        volumes.append({"name": f"pvc-{claim}"[:63],
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{cfg.pvc_root}/{claim}",
                       "readOnly": read_only})
    if cfg.cache_claim:  # read-only here; the preflight builder makes it writable for the filler
        volumes.append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cfg.cache_claim,
                                                                         "readOnly": True}})
        mounts.append({"name": CACHE_VOLUME, "mountPath": cfg.cache_mount_path, "readOnly": True})
    return volumes, mounts


def tolerations(layout: Layout, cfg: BuildConfig) -> list[dict[str, Any]]:
    """Tolerate the nvidia.com/gpu taint on GPU nodes, plus the operator's extra tolerations."""
    out: list[dict[str, Any]] = []
    if layout.gpus_per_pod > 0:
        out.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    out.extend(copy.deepcopy(list(cfg.extra_tolerations)))
    return out


def pod_failure_policy() -> dict[str, Any]:
    """Fail at once on permanent trainer errors and on running out of GPU memory (the operator re-plans); do not
    count preemption (the trainer's Preempted exit code after its checkpoint, or a pod disruption) as a failure."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": sorted(reasons.PERMANENT_EXIT_CODES
                                                               + reasons.REPLAN_EXIT_CODES)}},
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": [reasons.PREEMPTED_EXIT_CODE]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
    ]}


def layout_annotation(layout: Layout, avoided: frozenset[str] | set[str] = frozenset()) -> str:
    """The layout a trainer Job is rendered for, and the GPU types its sizing avoided, as the Job's
    `kubetune.io/layout` annotation: a pass that creates the Job and then cannot write the status (a 409 after a
    move) leaves the truth on the Job, and the next pass takes status.layout from it (resize.adopt_recorded_layout)."""
    record = layout.to_status()
    if avoided:
        record["avoid"] = sorted(avoided)
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def build_job(ref: JobRef, spec: FineTuneJobSpec, layout: Layout, cfg: BuildConfig,
              *, hash_: str = "", plan_status: dict[str, Any] | None = None,
              avoided: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Indexed batch/v1 Job `<job>-trainer`: one pod per node, completions = parallelism = pods. The pods' grace
    period covers a checkpoint of the sized plan (`plan_status`, the sizer's status.plan). The Job carries the
    spec hash and its layout (`layout_annotation`, with `avoided`: the GPU types the sizing left out)."""
    name = trainer_name(ref.name)
    volumes, mounts = _volumes(ref, spec, layout, cfg)
    pod_labels = child_labels(ref.name, "trainer")
    container = {
        "name": CONTAINER,
        "image": spec.image or cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["kubetune-train", "launch"],
        "env": _env(ref, spec, layout, cfg),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        "resources": pod_resources(spec, layout, cfg),
        "volumeMounts": mounts,
        "terminationMessagePath": cfg.termination_log,
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": termination_grace_seconds(
            plan_status, base_seconds=cfg.termination_grace_base_seconds,
            write_bytes_per_second=cfg.checkpoint_write_bytes_per_second),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": cfg.run_as_user,
                            "runAsGroup": cfg.run_as_user, "fsGroup": cfg.run_as_user,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if needs_service(layout):
        pod_spec["subdomain"] = name
    selector = dict(layout.node_selector)
    if layout.gpus_per_pod == 0:
        selector.update(dict(cfg.cpu_node_selector))
    else:
        selector = {**dict(cfg.gpu_node_selector), **selector}
    if selector:
        pod_spec["nodeSelector"] = dict(sorted(selector.items()))
    tols = tolerations(layout, cfg)
    if tols:
        pod_spec["tolerations"] = tols
    if cfg.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in cfg.image_pull_secrets]
    job_labels = child_labels(ref.name, "trainer")
    for key in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL):
        if ref.labels.get(key):
            job_labels[key] = ref.labels[key]
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": layout.pods,
        "parallelism": layout.pods,
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        "suspend": bool(spec.suspend or ref.labels.get(KUEUE_QUEUE_LABEL)),
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds > 0:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    annotations = {LAYOUT_ANNOTATION: layout_annotation(layout, avoided)}
    if hash_:
        annotations[SPEC_HASH_ANNOTATION] = hash_
    meta = _meta(ref, name, "trainer", annotations)
    meta["labels"] = job_labels
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def build_children(ref: JobRef, spec_dict: dict[str, Any], spec: FineTuneJobSpec, layout: Layout,
                   cfg: BuildConfig, *, plan_status: dict[str, Any] | None = None,
                   memory_replans: list[dict[str, Any]] | None = None,
                   avoided: frozenset[str] | set[str] = frozenset()) -> list[dict[str, Any]]:
    """All children in creation order: ConfigMap, Service (multi-pod runs only), Job (the Job carries the
    spec hash and its layout, and comes last)."""
    hash_ = spec_hash(spec_dict)
    service = [build_service(ref)] if needs_service(layout) else []
    return [build_configmap(ref, spec, layout, memory_replans), *service,
            build_job(ref, spec, layout, cfg, hash_=hash_, plan_status=plan_status, avoided=avoided)]
