"""Pure reconciliation: spec + current status + observed children → desired status, actions, Events.

No I/O here: the controller gathers the observations (child Job, pods, sizing outcome, the rank-0
progress JSON), calls `decide` once, then carries out the actions and writes the status once. A pass takes
one of five branches (`phase_of`): terminal, cancel, create, recreate, follow.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
from typing import Any

from kubetune import conditions as C
from kubetune import evaluation as E
from kubetune import reasons as R
from kubetune.export_status import export_verdict
from kubetune.tracking_status import tracking_status, tracking_verdict
from kubetune.api import TERMINAL_PHASES, FineTuneJobSpec
from kubetune.builders import COMPLETION_INDEX_ANNOTATION, CONTAINER, KUEUE_QUEUE_LABEL, SPEC_HASH_ANNOTATION
from kubetune.advice import advise
from kubetune.kueue_admission import admission, not_installed_message
from kubetune.estimate import Pricing, estimate_status, plan_params
from kubetune.throughput import ThroughputBook
from kubetune.preflight import preflight_status, validated_for
from kubetune.resize import adopt_recorded_layout
from kubetune.preflight_trace import TracedFit, plan_with_trace, traced_fit
from kubetune.sizing.layout import SizingOutcome
from kubetune.store import FINISHED_JOB_CONDITIONS
from kubetune.oom import current_training, exhausted_message, next_memory_plan
from kubetune.oom_layout import MemoryOutlook
from kubetune.running_time import (close_running, close_when_stopped, gpu_cost, gpu_hours,
                                    restarted_between_passes, running_since)
from kubetune.sizing.estimator import gib
from kubetune.sizing.leaner import describe_layout
from kubetune.status import checked_status
from kubetune.timestamps import iso, parse_time

JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded": R.BACKOFF_LIMIT_EXCEEDED,
    "DeadlineExceeded": R.DEADLINE_EXCEEDED,
    "PodFailurePolicy": R.POD_FAILURE_POLICY,
}


# Reasons that get no Event when the phase stays the same (see decide's set_phase).
QUIET_REASONS = frozenset({R.WAITING_FOR_PODS})


@dataclasses.dataclass
class Observed:
    """What the handlers saw in the cluster for one FineTuneJob."""

    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    children_exist: bool = False  # any of ConfigMap / Service / Job
    sizing: SizingOutcome | None = None  # only computed when a Job has to be created
    children: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # rendered when sizing fits
    progress: dict[str, Any] | None = None  # rank-0 /progress JSON, None when not read
    resize: SizingOutcome | None = None  # a new layout for a job whose pods stayed unschedulable (resize.py)
    resize_from: str = ""  # the GPU type the pods could not be scheduled on
    preflight: bool = False  # this job runs the CPU preflight before its trainer Job (kubetune.preflight)
    preflight_job: dict[str, Any] | None = None  # the preflight Job, when there is one
    preflight_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    preflight_children: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # plan ConfigMap + Job
    cache_claim_wait: str = ""  # why the unschedulable preflight pod waits on the cache claim (kubetune.cache_claim)
    memory: MemoryOutlook | None = None  # a trainer pod ran out of GPU memory: the failure and the next layout
    trace: MemoryOutlook | None = None  # the preflight's traced step does not fit the sized layout: the next layout
    workload: dict[str, Any] | None = None  # Kueue's Workload for the trainer Job, when Kueue made one
    kueue_installed: bool | None = None  # whether the cluster serves Kueue's Workload API (None: not known yet)


@dataclasses.dataclass
class Action:
    """A change to make in the cluster: create/apply a child, patch the Job's suspend, delete children."""

    kind: str  # "apply" | "suspend_job" | "delete_job" | "delete_preflight" | "delete_children"
    obj: dict[str, Any] | None = None
    value: bool | None = None
    foreground: bool = False  # delete_job: the Job stays (deleting) until its pods are gone


@dataclasses.dataclass
class Decision:
    """The outcome of one reconcile pass."""

    status: dict[str, Any]
    actions: list[Action] = dataclasses.field(default_factory=list)
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, reason, msg)
    retry_after: float | None = None  # ask to be called again (e.g. waiting for GPUs, a TTL)


def job_condition(job: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    """The Job's condition of that type when its status is True."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def pod_index(pod: dict[str, Any]) -> int:
    """The pod's completion index (-1 when missing)."""
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def trainer_terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer container's `terminated` state, when it has terminated."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term
    return None


def parse_summary(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's termination summary (docs/contracts.md §5) from a pod, or None."""
    term = trainer_terminated(pod)
    if not term or not term.get("message"):
        return None
    try:
        data = json.loads(term["message"])
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def failure_text(pod: dict[str, Any]) -> str:
    """Why a pod failed: the summary's reason and message, else the container's reason/exit code."""
    summary = parse_summary(pod)
    name = (pod.get("metadata") or {}).get("name", "?")
    if summary and summary.get("status") == "Failed":
        return f"pod {name}: {summary.get('reason', 'TrainingError')}: {summary.get('message', '')}".strip()
    term = trainer_terminated(pod) or {}
    if term:
        detail = term.get("message") or ""
        return (f"pod {name}: container exited with code {term.get('exitCode')} "
                f"({term.get('reason', 'Error')}) {detail}").strip()
    status = pod.get("status") or {}
    return f"pod {name}: {status.get('reason') or 'Failed'} {status.get('message') or ''}".strip()


def trainer_exit_code(pod: dict[str, Any]) -> int | None:
    """The trainer container's exit code, when it has terminated."""
    term = trainer_terminated(pod)
    code = (term or {}).get("exitCode")
    return int(code) if isinstance(code, int) else None


def trainer_reason(pod: dict[str, Any]) -> str:
    """The trainer's reason for a failed pod: the summary's, else the one its exit code stands for."""
    summary = parse_summary(pod) or {}
    reason = str(summary.get("reason") or "")
    if reason in R.TRAINER_EXIT_CODES:
        return reason
    code = trainer_exit_code(pod)
    named = [r for r, c in R.TRAINER_EXIT_CODES.items() if c == code]
    return named[0] if len(named) == 1 else "TrainingError"


def permanent_failure(failed_pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first failed pod whose exit code the pod failure policy turns into a Job failure (no retry)."""
    for pod in failed_pods:
        if trainer_exit_code(pod) in R.PERMANENT_EXIT_CODES:
            return pod
    return None


def out_of_memory(failed_pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest failed pod whose trainer ran out of GPU memory (its exit code fails the Job for a re-plan)."""
    for pod in reversed(failed_pods):
        if trainer_exit_code(pod) in R.REPLAN_EXIT_CODES:
            return pod
    return None


def was_preempted(pod: dict[str, Any]) -> bool:
    """The trainer stopped on SIGTERM after a checkpoint (the retry resumes there and is not counted)."""
    return trainer_exit_code(pod) == R.PREEMPTED_EXIT_CODE or trainer_reason(pod) == "Preempted"


def _created(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def _phase_of(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def unschedulable_message(pods: list[dict[str, Any]]) -> str:
    """The scheduler's message for the first unschedulable pod, or ''."""
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"pod {pod['metadata'].get('name')}: {cond.get('message') or cond.get('reason', '')}"
    return ""


# A trainer pod the scheduler has just bound usually runs within seconds, and PodsRunning follows. Rewriting the
# scheduler's "0/N nodes are available" message away in between would cost every job that waited for a GPU one
# more status write (the apiserver's most expensive request at scale), so for this long after the binding the
# old message stands; after it (an image pull can take minutes) the status says the pods are starting.
BOUND_QUIET_SECONDS = 15.0


def seconds_since_bound(pods: list[dict[str, Any]], now: dt.datetime) -> float | None:
    """Seconds since the last of `pods` was bound to a node (None when one is not bound, or no pods)."""
    latest: dt.datetime | None = None
    for pod in pods:
        if not (pod.get("spec") or {}).get("nodeName"):
            return None
        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled" and c.get("status") == "True"), None)
        when = parse_time((scheduled or {}).get("lastTransitionTime"))
        if when is None:
            return None
        latest = when if latest is None or when > latest else latest
    return None if latest is None else (now - latest).total_seconds()


# Container waiting reasons that will not clear by themselves (a kubelet retries them, but the user must act):
# a missing Secret or ConfigMap, a bad image reference or pull credentials, a container that cannot start.
STUCK_WAITING_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "ErrImagePull",
                                   "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                                   "RunContainerError", "CrashLoopBackOff"})


def stuck_container_message(pods: list[dict[str, Any]]) -> str:
    """Why the first stuck trainer pod cannot start its container (e.g. a missing Secret), or ''."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING_REASONS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                return f"pod {pod['metadata'].get('name')} container {cs.get('name')}: {waiting['reason']}{detail}"
    return ""


def _progress_block(progress: dict[str, Any], now: str) -> dict[str, Any]:
    step = int(progress.get("step") or 0)
    total = int(progress.get("totalSteps") or 0)
    percent = round(100.0 * step / total, 1) if total > 0 else 0.0
    out: dict[str, Any] = {"step": step, "totalSteps": total, "epoch": float(progress.get("epoch") or 0.0),
                           "percent": percent, "display": f"{percent:.0f}% ({step}/{total})",
                           "updatedAt": now}
    if progress.get("etaSeconds") is not None:
        out["etaSeconds"] = float(progress["etaSeconds"])
    return out


def _fold_trainer_report(st: dict[str, Any], report: dict[str, Any], now: str, *, final: bool) -> None:
    """Copy a progress JSON or termination summary into status (progress, metrics, checkpoint, tokens)."""
    if report.get("totalSteps") is not None or report.get("step") is not None:
        st["progress"] = _progress_block(report, now)
        if final:
            st["progress"]["etaSeconds"] = 0.0
    metrics = dict(st.get("metrics") or {})
    for key in ("trainLoss", "evalLoss", "perplexity", "tokensPerSecond", "steadyTokensPerSecond", "runtimeSeconds"):
        if report.get(key) is not None:
            metrics[key] = float(report[key])
    if metrics:
        st["metrics"] = metrics
    ckpt = report.get("checkpoint") or {}
    if int(ckpt.get("step") or 0) > int((st.get("checkpoint") or {}).get("step") or 0):
        st["checkpoint"] = {"step": int(ckpt["step"]), "uri": str(ckpt.get("uri") or "")}
    if report.get("tokens") is not None:
        acc = st.setdefault("accounting", {})
        acc["tokens"] = max(int(report["tokens"]), int(acc.get("tokens") or 0) if not final else 0)
    if report.get("resumedFromStep") is not None:
        st["resumedFromStep"] = int(report["resumedFromStep"])
    if final and isinstance(report.get("artifacts"), dict):
        st["artifacts"] = {k: str(v) for k, v in report["artifacts"].items() if v}


# The branches of a pass, in the order they are tried: each is its own function below.
TERMINAL, CANCEL, CREATE, RECREATE, FOLLOW = "terminal", "cancel", "create", "recreate", "follow"


def job_spec_hash(job: dict[str, Any]) -> str:
    """The spec hash the Job was rendered from ('' when it carries none)."""
    return ((job.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION, "")


def phase_of(status: dict[str, Any], spec: FineTuneJobSpec, job: dict[str, Any] | None, want_hash: str) -> str:
    """Which branch a pass takes: terminal (sticky), cancel, create (no Job: size first), recreate (the Job
    was rendered from another spec) or follow (the Job is ours and current)."""
    if (status or {}).get("phase") in TERMINAL_PHASES:
        return TERMINAL
    if spec.cancel:
        return CANCEL
    if job is None:
        return CREATE
    if job_spec_hash(job) != want_hash:
        return RECREATE
    return FOLLOW


class _Pass:
    """The status being built by one pass: phase, conditions, Events, actions."""

    def __init__(self, status: dict[str, Any], generation: int, now: dt.datetime,
                 pricing: Pricing | None = None, throughput: ThroughputBook | None = None) -> None:
        self.pricing = pricing
        self.throughput = throughput  # this cluster's measured runs, for status.estimate
        self.old = status or {}
        self.st = copy.deepcopy(self.old)
        self.st["observedGeneration"] = generation
        self.generation, self.now, self.now_s = generation, now, iso(now)
        self.out = Decision(status=self.st)
        self.old_phase = self.old.get("phase") or ""
        self.conds: list[dict[str, Any]] = []

    def cond(self, ctype: str, value: bool | str, reason: str, message: str = "") -> None:
        self.conds.append(C.make_condition(ctype, value, reason, message, now=self.now_s,
                                           generation=self.generation))

    def set_phase(self, phase: str, reason: str, message: str, *, warning: bool = False,
                  always_event: bool = False) -> None:
        st = self.st
        st["phase"], st["reason"], st["message"] = phase, reason, message
        # An Event per change of phase or reason, except the routine steps inside a phase (children
        # created -> waiting for pods, pods finished -> Job completing): those only cost an apiserver write
        # per job in a burst and tell nothing the next Event does not. `always_event`: the pass acted (a
        # move), which gets its Event even when the phase and reason stay the same.
        routine = phase == self.old_phase and reason in QUIET_REASONS
        if always_event or ((phase != self.old_phase or reason != self.old.get("reason")) and not routine):
            self.out.events.append(("Warning" if warning else "Normal", reason,
                                    f"{phase}: {message}" if message else phase))

    def finish(self) -> Decision:
        self.st["conditions"] = C.merge_conditions(self.old.get("conditions"), self.conds)
        if self.st.get("layout"):
            acc = self.st.setdefault("accounting", {})
            acc["gpuHours"] = gpu_hours(self.st, self.now)
            cost = gpu_cost(self.st, self.now, self.pricing.price) if self.pricing else None
            if cost is not None and self.pricing is not None:  # the actual cost beside status.estimate's
                acc["cost"], acc["currency"] = cost, self.pricing.currency
        checked_status(self.st)
        return self.out


def decide(*, name: str, generation: int, labels: dict[str, str], spec: FineTuneJobSpec, spec_hash: str,
           status: dict[str, Any], observed: Observed, now: dt.datetime,
           sizing_retry_seconds: float = 60.0, pricing: Pricing | None = None,
           throughput: ThroughputBook | None = None) -> Decision:
    """Compute the desired status and the actions for one FineTuneJob (level-based, idempotent).

    Runs once per pass. When `phase_of` says create, the caller sizes the job and renders its children into
    `observed` first."""
    del name  # part of the signature for logging callers; the branches need only what follows
    branch = phase_of(status, spec, observed.job, spec_hash)
    p = _Pass(status, generation, now, pricing, throughput)
    if branch == TERMINAL:
        return _decide_terminal(p, spec, observed)
    if branch == CANCEL:
        return _decide_cancel(p, observed)
    if branch == CREATE:
        if observed.sizing is None:
            raise ValueError("a pass that creates the trainer Job must size it first (Observed.sizing)")
        if observed.preflight and not validated_for(status, spec_hash):
            return _decide_preparing(p, spec, spec_hash, labels, observed, sizing_retry_seconds)
        return _decide_create(p, spec, spec_hash, labels, observed, sizing_retry_seconds)
    if branch == RECREATE:
        return _decide_recreate(p, spec)
    if observed.resize is not None:
        return _decide_resize(p, spec, spec_hash, observed)
    return _decide_follow(p, spec, labels, observed)


CANCEL_STOP_RECHECK_SECONDS = 5.0  # a cancelled run's pods are stopping: look again (their watch events come too)


def _cancelled_message(st: dict[str, Any]) -> str:
    """The Cancelled phase's message: while the run's pods still stop, it says so."""
    if (st.get("accounting") or {}).get("runningSince"):
        return ("spec.cancel is true: deleting the trainer Job; its pods are stopping (their GPU time counts until "
                "they exit)")
    return "spec.cancel is true: the trainer Job was deleted"


def _decide_terminal(p: _Pass, spec: FineTuneJobSpec, observed: Observed) -> Decision:
    """Terminal phases are sticky; only the TTL clean-up and cancel's Job deletion remain."""
    st, out = p.st, p.out
    if p.old_phase == "Cancelled" and observed.job is not None \
            and not (observed.job.get("metadata") or {}).get("deletionTimestamp"):
        out.actions.append(Action("delete_job", foreground=True))
    if p.old_phase == "Cancelled" and (st.get("accounting") or {}).get("runningSince"):
        close_when_stopped(st, p.now, observed.pods)  # the cancelled run's pods still stopping, or gone now
        if not (st.get("accounting") or {}).get("runningSince"):
            st["message"] = _cancelled_message(st) + "; its pods have stopped"
        else:
            out.retry_after = CANCEL_STOP_RECHECK_SECONDS
    ttl = spec.ttl_seconds_after_finished
    done = parse_time(p.old.get("completionTime"))
    if ttl > 0 and done is not None and observed.children_exist:
        if p.now >= done + dt.timedelta(seconds=ttl):
            out.actions.append(Action("delete_children"))
            st["childrenDeleted"] = True
            out.events.append(("Normal", R.TTL_EXPIRED,
                               f"ttlSecondsAfterFinished ({ttl}s) expired: deleted the Job, Service and ConfigMap"))
        else:
            ttl_left = (done + dt.timedelta(seconds=ttl) - p.now).total_seconds()
            out.retry_after = min(ttl_left, out.retry_after) if out.retry_after is not None else ttl_left
    return p.finish()


def _decide_cancel(p: _Pass, observed: Observed) -> Decision:
    """Cancel: delete the Job (and a preflight still running), keep the FineTuneJob and what it learned. The Job
    is deleted in the foreground, so it stays (deleting) while its pods stop: their GPUs are held until then
    (the trainer saves a checkpoint on SIGTERM), and the run's GPU time counts until their last exit
    (`_decide_terminal` closes it)."""
    if observed.job is not None:
        p.out.actions.append(Action("delete_job", foreground=True))
    if observed.preflight_job is not None and not _job_finished(observed.preflight_job):
        p.out.actions.append(Action("delete_preflight"))
    close_when_stopped(p.st, p.now, observed.pods)
    p.st["completionTime"] = p.now_s
    p.set_phase("Cancelled", R.CANCELLED, _cancelled_message(p.st))
    p.cond(C.CANCELLED, True, R.CANCELLED, "cancelled by spec.cancel")
    p.cond(C.RUNNING, False, R.CANCELLED)
    p.cond(C.READY, False, R.CANCELLED, "the run was cancelled")
    return p.finish()


def _decide_create(p: _Pass, spec: FineTuneJobSpec, want_hash: str, labels: dict[str, str], observed: Observed,
                   sizing_retry_seconds: float) -> Decision:
    """No Job yet (or it was deleted): create the children from the sizing outcome, or wait for GPUs."""
    st, out, sizing = p.st, p.out, observed.sizing
    assert sizing is not None
    if not sizing.fits or sizing.layout is None:
        if sizing.plan_status:
            st["plan"] = sizing.plan_status
        text = sizing.message + (f" Suggestion: {sizing.suggestion}" if sizing.suggestion else "")
        p.set_phase("Pending", sizing.reason, text, warning=True)
        p.cond(C.SIZED, False, sizing.reason, text)
        p.cond(C.RUNNING, False, sizing.reason)
        p.cond(C.READY, False, sizing.reason, text)
        out.retry_after = sizing_retry_seconds
        return p.finish()
    for child in observed.children:
        out.actions.append(Action("apply", child))
    _record_layout(p, spec, want_hash, sizing)
    recreating = bool(p.old.get("layout")) and p.old_phase != ""
    reason = R.RECREATING if recreating else R.CREATED
    if spec.suspend:
        p.set_phase("Suspended", R.SUSPENDED, "spec.suspend is true")
        p.cond(C.SUSPENDED, True, R.SUSPENDED)
    elif labels.get(KUEUE_QUEUE_LABEL):
        _kueue_queued(p, labels[KUEUE_QUEUE_LABEL], observed)
    else:
        estimate = f"; estimate: {st['estimate']['display']}" if st.get("estimate") else ""
        p.set_phase("Pending", reason, f"created the trainer Job ({sizing.message}){estimate}")
    p.cond(C.RUNNING, False, R.WAITING_FOR_PODS)
    p.cond(C.READY, False, st["reason"], st["message"])
    return p.finish()


def _job_finished(job: dict[str, Any]) -> bool:
    return any(job_condition(job, c) for c in FINISHED_JOB_CONDITIONS)


def _decide_preparing(p: _Pass, spec: FineTuneJobSpec, want_hash: str, labels: dict[str, str], observed: Observed,
                      sizing_retry_seconds: float) -> Decision:
    """Before the trainer Job: run the CPU preflight (plan ConfigMap + `<job>-preflight`), fold its report into
    status.preflight and create the trainer Job in the pass that sees it succeed; a failed preflight fails the
    job with the trainer's reason and message (a bad line: DataError with file:line), and no GPU pod is made."""
    st, out, sizing, job = p.st, p.out, observed.sizing, observed.preflight_job
    assert sizing is not None
    if job is None and (not sizing.fits or sizing.layout is None):
        return _decide_create(p, spec, want_hash, labels, observed, sizing_retry_seconds)  # waits for GPUs
    if job is not None and job_spec_hash(job) != want_hash:
        out.actions.append(Action("delete_preflight"))
        message = "the spec changed: deleting the preflight Job to run it again"
        p.set_phase("Preparing", R.PREFLIGHT_RERUN, message)
        p.cond(C.VALIDATED, "Unknown", R.PREFLIGHT_RERUN, message)
        p.cond(C.READY, False, R.PREFLIGHT_RERUN, message)
        return p.finish()
    if job is None:
        out.actions.extend(Action("apply", child) for child in observed.preflight_children)
        message = "checking the model and the data on CPU before any GPU is used"
        p.set_phase("Preparing", R.PREFLIGHT_RUNNING, message)
        p.cond(C.VALIDATED, "Unknown", R.PREFLIGHT_RUNNING, message)
        p.cond(C.RUNNING, False, R.PREFLIGHT_RUNNING)
        p.cond(C.READY, False, R.PREFLIGHT_RUNNING, message)
        return p.finish()
    pods = sorted(observed.preflight_pods, key=_created)
    failed_pods = [pod for pod in pods if _phase_of(pod) == "Failed"]
    permanent = permanent_failure(failed_pods)
    if job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet"):
        done = [pod for pod in pods if _phase_of(pod) == "Succeeded"]
        if pods and not done:
            # The Job's watch event came before its pod's: wait for the pod that carries the report.
            p.set_phase("Preparing", R.PREFLIGHT_RUNNING, "the preflight finished; reading its report")
            p.out.retry_after = 1.0
            return p.finish()
        summary = parse_summary(done[-1]) if done else None
        report = (summary or {}).get("preflight")
        st["preflight"] = preflight_status(report if isinstance(report, dict) else None, want_hash, p.now_s)
        message = f"preflight: {st['preflight']['display']}"
        fit = traced_fit(st["preflight"].get("trace"), sizing.plan_status, sizing.layout)
        if fit is not None:
            st["preflight"]["trace"].update(fit.record())
            message += f"; {fit.message()}"
        p.cond(C.VALIDATED, True, R.VALIDATED, message)
        out.events.append(("Normal", R.VALIDATED, message))
        advice = advise(spec, st["preflight"]) if isinstance(report, dict) and report else []
        for rule, text in advice:
            out.events.append(("Warning", rule, text))
        if advice:
            p.cond(C.ADVICE, True, advice[0][0], "; ".join(text for _, text in advice))
        else:
            p.cond(C.ADVICE, False, R.ADVICE_NONE,
                   "no advice rule applies" if isinstance(report, dict) and report else "no preflight figures")
        if fit is not None and not fit.fits:
            return _decide_trace_replan(p, spec, fit, observed, (done[-1].get("metadata") or {}).get("name", ""))
        return _decide_create(p, spec, want_hash, labels, observed, sizing_retry_seconds)
    failed = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    if failed is not None or permanent is not None:
        culprit = permanent or (failed_pods[-1] if failed_pods else None)
        cause = trainer_reason(culprit) if culprit is not None else R.PREFLIGHT_FAILED
        detail = failure_text(culprit) if culprit is not None else (failed or {}).get("message", "")
        fix = R.PERMANENT_FAILURE_FIXES.get(cause, "fix the cause named above and recreate the FineTuneJob")
        message = f"the preflight failed with {cause}, before any GPU was used: {detail}; {fix}"
        st["completionTime"] = p.now_s
        p.set_phase("Failed", R.PREFLIGHT_FAILED, message, warning=True)
        p.cond(C.VALIDATED, False, cause, message)
        p.cond(C.FAILED, True, R.PREFLIGHT_FAILED, message)
        p.cond(C.RUNNING, False, R.PREFLIGHT_FAILED)
        p.cond(C.READY, False, R.PREFLIGHT_FAILED, message)
        return p.finish()
    stuck = stuck_container_message(pods)
    claim = "" if stuck else observed.cache_claim_wait
    waiting = stuck or claim or unschedulable_message(pods)
    reason = (R.CONTAINER_NOT_STARTING if stuck  # the trainer image, as in its Job
              else R.CACHE_CLAIM_NOT_BOUND if claim else R.PREFLIGHT_RUNNING)
    message = "checking the model and the data on CPU before any GPU is used" + (f": {waiting}" if waiting else "")
    if failed_pods:
        message += f" (retry after failure: {failure_text(failed_pods[-1])})"
    p.set_phase("Preparing", reason, message, warning=bool(stuck or claim))
    p.cond(C.VALIDATED, "Unknown", reason, message)
    p.cond(C.RUNNING, False, reason)
    p.cond(C.READY, False, reason, message)
    return p.finish()


def _decide_recreate(p: _Pass, spec: FineTuneJobSpec) -> Decision:
    """The Job exists but was rendered from another spec (changed while suspended): delete it to recreate."""
    p.out.actions.append(Action("delete_job"))
    close_running(p.st, p.now)
    p.set_phase("Suspended" if spec.suspend else "Pending", R.RECREATING,
                "the spec changed: deleting the trainer Job to recreate it (the run resumes from its last checkpoint)")
    p.cond(C.RUNNING, False, R.RECREATING)
    p.cond(C.READY, False, R.RECREATING, p.st["message"])
    return p.finish()


def _decide_resize(p: _Pass, spec: FineTuneJobSpec, want_hash: str, observed: Observed) -> Decision:
    """The pods never got a node on the GPU type the sizer chose, and another one fits with GPUs free now: in one
    pass, delete the Job (its pods never ran), remember the type, and create the children with the new layout
    (`observed.children`, rendered for it), so the move happens while those GPUs are free."""
    resize = observed.resize
    assert resize is not None and resize.layout is not None
    if not observed.children:
        raise ValueError("a pass that moves the trainer Job must render its children for the new layout")
    p.out.actions.append(Action("delete_job"))
    p.out.actions.extend(Action("apply", child) for child in observed.children)
    close_running(p.st, p.now)
    p.st["unschedulableGpuTypes"] = sorted(set(p.st.get("unschedulableGpuTypes") or []) | {observed.resize_from})
    _record_layout(p, spec, want_hash, resize)
    scheduler = unschedulable_message(observed.pods)
    message = (f"the trainer pods could not be scheduled on {observed.resize_from}"
               + (f" ({scheduler})" if scheduler else "")
               + f"; recreated the trainer Job without it: {resize.message}")
    p.set_phase("Pending", R.RESIZING, message, warning=True, always_event=True)
    p.cond(C.RUNNING, False, R.RESIZING, message)
    p.cond(C.READY, False, R.RESIZING, message)
    return p.finish()


def _record_layout(p: _Pass, spec: FineTuneJobSpec, want_hash: str, sizing: SizingOutcome) -> None:
    """The status of a layout the pass creates the trainer Job with: layout, plan, Sized, and the cost estimate
    when the preflight measured steps."""
    st = p.st
    assert sizing.layout is not None
    if sizing.plan_status:
        st["plan"] = plan_with_trace(sizing.plan_status, st.get("preflight"))
    st["layout"] = sizing.layout.to_status(want_hash)
    p.cond(C.SIZED, True, sizing.reason, sizing.message)
    if st.get("preflight") and st["preflight"].get("steps"):
        calibration = p.throughput.calibration(str(st["layout"].get("gpuType") or ""), spec.method,
                                               plan_params(st.get("plan"))) \
            if p.throughput is not None else None
        st["estimate"] = estimate_status(st["preflight"], st["layout"], st.get("plan"), spec, p.pricing or Pricing(),
                                         calibration)


def _layout_strategy(status: dict[str, Any]) -> str:
    """The resolved strategy of the layout in status (none | ddp | deepspeed; '' before sizing)."""
    return str((status.get("layout") or {}).get("strategy") or "")


def _decide_replan(p: _Pass, spec: FineTuneJobSpec, pod: dict[str, Any], outlook: MemoryOutlook | None,
                   pods: list[dict[str, Any]] | None = None) -> Decision:
    """The trainer ran out of GPU memory: record the next leaner plan (kubetune.oom: micro batch, checkpointing;
    then kubetune.oom_layout: a layout that needs less memory per GPU) and delete the Job, so the next pass creates
    it with that plan (resuming from the last checkpoint); fail when no leaner plan is left."""
    st = p.st
    summary = parse_summary(pod) or {}
    if summary:
        _fold_trainer_report(st, summary, p.now_s, final=True)
    close_running(st, p.now, pods)  # at the pods' last exit once all have exited (the Job is deleted now)
    replans = list(st.get("memoryReplans") or [])
    name = (pod.get("metadata") or {}).get("name", "")
    if not any(r.get("pod") == name for r in replans):
        blocked = outlook.batch_blocked if outlook is not None else ""
        leaner = None if blocked else next_memory_plan(spec, replans, _layout_strategy(st))
        entry: dict[str, Any] = {"pod": name, "step": int(summary.get("step") or 0),
                                 "message": str(summary.get("message") or "")[:1024]}
        if outlook is not None:
            entry["failed"] = outlook.failed_record()
        new_layout = outlook.layout_record() if outlook is not None and leaner is None else None
        if leaner is None and new_layout is None:
            if blocked and outlook is not None:
                message = (f"{failure_text(pod)}; {blocked}, and {outlook.leaner.reason}; use a shorter "
                           "training.maxSeqLength, method qlora, or fewer spec.resources / spec.distributed pins")
            else:
                message = f"{failure_text(pod)}; {exhausted_message(spec, replans)}"
                if outlook is not None:
                    message += f" ({outlook.leaner.reason})"
            st["completionTime"] = p.now_s
            p.set_phase("Failed", R.OUT_OF_MEMORY, message, warning=True)
            p.cond(C.FAILED, True, R.OUT_OF_MEMORY, message)
            p.cond(C.RUNNING, False, R.OUT_OF_MEMORY)
            p.cond(C.READY, False, R.OUT_OF_MEMORY, message)
            return p.finish()
        if leaner is not None:
            entry["training"], entry["change"] = leaner
        else:
            assert outlook is not None and new_layout is not None
            entry["training"] = current_training(spec, replans)
            entry["change"] = (f"{blocked}, so a smaller micro batch cannot help; " if blocked else "") + outlook.leaner.change
            entry["layout"] = new_layout
        replans.append(entry)
        st["memoryReplans"] = replans
    p.out.actions.append(Action("delete_job"))
    last = replans[-1]
    ckpt = int((st.get("checkpoint") or {}).get("step") or 0)
    message = (f"the trainer ran out of GPU memory at step {last['step']} ({failure_text(pod)}); re-planned: "
               f"{last['change']}; recreating the trainer Job, which resumes from "
               + (f"checkpoint step-{ckpt}" if ckpt else "the start"))
    p.set_phase("Pending", R.REPLANNED_OOM, message, warning=True)
    p.cond(C.RUNNING, False, R.REPLANNED_OOM, message)
    p.cond(C.READY, False, R.REPLANNED_OOM, message)
    return p.finish()


def _decide_trace_replan(p: _Pass, spec: FineTuneJobSpec, fit: TracedFit, observed: Observed, pod: str) -> Decision:
    """The preflight's traced step does not fit the sized layout: create no trainer Job on it. Record a re-plan in
    status.memoryReplans, as after running out of memory (kubetune.oom_layout), before any GPU is used: a layout
    that fits with the traced figure as a floor, else a smaller micro batch or gradient checkpointing; the next pass
    creates the trainer Job with it. Fail when neither is left."""
    st, outlook = p.st, observed.trace
    assert observed.sizing is not None
    if observed.sizing.plan_status:
        st["plan"] = plan_with_trace(observed.sizing.plan_status, st.get("preflight"))
    replans = list(st.get("memoryReplans") or [])
    found = f"the preflight's traced step does not fit: {fit.message()}"
    entry: dict[str, Any] = {"pod": pod, "reason": R.TRACE_EXCEEDS_ESTIMATE, "step": 0, "message": found[:1024]}
    if outlook is not None:
        entry["failed"] = outlook.failed_record()
    leaner = outlook.leaner if outlook is not None else None
    if outlook is not None and leaner is not None and leaner.layout is not None:
        entry["training"] = current_training(spec, replans)
        entry["layout"] = outlook.layout_record()
        entry["change"] = (f"{describe_layout(outlook.failure.layout)} -> {describe_layout(leaner.layout)}: "
                           f"{gib(leaner.estimate)} GiB estimated per GPU of {gib(leaner.usable)} GiB usable, "
                           "with the traced figure as a floor")
    else:
        blocked = outlook.batch_blocked if outlook is not None else ""
        smaller = None if blocked else next_memory_plan(spec, replans, _layout_strategy(st))
        if smaller is None:
            message = (f"{found}; no layout of the cluster's GPUs within the spec's pins fits with the traced figure"
                       + (f" ({blocked})" if blocked else "") + "; use a shorter training.maxSeqLength, method "
                       "qlora, or fewer spec.resources / spec.distributed pins")
            st["completionTime"] = p.now_s
            p.set_phase("Failed", R.TRACE_EXCEEDS_ESTIMATE, message, warning=True)
            p.cond(C.SIZED, False, R.TRACE_EXCEEDS_ESTIMATE, message)
            p.cond(C.FAILED, True, R.TRACE_EXCEEDS_ESTIMATE, message)
            p.cond(C.RUNNING, False, R.TRACE_EXCEEDS_ESTIMATE)
            p.cond(C.READY, False, R.TRACE_EXCEEDS_ESTIMATE, message)
            return p.finish()
        entry["training"], entry["change"] = smaller
    replans.append(entry)
    st["memoryReplans"] = replans
    message = f"{found}; re-sized before any GPU was used: {entry['change']}"
    p.set_phase("Pending", R.TRACE_EXCEEDS_ESTIMATE, message, warning=True)
    p.cond(C.SIZED, False, R.TRACE_EXCEEDS_ESTIMATE, message)
    p.cond(C.RUNNING, False, R.TRACE_EXCEEDS_ESTIMATE)
    p.cond(C.READY, False, R.TRACE_EXCEEDS_ESTIMATE, message)
    p.out.retry_after = 1.0  # the next pass sizes with the re-plan and creates the trainer Job
    return p.finish()


def _decide_follow(p: _Pass, spec: FineTuneJobSpec, labels: dict[str, str], observed: Observed) -> Decision:
    """Follow our current Job: progress, completion, failure, suspend/Kueue, running or waiting pods."""
    st, out, old, now, now_s, old_phase = p.st, p.out, p.old, p.now, p.now_s, p.old_phase
    job = observed.job
    assert job is not None
    kueue = bool(labels.get(KUEUE_QUEUE_LABEL))
    job_uid = (job.get("metadata") or {}).get("uid")
    pods = [pod for pod in observed.pods
            if not job_uid or any(o.get("uid") == job_uid for o in (pod.get("metadata") or {}).get("ownerReferences") or [])]
    pods.sort(key=_created)
    if not st.get("layout") and observed.sizing is not None and observed.sizing.layout is not None:
        # The Job exists but its layout never reached the status (the operator stopped between creating
        # the Job and writing the status): record what the sizer decides for this spec.
        if observed.sizing.plan_status:
            st["plan"] = observed.sizing.plan_status
        st["layout"] = observed.sizing.layout.to_status(job_spec_hash(job))
        p.cond(C.SIZED, True, observed.sizing.reason, observed.sizing.message)
    # When the pass that created this Job (a move, or a create) could not write the status, the Job says what runs.
    adopt_recorded_layout(st, job, job_spec_hash(job))
    job_status = job.get("status") or {}
    job_suspended = bool((job.get("spec") or {}).get("suspend"))
    failed_pods = [pod for pod in pods if _phase_of(pod) == "Failed"]
    acc = st.setdefault("accounting", {})
    acc["restarts"] = max(int(job_status.get("failed") or 0), len(failed_pods))
    if observed.progress:
        _fold_trainer_report(st, observed.progress, now_s, final=False)

    # The Job controller sets FailureTarget / SuccessCriteriaMet as soon as the outcome is decided and
    # Failed / Complete only once every pod has terminated: act on the first, so a permanent failure is not
    # reported as a retry in between.
    complete = job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet")
    failed = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    # A trainer exit code the pod failure policy fails the Job on: report the failure now, not a retry.
    permanent = permanent_failure(failed_pods)
    oom = out_of_memory(failed_pods) if permanent is None and complete is None else None
    if oom is not None:
        return _decide_replan(p, spec, oom, observed.memory, pods)
    if complete is not None:
        close_running(st, now, pods)
        zero = [pod for pod in pods if pod_index(pod) == 0 and _phase_of(pod) == "Succeeded"]
        summary = parse_summary(zero[-1]) if zero else None
        if summary:
            _fold_trainer_report(st, summary, now_s, final=True)
        st["completionTime"] = job_status.get("completionTime") or now_s
        st.setdefault("startTime", job_status.get("startTime") or now_s)
        message = "training finished"
        if summary and summary.get("step") is not None:
            message += f" at step {summary.get('step')}"
        if summary and summary.get("message"):  # early stopping, or a divergence reported with action warn
            message += f" ({summary['message']})"
        if st.get("artifacts"):
            message += "; artifacts: " + ", ".join(f"{k}={v}" for k, v in sorted(st["artifacts"].items()))
        evaluation = (summary or {}).get("evaluation")
        if isinstance(evaluation, dict):
            st["evaluation"] = E.evaluation_status(evaluation)
            message += f"; evaluation: {st['evaluation']['display']}"
        p.set_phase("Succeeded", R.COMPLETED, message)
        p.cond(C.SUCCEEDED, True, R.COMPLETED, message)
        p.cond(C.RUNNING, False, R.COMPLETED)
        p.cond(C.READY, True, R.COMPLETED, message)
        if isinstance(evaluation, dict):
            passed, ev_reason, ev_message = E.verdict(evaluation)
            p.cond(C.EVALUATION_PASSED, passed, ev_reason, ev_message)
            out.events.append(("Normal" if passed else "Warning", ev_reason, ev_message))
        elif spec.evaluation is not None:
            p.cond(C.EVALUATION_PASSED, "Unknown", R.EVALUATION_ERROR,
                   "the trainer reported no evaluation (is the trainer image older than spec.evaluation?)")
        diverged = str((summary or {}).get("divergence") or "")
        if diverged:  # training.divergence.action warn: the run finished, the user must still hear of it
            text = f"{diverged}; the run continued (training.divergence.action: warn): check the loss curve " \
                   "and the evaluation before using the adapter"
            p.cond(C.LOSS_DIVERGED, True, R.DIVERGED_CONTINUED, text)
            out.events.append(("Warning", R.DIVERGED_CONTINUED, text))
        export = (summary or {}).get("export")
        if isinstance(export, dict):
            done, ex_reason, ex_message = export_verdict(export)
            p.cond(C.EXPORTED, done, ex_reason, ex_message)
            if not done:
                out.events.append(("Warning", ex_reason, ex_message))
        if spec.tracking is not None and (spec.tracking.mlflow is not None or spec.tracking.wandb is not None):
            tracking = (summary or {}).get("tracking")
            if tracking_status(tracking):
                st["tracking"] = tracking_status(tracking)
            tracked, tr_reason, tr_message = tracking_verdict(tracking, str((summary or {}).get("message", "")),
                                                              mlflow=spec.tracking.mlflow is not None,
                                                              wandb=spec.tracking.wandb is not None)
            p.cond(C.TRACKED, tracked, tr_reason, tr_message)
            if not tracked:
                out.events.append(("Warning", tr_reason, tr_message))
        return p.finish()
    if failed is not None or permanent is not None:
        close_running(st, now, pods)  # a failed run's GPU time ends at its last exit too, once every pod has one
        reason = JOB_FAILURE_REASONS.get((failed or {}).get("reason", ""), R.JOB_FAILED)
        ranked = sorted(failed_pods, key=lambda pod: (pod_index(pod) != 0, _created(pod)))
        latest_zero = [pod for pod in failed_pods if pod_index(pod) == 0]
        culprit = latest_zero[-1] if latest_zero else (ranked[-1] if ranked else None)
        if permanent is not None:
            culprit = permanent
        detail = failure_text(culprit) if culprit is not None else ""
        summary = parse_summary(culprit) if culprit is not None else None
        if summary:
            _fold_trainer_report(st, summary, now_s, final=True)
        if permanent is not None:
            # The same reason before and after the Job controller marks the Job failed: one Event.
            cause = trainer_reason(permanent)
            reason = cause if cause in R.PERMANENT_TRAINER_REASONS else R.POD_FAILURE_POLICY
            fix = R.PERMANENT_FAILURE_FIXES.get(cause, "fix the cause named above and recreate the FineTuneJob")
            message = f"the trainer failed with {cause}, which a retry cannot fix (not retried): {detail}; {fix}"
        else:
            message = f"{failed.get('message') or failed.get('reason', 'the trainer Job failed')}"
            if detail:
                message += f"; last failure: {detail}"
        st["completionTime"] = job_status.get("completionTime") or now_s
        p.set_phase("Failed", reason, message, warning=True)
        p.cond(C.FAILED, True, reason, message)
        p.cond(C.RUNNING, False, reason)
        p.cond(C.READY, False, reason, message)
        return p.finish()

    # Suspend / Kueue handling.
    if spec.suspend and not job_suspended:
        out.actions.append(Action("suspend_job", value=True))
        job_suspended = True
    elif not spec.suspend and job_suspended and not kueue:
        out.actions.append(Action("suspend_job", value=False))
    if spec.suspend:
        close_when_stopped(st, now, pods)
        stopping = "stopping (their GPU time counts until they exit)" if "runningSince" in acc else "stopped"
        p.set_phase("Suspended", R.SUSPENDED, f"spec.suspend is true: the trainer pods are {stopping}; "
                    "the run resumes from its last checkpoint when unsuspended")
        p.cond(C.SUSPENDED, True, R.SUSPENDED)
        p.cond(C.RUNNING, False, R.SUSPENDED)
        p.cond(C.READY, False, R.SUSPENDED, st["message"])
        return p.finish()
    p.cond(C.SUSPENDED, False, R.RESUMED)
    if job_suspended and kueue:
        close_when_stopped(st, now, pods)
        _kueue_queued(p, labels[KUEUE_QUEUE_LABEL], observed)
        p.cond(C.RUNNING, False, st["reason"])
        p.cond(C.READY, False, st["reason"], st["message"])
        return p.finish()
    if kueue and observed.workload is not None:
        verdict = admission(observed.workload, labels[KUEUE_QUEUE_LABEL])
        p.cond(C.ADMITTED, verdict.admitted, verdict.reason, verdict.message)

    running = [pod for pod in pods
               if _phase_of(pod) == "Running" and not (pod.get("metadata") or {}).get("deletionTimestamp")]
    preempted = bool(failed_pods) and was_preempted(failed_pods[-1])
    if preempted:
        retry_note = f" (resuming after preemption: {failure_text(failed_pods[-1])})"
    else:
        retry_note = f" (retry after failure: {failure_text(failed_pods[-1])})" if failed_pods else ""
    retry_reason = R.PREEMPTED_RESUMING if preempted else R.RETRYING
    if running and not job_suspended:
        stopped = [pod for pod in pods if pod not in running]
        # A start this pass sees: from another phase, or a restart that happened since the last pass.
        unseen_restart = old_phase == "Running" and restarted_between_passes(acc, running, stopped)
        starting = old_phase != "Running" or unseen_restart
        if starting:
            if unseen_restart:  # the stretch before ended at its pods' exit
                close_when_stopped(st, now, stopped)
            if "runningSince" in acc:  # the pods of the stretch before still stop while these run
                close_running(st, now)
                acc["runningSince"] = now_s
            else:
                acc["runningSince"] = running_since(acc, running, stopped, now)
            # The checkpoint known before this start is the one the trainer resumes from.
            ckpt_step = int((old.get("checkpoint") or {}).get("step") or 0)
            if ckpt_step > 0:
                st["resumedFromStep"] = ckpt_step
        elif "runningSince" not in acc:
            acc["runningSince"] = now_s
        st.setdefault("startTime", now_s)
        pods_total = int((st.get("layout") or {}).get("pods") or len(running))
        message = f"{len(running)}/{pods_total} trainer pod(s) running{retry_note}"
        if st.get("resumedFromStep") and starting:
            message += f"; resuming from checkpoint step {st['resumedFromStep']}"
        reason = retry_reason if failed_pods else R.PODS_RUNNING
        p.set_phase("Running", reason, message)
        p.cond(C.RUNNING, True, reason, message)
        p.cond(C.READY, True, reason, message)
        return p.finish()

    finished = [pod for pod in pods if _phase_of(pod) == "Succeeded"]
    if finished and not job_suspended and old_phase == "Running" and len(finished) >= len(pods) - len(failed_pods):
        # Every live trainer pod exited 0 and the Job controller has not marked the Job complete yet: the run is
        # finishing, not starting again (reporting Pending here would flap the phase right before Succeeded). The
        # status stays as it is: the Job's completion follows within a second or two, and a write for that moment
        # would cost every job one more status write (the apiserver's most expensive request at scale).
        return p.finish()

    close_when_stopped(st, now, pods)
    stuck = stuck_container_message(pods)
    waiting = stuck or unschedulable_message(pods)
    reason = R.CONTAINER_NOT_STARTING if stuck else retry_reason if failed_pods else R.WAITING_FOR_PODS
    message = "waiting for the trainer pods to start" + (f": {waiting}" if waiting else "") + retry_note
    bound = seconds_since_bound(pods, now) if not waiting and not job_suspended else None
    if (bound is not None and bound < BOUND_QUIET_SECONDS and (old_phase, old.get("reason")) == ("Pending", reason)
            and old.get("message") != message):
        out.retry_after = BOUND_QUIET_SECONDS - bound  # rewrite the message then if the pods still do not run
        return p.finish()
    p.set_phase("Pending", reason, message, warning=bool((failed_pods and not preempted) or stuck))
    p.cond(C.RUNNING, False, reason, message)
    p.cond(C.READY, False, reason, message)
    return p.finish()


def _kueue_queued(p: _Pass, queue: str, observed: Observed) -> None:
    """Phase Queued for a Job that waits for Kueue: Kueue's own reason and words (from the Workload), an
    Admitted condition, and an Event whenever they change; a clear warning when the cluster has no Kueue."""
    if observed.kueue_installed is False:
        reason, message, admitted, warning = R.KUEUE_NOT_INSTALLED, not_installed_message(queue), False, True
    else:
        verdict = admission(observed.workload, queue)
        reason, message, admitted = verdict.reason, verdict.message, verdict.admitted
        warning = verdict.evicted or reason == R.KUEUE_INACTIVE
    if admitted:  # admitted, and Kueue has not unsuspended the Job yet
        message += "; waiting for Kueue to start the Job"
    p.set_phase("Queued", reason, message, warning=warning)
    if (p.old_phase, p.old.get("reason")) == ("Queued", reason) and p.old.get("message") != message:
        # Kueue's message changed (e.g. other numbers, another flavor tried): say so once, not every pass.
        p.out.events.append(("Warning" if warning else "Normal", reason, f"Queued: {message}"))
    p.cond(C.ADMITTED, admitted, reason, message)


def decide_blocked(*, generation: int, status: dict[str, Any], reason: str, message: str, now: dt.datetime,
                   retry_seconds: float) -> Decision:
    """The pass could not carry out its actions for a reason the user must fix: say so in the status, the
    conditions and an Event, and try again later."""
    p = _Pass(status, generation, now)
    p.set_phase(p.old_phase if p.old_phase in ("Pending", "Preparing", "Queued", "Suspended") else "Pending", reason, message,
                warning=True)
    p.cond(C.RUNNING, False, reason, message)
    p.cond(C.READY, False, reason, message)
    p.out.retry_after = retry_seconds
    return p.finish()


def decide_not_owned(*, generation: int, status: dict[str, Any], kind: str, child: str, owner: str,
                     now: dt.datetime, retry_seconds: float, deleting: bool = False) -> Decision:
    """A child name this FineTuneJob needs is taken by an object it does not own, or by one being deleted:
    say so and wait (never adopt it, never patch it)."""
    held = f"owned by {owner}" if owner else "owned by nothing (orphaned)"
    if deleting:
        message = (f"a {kind} named {child!r} ({held}) is being deleted; waiting for it to go "
                   f"before creating this FineTuneJob's own (a finalizer may be holding it)")
    else:
        message = (f"a {kind} named {child!r} already exists and is {held}, not by this FineTuneJob; "
                   f"delete it (or rename this FineTuneJob) and the trainer starts")
    return decide_blocked(generation=generation, status=status, reason=R.CHILD_NOT_OWNED, message=message,
                          now=now, retry_seconds=retry_seconds)


def decide_child_rejected(*, generation: int, status: dict[str, Any], kind: str, child: str, code: int,
                          detail: str, now: dt.datetime, retry_seconds: float) -> Decision:
    """The apiserver refused to create or change a child (e.g. 422 Invalid, 403 Forbidden by a policy or
    a quota): its own words go into the status and an Event."""
    message = f"the apiserver refused the {kind} {child!r} ({code}): {detail}"
    return decide_blocked(generation=generation, status=status, reason=R.CHILD_REJECTED, message=message,
                          now=now, retry_seconds=retry_seconds)


def still_acting(status: dict[str, Any], ttl_seconds: int) -> bool:
    """Whether passes can still change anything for a FineTuneJob: it is not finished, or it was cancelled
    (its Job may still be there), or it finished with a TTL clean-up of its children pending."""
    phase = status.get("phase")
    return (phase not in TERMINAL_PHASES or phase == "Cancelled"
            or (ttl_seconds > 0 and not status.get("childrenDeleted")))


def status_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a status write is needed (ignores the progress timestamp and the running gpuHours tick)."""
    def strip(s: dict[str, Any]) -> dict[str, Any]:
        s = copy.deepcopy(s or {})
        (s.get("progress") or {}).pop("updatedAt", None)
        (s.get("accounting") or {}).pop("gpuHours", None)  # grows every second while running
        (s.get("accounting") or {}).pop("cost", None)  # gpuHours x price: grows with it
        return s
    return strip(old) != strip(new)
