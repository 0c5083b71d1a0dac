"""What this cluster's own finished runs measured, for the time and cost estimate (status.estimate). Pure data.

The datasheet estimate (`kubetune.estimate`: an assumed fraction of the GPU's bf16 peak) is a guess that can be off
by 2x either way, and it knows nothing of the minutes a run spends outside its training steps (pod start, model
load, evaluation, saving and exporting). Every FineTuneJob that succeeds measured both, and its status keeps them:

- **achieved model FLOP/s per device** = `status.metrics.steadyTokensPerSecond` (the training steps' own rate:
  after the first step, without evaluation and checkpoint saving; else `tokensPerSecond`) x FLOPs per token
  (`kubetune.estimate.flops_per_token`: 6 or 4 x parameters, + 2 x with checkpointing) / devices (GPUs, or pods of a
  CPU-only layout). FLOPs make it transferable: a run of another model size on the same GPU type predicts this one.
- **seconds outside training** = `status.accounting.runningSeconds` - `accounting.tokens` / that rate: pod start,
  model load, the warm-up step, evaluation, checkpoints, saving and export.

A run counts only when it is clean: succeeded on its first attempt (no pod restarts, no resume, no memory re-plan),
with a throughput and a running time. The calibration of a GPU type and method is the **median** of the most recent
`RECENT_RUNS` samples of **the same model size** (robust to one slow node), falling back to the GPU type's samples of
any method. FLOP/s transfer between model sizes only roughly: small models keep the GPU (or CPU) far less busy (a
0.16M- and a 2.7M-parameter model on one CPU core: 7.8 against 29 GFLOP/s achieved, measured side by side), and their
seconds outside training differ too. So a job's estimate uses the runs of its own parameter count when there are
any, else those of the nearest measured size (by ratio), and says which. Samples
come from the FineTuneJobs the operator sees: those still in the cluster when it starts, and every one that
succeeds while it runs (a job deleted before the operator restarts is forgotten; nothing else is stored).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
from collections import deque
from typing import Any

RECENT_RUNS = 8  # samples kept per (GPU type, method, model size): recent enough to follow a driver or image change
MAX_SERIES = 512  # (GPU type, method, model size) series kept; the one whose newest run is oldest goes first


@dataclasses.dataclass(frozen=True)
class Sample:
    """What one clean succeeded run measured."""

    uid: str
    gpu_type: str  # "" for a CPU-only layout
    method: str
    params: int  # the model's parameter count (status.plan.estimate.totalParams)
    flops_per_device: float  # achieved model FLOP/s per GPU (per pod on CPU)
    overhead_seconds: float  # running time outside the training steps
    finished: str  # status.completionTime, for the order of samples


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The measured figures an estimate uses for one GPU type (and method)."""

    gpu_type: str
    method: str  # the method the samples ran, or "any" when the GPU type's other methods stood in
    flops_per_device: float
    overhead_seconds: float
    runs: int
    params: int = 0  # the parameter count of the model the samples ran (0: any, when the job's is unknown)
    wanted_params: int = 0  # the job's parameter count

    def describe(self) -> str:
        """For status.estimate.basis."""
        where = self.gpu_type or "CPU"
        if not self.params:
            size = ""
        elif self.params == self.wanted_params:
            size = f" of this model size ({parameter_count(self.params)} parameters)"
        else:
            size = (f" of the nearest measured model size ({parameter_count(self.params)} parameters; this job "
                    f"{parameter_count(self.wanted_params)})")
        return (f"calibrated on this cluster: median of {self.runs} finished {self.method} run(s){size} on {where}, "
                f"{self.flops_per_device / 1e12:.3g} TFLOP/s per device achieved, "
                f"{self.overhead_seconds:.0f} s outside training steps")


def parameter_count(n: int) -> str:
    """8.03B, 2.71M, 162k."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def sample_of(obj: dict[str, Any], flops_per_token: Any) -> Sample | None:
    """The sample of a FineTuneJob object, None unless it is a clean succeeded run with the figures.

    `flops_per_token(total_params, method, gradient_checkpointing)` is `kubetune.estimate.flops_per_token`."""
    meta, spec, st = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    if st.get("phase") != "Succeeded" or st.get("resumedFromStep") or st.get("memoryReplans"):
        return None
    acc, layout, progress = st.get("accounting") or {}, st.get("layout") or {}, st.get("progress") or {}
    if int(_num(acc.get("restarts"))) > 0:
        return None
    metrics = st.get("metrics") or {}
    # The steps' own rate when the trainer reports it (warm-up, evaluation and checkpoints then count as time
    # outside training, which does not grow with the run's length), else the whole loop's.
    tps = _num(metrics.get("steadyTokensPerSecond") or metrics.get("tokensPerSecond") or progress.get("tokensPerSecond"))
    tokens, running = _num(acc.get("tokens")), _num(acc.get("runningSeconds"))
    params = int(_num(((st.get("plan") or {}).get("estimate") or {}).get("totalParams")))
    gpus = int(_num(layout.get("totalGpus")))
    devices = gpus if gpus > 0 else int(_num(layout.get("pods")))
    if tps <= 0 or tokens <= 0 or running <= 0 or params <= 0 or devices <= 0:
        return None
    method = str(spec.get("method") or "lora")
    checkpointing = bool((spec.get("training") or {}).get("gradientCheckpointing", True))
    train_seconds = tokens / tps
    return Sample(uid=str(meta.get("uid") or ""), gpu_type=str(layout.get("gpuType") or "") if gpus > 0 else "",
                  method=method, params=params,
                  flops_per_device=tps * flops_per_token(params, method, checkpointing) / devices,
                  overhead_seconds=max(running - train_seconds, 0.0), finished=str(st.get("completionTime") or ""))


def nearest_size(sizes: set[int], params: int) -> int:
    """The measured parameter count closest to `params` by ratio (the larger one on a tie); 0 when `params` is
    unknown (<= 0), which means every size."""
    if params <= 0:
        return 0
    return min(sizes, key=lambda n: (abs(math.log(n / params)), -n))


def calibrate(samples: list[Sample], gpu_type: str, method: str, params: int = 0) -> Calibration | None:
    """The median figures of the most recent samples for this GPU type and method (else any method), of the model
    size nearest `params` (the job's parameter count; <= 0: of every size)."""
    for want_method in (method, None):
        chosen = [s for s in samples if s.gpu_type == gpu_type and want_method in (None, s.method) and s.params > 0]
        if chosen:
            size = nearest_size({s.params for s in chosen}, params)
            chosen = sorted((s for s in chosen if size in (0, s.params)), key=lambda s: s.finished)[-RECENT_RUNS:]
            return Calibration(gpu_type=gpu_type, method=want_method or "any",
                               flops_per_device=statistics.median(s.flops_per_device for s in chosen),
                               overhead_seconds=statistics.median(s.overhead_seconds for s in chosen),
                               runs=len(chosen), params=size, wanted_params=max(params, 0))
    return None


class ThroughputBook:
    """The samples of the FineTuneJobs the operator has seen succeed (thread-safe; fed by the watch)."""

    def __init__(self, flops_per_token: Any) -> None:
        self._flops_per_token = flops_per_token
        self._lock = threading.Lock()
        self._samples: dict[tuple[str, str, int], deque[Sample]] = {}
        self._uids: set[str] = set()

    def observe(self, obj: dict[str, Any]) -> bool:
        """Record the FineTuneJob's sample when it is a clean succeeded run seen for the first time."""
        sample = sample_of(obj, self._flops_per_token)
        if sample is None:
            return False
        with self._lock:
            if sample.uid in self._uids:
                return False
            key = (sample.gpu_type, sample.method, sample.params)
            if key not in self._samples and len(self._samples) >= MAX_SERIES:
                self._forget_series(min(self._samples, key=lambda k: self._samples[k][-1].finished))
            queue = self._samples.setdefault(key, deque(maxlen=RECENT_RUNS))
            if len(queue) == queue.maxlen:
                self._uids.discard(queue[0].uid)
            queue.append(sample)
            self._uids.add(sample.uid)
            return True

    def _forget_series(self, key: tuple[str, str, int]) -> None:
        for sample in self._samples.pop(key):
            self._uids.discard(sample.uid)

    def calibration(self, gpu_type: str, method: str, params: int = 0) -> Calibration | None:
        """The calibration for a layout on this GPU type ("" for CPU) and method of a model of `params` parameters
        (0: unknown), None before any clean run."""
        with self._lock:
            samples = [s for (g, _, _), queue in self._samples.items() if g == gpu_type for s in queue]
        return calibrate(samples, gpu_type, method, params)
