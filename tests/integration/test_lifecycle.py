"""The operator's lifecycle on the real control plane: one operator subprocess for the module,
KWOK pods driven to Succeeded/Failed with `complete_pod`, real Job controller and garbage collector."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from kubernetes.client.rest import ApiException

from tests.support.cluster_helpers import complete_pod, wait_for
from tests.support.finetunejobs import FtjClient, argocd_health, ftj_manifest, summary_json, wait_phase
from tests.support.operator_fixtures import ftj, operator, progress  # noqa: F401 - module-scoped operator

pytestmark = pytest.mark.integration


def wait_running_pod(ftj: FtjClient, ns: str, name: str, index: int = 0, timeout: float = 30):
    return wait_for(lambda: ftj.running_pod(ns, name, index), timeout, f"running trainer pod {name} index {index}")


def test_job_runs_pending_to_running_to_succeeded(ftj, k8s, namespace):
    ftj.create(namespace, ftj_manifest("demo", pods=2))
    st = wait_phase(ftj, namespace, "demo", "Running")
    assert st["startTime"] and st["layout"]["totalGpus"] == 2 and st["layout"]["source"] == "spec"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    # Children: names, labels, owner references, headless Service, plan ConfigMap.
    owner_uid = ftj.get(namespace, "demo")["metadata"]["uid"]
    job = ftj.batch.read_namespaced_job("demo-trainer", namespace)
    assert job.spec.completion_mode == "Indexed" and job.spec.completions == job.spec.parallelism == 2
    assert job.metadata.owner_references[0].uid == owner_uid
    assert job.metadata.labels["kubetune.io/job-name"] == "demo"
    svc = ftj.core.read_namespaced_service("demo-trainer", namespace)
    assert svc.spec.cluster_ip == "None"
    plan = json.loads(ftj.core.read_namespaced_config_map("demo-plan", namespace).data["plan.json"])
    assert plan["version"] == 1 and plan["distributed"]["numNodes"] == 2 and plan["job"]["uid"] == owner_uid
    pod0 = wait_running_pod(ftj, namespace, "demo", 0)
    pod1 = wait_running_pod(ftj, namespace, "demo", 1)
    assert pod0.spec.hostname == "demo-trainer-0" and pod0.spec.subdomain == "demo-trainer"
    assert pod0.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    # The chart's Argo CD health check judges the real objects: Progressing while running, Healthy when done.
    assert argocd_health(ftj.get(namespace, "demo"))[0] == "Progressing"
    # Accounting counts the containers' own start and exit times (whole seconds): let the pods run two of them.
    time.sleep(2.5)
    complete_pod(k8s, namespace, pod1.metadata.name)
    complete_pod(k8s, namespace, pod0.metadata.name, message=summary_json("demo"))
    st = wait_phase(ftj, namespace, "demo", "Succeeded")
    assert argocd_health(ftj.get(namespace, "demo"))[0] == "Healthy"
    assert st["artifacts"] == {"adapter": "s3://outputs/demo/final/adapter",
                               "metrics": "s3://outputs/demo/final/metrics.json"}
    assert st["metrics"]["trainLoss"] == 1.23 and st["metrics"]["perplexity"] == 3.7
    assert st["checkpoint"]["step"] == 100 and st["accounting"]["tokens"] == 123456
    assert st["completionTime"] and st["progress"]["percent"] == 100.0
    assert st["accounting"]["runningSeconds"] >= 2 and st["accounting"]["gpuHours"] > 0
    assert st["observedGeneration"] == ftj.get(namespace, "demo")["metadata"]["generation"]
    reasons = [r for r, _ in ftj.wait_events(namespace, "demo", "Completed")]
    assert "ChildrenCreated" in reasons and "PodsRunning" in reasons and "Completed" in reasons
    # No duplicate children after all those passes.
    assert [j.metadata.name for j in ftj.jobs(namespace)] == ["demo-trainer"]


def test_failing_pods_are_retried_then_job_fails_with_pod_message(ftj, k8s, namespace):
    ftj.create(namespace, ftj_manifest("flaky", backoffLimit=1))
    first = wait_running_pod(ftj, namespace, "flaky")
    failure = summary_json("flaky", status="Failed", reason="NonFiniteLoss",
                           message="loss became NaN at step 17", step=17)
    complete_pod(k8s, namespace, first.metadata.name, exit_code=1, message=failure)
    second = wait_for(lambda: (p := ftj.running_pod(namespace, "flaky", 0)) and
                      p.metadata.name != first.metadata.name and p, 60, "a retried trainer pod")
    st = wait_phase(ftj, namespace, "flaky", "Running")
    assert st["accounting"]["restarts"] == 1 and "loss became NaN" in st["message"]
    complete_pod(k8s, namespace, second.metadata.name, exit_code=1, message=failure)
    st = wait_phase(ftj, namespace, "flaky", "Failed", timeout=60)
    assert st["reason"] == "BackoffLimitExceeded"
    assert "NonFiniteLoss" in st["message"] and "loss became NaN at step 17" in st["message"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "loss became NaN" in failed["message"]
    health, message = argocd_health(ftj.get(namespace, "flaky"))
    assert health == "Degraded" and "BackoffLimitExceeded" in message, message
    assert ("BackoffLimitExceeded" in [r for r, _ in ftj.wait_events(namespace, "flaky", "BackoffLimitExceeded")])


def test_permanent_trainer_error_fails_without_retry(ftj, k8s, namespace):
    ftj.create(namespace, ftj_manifest("baddata", backoffLimit=5))
    pod = wait_running_pod(ftj, namespace, "baddata")
    message = summary_json("baddata", status="Failed", reason="DataError",
                           message="/mnt/pvc/data/train.jsonl:3: invalid JSON", step=0)
    complete_pod(k8s, namespace, pod.metadata.name, exit_code=3, message=message)
    st = wait_phase(ftj, namespace, "baddata", "Failed")
    assert st["reason"] == "DataError" and "train.jsonl:3: invalid JSON" in st["message"]
    assert "not retried" in st["message"]
    assert len(ftj.pods(namespace, "baddata")) == 1
    reasons = [r for r, _ in ftj.wait_events(namespace, "baddata", "DataError")]
    assert "PodFailedRetrying" not in reasons and reasons.count("DataError") == 1, reasons


def test_full_disk_fails_at_once_with_the_trainers_reason(ftj, k8s, namespace):
    ftj.create(namespace, ftj_manifest("fulldisk", backoffLimit=5))
    pod = wait_running_pod(ftj, namespace, "fulldisk")
    message = summary_json("fulldisk", status="Failed", reason="NoSpaceLeft", step=14,
                           message="no space left on pvc://outputs/run: a checkpoint needs ~380 MB, 12 MB free")
    complete_pod(k8s, namespace, pod.metadata.name, exit_code=7, message=message)
    st = wait_phase(ftj, namespace, "fulldisk", "Failed")
    assert st["reason"] == "NoSpaceLeft" and "needs ~380 MB, 12 MB free" in st["message"]
    # The Job controller applies the pod failure policy (FailJob on exit code 7): no retry pod, ever.
    wait_for(lambda: any(c.type in ("Failed", "FailureTarget") and c.reason == "PodFailurePolicy"
                         for c in ftj.batch.read_namespaced_job("fulldisk-trainer", namespace).status.conditions
                         or []), 30, "the Job failed by its pod failure policy")
    assert len(ftj.pods(namespace, "fulldisk")) == 1
    st = ftj.status(namespace, "fulldisk")
    assert st["reason"] == "NoSpaceLeft", st  # unchanged once the Job is failed: one Event
    assert [r for r, _ in ftj.events(namespace, "fulldisk")].count("NoSpaceLeft") == 1


def test_out_of_memory_recreates_the_job_with_a_leaner_plan(ftj, k8s, namespace):
    """The OutOfMemory exit code fails the Job by its pod failure policy; the operator recreates it with half the
    micro batch and twice the accumulation (global batch kept) in the plan ConfigMap, and says so."""
    ftj.create(namespace, ftj_manifest("oom", training={"maxSteps": 100, "microBatchSize": 8}))
    first = wait_running_pod(ftj, namespace, "oom")
    old_job_uid = ftj.batch.read_namespaced_job("oom-trainer", namespace).metadata.uid
    message = summary_json("oom", status="Failed", reason="OutOfMemory", step=37,
                           message="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    complete_pod(k8s, namespace, first.metadata.name, exit_code=9, message=message)
    second = wait_for(lambda: (p := ftj.running_pod(namespace, "oom", 0)) and p.metadata.name != first.metadata.name
                      and p, 90, "a trainer pod of the recreated Job")
    job = ftj.batch.read_namespaced_job("oom-trainer", namespace)
    assert job.metadata.uid != old_job_uid, "the Job was not recreated"
    assert second.metadata.owner_references[0].uid == job.metadata.uid
    plan = json.loads(ftj.core.read_namespaced_config_map("oom-plan", namespace).data["plan.json"])
    assert (plan["training"]["microBatchSize"], plan["training"]["gradientAccumulationSteps"]) == (4, 16)
    st = ftj.status(namespace, "oom")
    assert [r["change"] for r in st["memoryReplans"]] == [
        "microBatchSize 8 -> 4, gradientAccumulationSteps 8 -> 16 (global batch 64 per process kept)"]
    assert st["memoryReplans"][0]["step"] == 37
    events = ftj.wait_events(namespace, "oom", "ReplannedAfterOutOfMemory")
    replanned = [m for r, m in events if r == "ReplannedAfterOutOfMemory"]
    assert len(replanned) == 1 and "microBatchSize 8 -> 4" in replanned[0], events


def test_out_of_memory_twice_moves_the_job_to_a_layout_that_needs_less_per_gpu(ftj, k8s, namespace):
    """The first OutOfMemory halves the micro batch; at micro batch 1 with gradient checkpointing the second moves
    the job to a layout the sizer estimates needs less memory per GPU (ZeRO-3 over more GPUs or CPU offload) on the
    pinned GPU type: the recreated Job, its plan and status.layout carry it; status and Event say what failed."""
    manifest = ftj_manifest("oomlayout", training={"maxSteps": 100, "microBatchSize": 2, "gradientAccumulationSteps": 4,
                                                   "gradientCheckpointing": True})
    manifest["spec"]["resources"] = {"gpuType": "NVIDIA-L4"}  # the sizer chooses the layout on L4 GPUs
    ftj.create(namespace, manifest)
    first = wait_running_pod(ftj, namespace, "oomlayout")
    st = ftj.status(namespace, "oomlayout")
    assert (st["layout"]["source"], st["layout"]["totalGpus"], st["layout"]["strategy"]) == ("sizer", 1, "none"), st
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    complete_pod(k8s, namespace, first.metadata.name, exit_code=9,
                 message=summary_json("oomlayout", status="Failed", reason="OutOfMemory", step=12, message=oom))
    second = wait_for(lambda: (p := ftj.running_pod(namespace, "oomlayout", 0)) and p.metadata.name != first.metadata.name
                      and p, 90, "a trainer pod of the Job recreated with micro batch 1")
    plan = json.loads(ftj.core.read_namespaced_config_map("oomlayout-plan", namespace).data["plan.json"])
    assert plan["training"]["microBatchSize"] == 1 and plan["distributed"]["strategy"] == "none"
    peak = 20 * 2**30  # the trainer's measured peak, as its OOM summary reports it
    summary = json.loads(summary_json("oomlayout", status="Failed", reason="OutOfMemory", step=30, message=oom))
    complete_pod(k8s, namespace, second.metadata.name, exit_code=9,
                 message=json.dumps({**summary, "peakGpuMemoryBytes": peak}))
    third = wait_for(lambda: (p := ftj.running_pod(namespace, "oomlayout", 0)) and p.metadata.name not in
                     (first.metadata.name, second.metadata.name) and p, 90, "a trainer pod of the re-laid-out Job")
    st = ftj.status(namespace, "oomlayout")
    assert len(st["memoryReplans"]) == 2, st.get("memoryReplans")
    batch, layout = st["memoryReplans"]
    assert "microBatchSize 2 -> 1" in batch["change"] and "layout" not in batch
    assert batch["failed"]["layout"]["strategy"] == "none" and batch["failed"]["microBatchSize"] == 2
    failed = layout["failed"]
    assert (failed["microBatchSize"], failed["gradientCheckpointing"], failed["peakGpuMemoryBytes"]) == (1, True, peak)
    assert failed["layout"]["gpusPerPod"] == 1 and failed["layout"]["estimatedPerGpuBytes"] > 0
    new = layout["layout"]
    assert new["gpuType"] == "NVIDIA-L4" and new["strategy"] == "deepspeed"
    assert new["zeroStage"] == 3 or new["offloadOptimizer"]
    assert new["estimatedPerGpuBytes"] * failed["layout"]["gpuMemoryBytes"] \
        < failed["layout"]["estimatedPerGpuBytes"] * new["gpuMemoryBytes"]  # a smaller share of its GPU
    # status.layout, the plan's distributed block and the Job's pods follow the new layout
    assert st["layout"]["source"] == "replan" and st["layout"]["zeroStage"] == new["zeroStage"]
    assert (st["layout"]["gpusPerPod"], st["layout"]["pods"]) == (new["gpusPerPod"], new["pods"])
    plan = json.loads(ftj.core.read_namespaced_config_map("oomlayout-plan", namespace).data["plan.json"])
    assert plan["training"]["microBatchSize"] == 1
    assert (plan["distributed"]["strategy"], plan["distributed"]["zeroStage"], plan["distributed"]["offloadOptimizer"],
            plan["distributed"]["numNodes"]) == ("deepspeed", new["zeroStage"], new["offloadOptimizer"], new["pods"])
    job = ftj.batch.read_namespaced_job("oomlayout-trainer", namespace)
    assert job.spec.parallelism == new["pods"]
    limits = job.spec.template.spec.containers[0].resources.limits
    assert limits["nvidia.com/gpu"] == str(new["gpusPerPod"]) and third.spec.node_selector == {
        "nvidia.com/gpu.product": "NVIDIA-L4"}
    replanned = [m for r, m in ftj.wait_events(namespace, "oomlayout", "ReplannedAfterOutOfMemory")
                 if r == "ReplannedAfterOutOfMemory"]
    assert any(layout["change"] in m for m in replanned), replanned
    assert "GiB estimated per GPU with 1 x NVIDIA-L4, single GPU ran out of memory" in layout["change"]
    assert "the trainer measured a peak of 20.0 GiB" in layout["change"]


def test_preempted_pod_is_replaced_without_counting_a_failure(ftj, k8s, namespace):
    """backoffLimit 0: one counted failure would fail the Job; the Preempted exit code is ignored by the policy."""
    ftj.create(namespace, ftj_manifest("preempt", backoffLimit=0))
    first = wait_running_pod(ftj, namespace, "preempt")
    message = summary_json("preempt", status="Failed", reason="Preempted", step=37,
                           message="stopped by SIGTERM at step 37 after writing checkpoint step-37")
    complete_pod(k8s, namespace, first.metadata.name, exit_code=75, message=message)
    wait_for(lambda: (p := ftj.running_pod(namespace, "preempt", 0)) and p.metadata.name != first.metadata.name,
             60, "a replacement trainer pod")
    st = wait_for(lambda: ((s := ftj.status(namespace, "preempt")).get("reason"), s.get("phase")) ==
                  ("ResumingAfterPreemption", "Running") and s, 30, "Running with reason ResumingAfterPreemption")
    assert "resuming after preemption" in st["message"] and "step 37" in st["message"]
    job = ftj.batch.read_namespaced_job("preempt-trainer", namespace)
    assert not job.status.failed, "a preemption must not count against backoffLimit"
    assert "PodFailedRetrying" not in [r for r, _ in ftj.events(namespace, "preempt")]


def test_progress_checkpoint_and_resume_after_failure(ftj, k8s, namespace, progress):
    progress.set({"version": 1, "phase": "training", "step": 40, "totalSteps": 100, "epoch": 0.4,
                  "trainLoss": 1.9, "evalLoss": None, "learningRate": 0.0002, "tokens": 40960,
                  "tokensPerSecond": 2100.0, "etaSeconds": 38.0,
                  "checkpoint": {"step": 40, "uri": "s3://outputs/resume/checkpoints/step-40"}})
    ftj.create(namespace, ftj_manifest("resume", backoffLimit=2))
    first = wait_running_pod(ftj, namespace, "resume")
    st = wait_for(lambda: (s := ftj.status(namespace, "resume")).get("checkpoint", {}).get("step") == 40 and s,
                  30, "checkpoint from /progress in status")
    assert st["progress"]["display"] == "40% (40/100)" and st["metrics"]["tokensPerSecond"] == 2100.0
    complete_pod(k8s, namespace, first.metadata.name, exit_code=1,
                 message=summary_json("resume", status="Failed", reason="TrainingError", message="node lost"))
    wait_for(lambda: (p := ftj.running_pod(namespace, "resume", 0)) and p.metadata.name != first.metadata.name,
             60, "retried pod")
    st = wait_for(lambda: (s := ftj.status(namespace, "resume")).get("resumedFromStep") == 40 and s, 30,
                  "status.resumedFromStep")
    assert st["phase"] == "Running"
    # The plan (and so the output location the trainer resumes from) is unchanged across the retry.
    plan = json.loads(ftj.core.read_namespaced_config_map("resume-plan", namespace).data["plan.json"])
    assert plan["output"]["uri"] == "s3://outputs/resume"
    # The operator relays trainer metrics per job.
    text = urllib.request.urlopen(f"http://127.0.0.1:{ftj_operator_metrics_port()}/metrics", timeout=5).read().decode()
    assert f'kubetune_job_tokens_per_second{{name="resume",namespace="{namespace}"}} 2100.0' in text
    assert f'kubetune_job_progress_ratio{{name="resume",namespace="{namespace}"}} 0.4' in text


_METRICS_PORT: list[int] = []


@pytest.fixture(autouse=True)
def _remember_metrics_port(operator):
    _METRICS_PORT[:] = [operator.metrics_port]


def ftj_operator_metrics_port() -> int:
    return _METRICS_PORT[0]


def test_suspend_and_resume(ftj, namespace):
    ftj.create(namespace, ftj_manifest("pausable"))
    wait_running_pod(ftj, namespace, "pausable")
    wait_phase(ftj, namespace, "pausable", "Running")
    ftj.patch_spec(namespace, "pausable", {"suspend": True})
    st = wait_phase(ftj, namespace, "pausable", "Suspended")
    assert argocd_health(ftj.get(namespace, "pausable"))[0] == "Suspended"
    assert ftj.batch.read_namespaced_job("pausable-trainer", namespace).spec.suspend is True
    wait_for(lambda: not ftj.pods(namespace, "pausable", "Running"), 30, "trainer pods stopped")
    # The GPU time runs until the pods have stopped, then ends.
    wait_for(lambda: ftj.status(namespace, "pausable")["accounting"].get("runningSince") is None, 30,
             "the running time ended once the pods stopped")
    assert "stopped" in ftj.status(namespace, "pausable")["message"]
    ftj.patch_spec(namespace, "pausable", {"suspend": False})
    wait_phase(ftj, namespace, "pausable", "Running")
    assert ftj.batch.read_namespaced_job("pausable-trainer", namespace).spec.suspend is False
    reasons = [r for r, _ in ftj.events(namespace, "pausable")]
    assert "SuspendedBySpec" in reasons


def test_spec_change_refused_while_running_then_applied_via_suspend(ftj, namespace):
    ftj.create(namespace, ftj_manifest("changer"))
    wait_phase(ftj, namespace, "changer", "Running")
    with pytest.raises(ApiException) as refused:
        ftj.patch_spec(namespace, "changer", {"training": {"maxSteps": 300}})
    assert refused.value.status == 422 and "set spec.suspend: true first" in refused.value.body
    old_hash = ftj.batch.read_namespaced_job("changer-trainer", namespace).metadata.annotations["kubetune.io/spec-hash"]
    ftj.patch_spec(namespace, "changer", {"suspend": True})
    wait_phase(ftj, namespace, "changer", "Suspended")
    ftj.patch_spec(namespace, "changer", {"training": {"maxSteps": 300}})

    def recreated():
        try:
            job = ftj.batch.read_namespaced_job("changer-trainer", namespace)
        except ApiException:
            return None
        return job if job.metadata.annotations["kubetune.io/spec-hash"] != old_hash else None

    wait_for(recreated, 30, "the Job recreated from the new spec")
    plan = json.loads(ftj.core.read_namespaced_config_map("changer-plan", namespace).data["plan.json"])
    assert plan["training"]["maxSteps"] == 300
    ftj.patch_spec(namespace, "changer", {"suspend": False})
    wait_phase(ftj, namespace, "changer", "Running")
    assert len(ftj.jobs(namespace)) == 1


def test_deleting_the_job_garbage_collects_children(ftj, namespace):
    ftj.create(namespace, ftj_manifest("gone"))
    wait_phase(ftj, namespace, "gone", "Running")
    ftj.delete(namespace, "gone")

    def all_gone():
        left = [j.metadata.name for j in ftj.jobs(namespace)]
        left += [c.metadata.name for c in ftj.core.list_namespaced_config_map(namespace).items
                 if c.metadata.name == "gone-plan"]
        left += [s.metadata.name for s in ftj.core.list_namespaced_service(namespace).items]
        left += [p.metadata.name for p in ftj.pods(namespace, "gone")]
        return not left or None

    wait_for(all_gone, 60, "garbage collection of the Job, pods, Service and ConfigMap")


def test_orphaned_children_are_never_adopted_by_a_recreated_job(ftj, k8s, namespace):
    """`kubectl delete ftj --cascade=orphan`, then the same name again: the new FineTuneJob does not follow
    or patch the old Job and ConfigMap; it says which child is in the way, and starts once it is gone."""
    from kubernetes import client

    ftj.create(namespace, ftj_manifest("twice"))
    wait_phase(ftj, namespace, "twice", "Running")
    old_plan = ftj.core.read_namespaced_config_map("twice-plan", namespace).data
    ftj.objects.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", "twice",
                                                body=client.V1DeleteOptions(propagation_policy="Orphan"))
    jobs_orphaned = lambda: (jobs := ftj.jobs(namespace)) and all(not (j.metadata.owner_references or []) for j in jobs)
    wait_for(lambda: jobs_orphaned() or None, 60, "the orphaned Job without ownerReferences")

    def gone():
        try:
            ftj.get(namespace, "twice")
        except ApiException as exc:
            return exc.status == 404 or None
        return None
    wait_for(gone, 60, "the deleted FineTuneJob gone (the orphan finalizer done)")
    ftj.create(namespace, ftj_manifest("twice", training={"maxSteps": 77}))
    st = wait_for(lambda: (lambda s: s if s.get("reason") == "ChildNotOwned" else None)(ftj.status(namespace, "twice")),
                  30, lambda: f"ChildNotOwned; last status {ftj.status(namespace, 'twice')}")
    assert "twice-plan" in st["message"] or "twice-trainer" in st["message"]
    assert any(reason == "ChildNotOwned" for reason, _ in ftj.wait_events(namespace, "twice", "ChildNotOwned"))
    assert ftj.core.read_namespaced_config_map("twice-plan", namespace).data == old_plan  # not patched
    uid = ftj.get(namespace, "twice")["metadata"]["uid"]
    # Clear the way: the new job creates its own children, owned by its own UID.
    for job in ftj.jobs(namespace):
        ftj.batch.delete_namespaced_job(job.metadata.name, namespace, propagation_policy="Background")
    for name in ("twice-plan",):
        ftj.core.delete_namespaced_config_map(name, namespace)
    for svc in ftj.core.list_namespaced_service(namespace).items:
        ftj.core.delete_namespaced_service(svc.metadata.name, namespace)

    def owned_job():
        jobs = [j for j in ftj.jobs(namespace) if j.metadata.deletion_timestamp is None]
        return jobs if jobs and all(any(o.uid == uid for o in j.metadata.owner_references or []) for j in jobs) \
            else None
    wait_for(owned_job, 60, "a Job owned by the new FineTuneJob")
    plan = json.loads(ftj.core.read_namespaced_config_map("twice-plan", namespace).data["plan.json"])
    assert plan["training"]["maxSteps"] == 77
    wait_phase(ftj, namespace, "twice", "Running", timeout=60)


def test_cancel_stops_the_run_and_keeps_the_record(ftj, namespace):
    ftj.create(namespace, ftj_manifest("stopme"))
    wait_phase(ftj, namespace, "stopme", "Running")
    ftj.patch_spec(namespace, "stopme", {"cancel": True})
    st = wait_phase(ftj, namespace, "stopme", "Cancelled")
    assert st["completionTime"] and st["layout"]["totalGpus"] == 1
    wait_for(lambda: not ftj.jobs(namespace) or None, 30, "the trainer Job deleted (in the foreground: pods first)")
    # The run's GPU time ended once its pods had stopped, not at the pass that cancelled it.
    st = wait_for(lambda: (s := ftj.status(namespace, "stopme")) and "runningSince" not in s["accounting"] and s,
                  30, "the cancelled run's Running stretch closed")
    assert st["phase"] == "Cancelled" and st["accounting"]["runningSeconds"] > 0, st
    assert "are stopping" not in st["message"], st["message"]  # no longer says the pods are stopping


def test_kueue_label_keeps_job_queued_until_admitted(ftj, namespace):
    ftj.create(namespace, ftj_manifest("queued", labels={"kueue.x-k8s.io/queue-name": "team-a"}))
    st = wait_phase(ftj, namespace, "queued", "Queued")
    assert "team-a" in st["message"]
    job = ftj.batch.read_namespaced_job("queued-trainer", namespace)
    assert job.spec.suspend is True and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert not ftj.pods(namespace, "queued")
    # Kueue admits the workload by unsuspending the Job.
    ftj.batch.patch_namespaced_job("queued-trainer", namespace, {"spec": {"suspend": False}})
    wait_phase(ftj, namespace, "queued", "Running")
    assert ftj.batch.read_namespaced_job("queued-trainer", namespace).spec.suspend is False


def test_ttl_after_finished_deletes_children_and_keeps_status(ftj, k8s, namespace):
    ftj.create(namespace, ftj_manifest("short", ttlSecondsAfterFinished=2))
    pod = wait_running_pod(ftj, namespace, "short")
    complete_pod(k8s, namespace, pod.metadata.name, message=summary_json("short"))
    wait_phase(ftj, namespace, "short", "Succeeded")
    st = wait_for(lambda: (s := ftj.status(namespace, "short")).get("childrenDeleted") and s, 30,
                  "status.childrenDeleted")
    assert st["phase"] == "Succeeded" and st["artifacts"]["adapter"] == "s3://outputs/short/final/adapter"
    wait_for(lambda: not ftj.jobs(namespace) or None, 30, "the Job deleted after the TTL")
    with pytest.raises(ApiException):
        ftj.core.read_namespaced_config_map("short-plan", namespace)


def _sizer_available() -> bool:
    try:
        from kubetune.sizing import fleet_from_nodes, size_job  # noqa: F401
    except ImportError:
        return False
    return True


needs_sizer = pytest.mark.skipif(not _sizer_available(), reason="kubetune.sizing (size_job) is not available yet")


@needs_sizer
@pytest.mark.parametrize("case,spec,products", [
    ("qlora-70b", {"model": {"uri": "hf://meta-llama/Llama-3.1-70B"}, "method": "qlora",
                   "quantization": {"bits": 4}, "training": {"maxSteps": 100, "maxSeqLength": 2048}},
     {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"}),
    ("qlora-8b-2k", {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "method": "qlora",
                     "quantization": {"bits": 4}, "training": {"maxSteps": 100, "maxSeqLength": 2048}},
     {"NVIDIA-L4"}),
])
def test_operator_sized_job_lands_on_expected_gpu(ftj, namespace, case, spec, products):
    manifest = ftj_manifest(case, **spec)
    manifest["spec"].pop("resources")
    ftj.create(namespace, manifest)
    st = wait_phase(ftj, namespace, case, "Running")
    assert st["layout"]["source"] == "sizer" and st["layout"]["gpusPerPod"] == 1 and st["layout"]["pods"] == 1
    assert st["layout"]["gpuType"] in products and st["plan"]["gpuType"] == st["layout"]["gpuType"]
    pod = wait_running_pod(ftj, namespace, case)
    node = ftj.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] in products


@needs_sizer
def test_job_that_fits_no_gpu_stays_pending_with_reason(ftj, namespace):
    manifest = ftj_manifest("toolarge", model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full",
                            distributed={"strategy": "ddp"})
    manifest["spec"]["resources"] = {"maxGpus": 1}
    ftj.create(namespace, manifest)
    st = wait_phase(ftj, namespace, "toolarge", "Pending")
    sized = wait_for(lambda: next((c for c in ftj.status(namespace, "toolarge").get("conditions", [])
                                   if c["type"] == "Sized"), None), 30, "Sized condition")
    assert sized["status"] == "False" and sized["reason"] == "InsufficientGPU" and sized["message"]
    assert not ftj.jobs(namespace)
    assert "InsufficientGPU" in [r for r, _ in ftj.wait_events(namespace, "toolarge", "InsufficientGPU")]
    text = urllib.request.urlopen(f"http://127.0.0.1:{ftj_operator_metrics_port()}/metrics", timeout=5).read().decode()
    assert "kubetune_sizing_refusals_total" in text
