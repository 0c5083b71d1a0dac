"""The preflight's memory trace: the trainer's real step on fake tensors for the plan's exact model and data.

After the data checks the preflight traces one training step (`kubetune_trainer.memtrace`) with the resolved
config.json at full size and the plan's per-rank settings (method, micro batch, LoRA, quantization, optimizer,
checkpointing, packing), at the sequence length the data actually produces: the longest training row after
tokenization, truncation and packing, never more than `maxSeqLength`. The trace runs in a subprocess
(`python -m kubetune_trainer.preflight_trace`) under a time bound, so a slow trace or a crash never fails the
preflight: it ends as `{"skipped": "<reason>"}` and the operator keeps the analytic estimate.

The report is per GPU (per rank): one process is traced; with DeepSpeed ZeRO-1/2 the per-rank share is derived
from the traced breakdown at its peak as DeepSpeed partitions it (stage 1: optimizer states / N, stage 2: also
gradients / N), as bench/estimate_vs_trace.py does. Runtime overhead (CUDA context, NCCL and DDP buffers,
allocator fragmentation) is not traced; the operator adds its documented constants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRACE_SECONDS_ENV = "KUBETUNE_PREFLIGHT_TRACE_SECONDS"
# Set by the operator when the sized layout has no GPU memory to check (a CPU-only layout): why no trace runs.
TRACE_SKIP_ENV = "KUBETUNE_PREFLIGHT_TRACE_SKIP"
DEFAULT_TRACE_SECONDS = 600  # an 8B model traces in 1-2 minutes on one CPU, a 70B one in several
BREAKDOWN_KEYS = ("weights", "gradients", "optimizerStates", "activations")
MAX_TEXT = 240  # characters of a skip reason or the peak's place kept in the termination message


def trace_seconds() -> int:
    """The time bound of the trace ($KUBETUNE_PREFLIGHT_TRACE_SECONDS; 0 turns the trace off)."""
    raw = os.environ.get(TRACE_SECONDS_ENV, "")
    try:
        return max(0, int(raw)) if raw.strip() else DEFAULT_TRACE_SECONDS
    except ValueError:
        return DEFAULT_TRACE_SECONDS


def traced_seq_length(row_lengths: list[int], max_seq_length: int) -> int:
    """The sequence length one micro-batch of this data reaches: the longest training row (packed blocks
    included), at most maxSeqLength, at least 2."""
    longest = max(row_lengths, default=max_seq_length)
    return max(2, min(int(longest), int(max_seq_length)))


def unsupported_layout(plan: Any) -> str:
    """Why the plan's layout cannot be traced as one process ('' when it can)."""
    dist = plan.distributed
    if dist.strategy == "deepspeed":
        if plan.method == "full":
            return ("DeepSpeed full fine-tuning keeps DeepSpeed's own fp32 master partition and optimizer, which the "
                    "one-process trace does not run")
        if dist.zero_stage >= 3:
            return "ZeRO-3 gathers parameters layer by layer, which the one-process trace does not model"
        if dist.offload_optimizer or dist.offload_params:
            return "DeepSpeed CPU offload moves tensors to host memory, which the trace does not model"
    return ""


def trace_plan_dict(plan: Any, seq_length: int) -> dict[str, Any]:
    """The plan the trace runs: the plan's own, at the data's sequence length."""
    data = plan.to_json_dict()
    data["training"] = {**data["training"], "maxSeqLength": int(seq_length)}
    return data


def per_rank(report: dict[str, Any], plan: Any) -> dict[str, Any]:
    """The compact per-GPU trace block of the termination message from a memtrace report (camelCase)."""
    dist = plan.distributed
    n = max(dist.world_size, 1)
    zero = dist.zero_stage if dist.strategy == "deepspeed" else 0
    b = {k: int((report.get("breakdown") or {}).get(k, 0)) for k in BREAKDOWN_KEYS}
    paged = int(report.get("pagedOptimizerBytes") or 0)
    basis = "one process"
    if zero and n > 1:
        b["optimizerStates"] = -(-b["optimizerStates"] // n)
        if zero >= 2:
            b["gradients"] = -(-b["gradients"] // n)
        paged = -(-paged // n)
        basis = f"ZeRO-{zero} share of {n} ranks (from the one-process trace)"
    elif n > 1:
        basis = f"one of {n} {dist.strategy.upper()} processes"
    where = " / ".join(x for x in (report.get("peakPhase"), report.get("peakOp"), report.get("peakWhere")) if x)
    return {"peakBytes": sum(b.values()), "pagedOptimizerBytes": paged, "breakdown": b,
            "peakAt": where[:MAX_TEXT], "seqLength": int(report.get("seqLength") or 0),
            "microBatchSize": int(report.get("microBatchSize") or 0), "basis": basis,
            "seconds": float(report.get("seconds") or 0.0)}


def skipped(reason: str) -> dict[str, str]:
    """The trace block when no trace ran."""
    reason = " ".join(reason.split())
    return {"skipped": reason if len(reason) <= MAX_TEXT else reason[:MAX_TEXT - 3] + "..."}


def run_trace(plan: Any, config: dict[str, Any], seq_length: int, timeout: int | None = None) -> dict[str, Any]:
    """The preflight's trace block: the per-GPU traced step, or {"skipped": reason}. Never raises."""
    timeout = trace_seconds() if timeout is None else timeout
    if os.environ.get(TRACE_SKIP_ENV, "").strip():
        return skipped(os.environ[TRACE_SKIP_ENV].strip())
    if timeout <= 0:
        return skipped(f"the trace is turned off ({TRACE_SECONDS_ENV}=0)")
    why = unsupported_layout(plan)
    if why:
        return skipped(why)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kubetune-trace-") as tmp:
        plan_path, config_path = Path(tmp) / "plan.json", Path(tmp) / "config.json"
        plan_path.write_text(json.dumps(trace_plan_dict(plan, seq_length)))
        config_path.write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "kubetune_trainer.preflight_trace", str(plan_path), str(config_path)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return skipped(f"the trace took longer than its {timeout} s bound ({TRACE_SECONDS_ENV})")
    lines = run.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if "report" in answer:
        out = per_rank(answer["report"], plan)
        out["seconds"] = round(time.monotonic() - started, 1)  # imports and build included: what the pod spent
        return out
    if answer.get("skipped"):
        return skipped(str(answer["skipped"]))
    err = run.stderr.strip().splitlines()
    last = err[-1] if err else f"exit code {run.returncode}"
    if "No module named" in last:
        return skipped(f"the trace needs torch and the trainer's training dependencies ({last})")
    return skipped(f"the trace failed: {last}")


def _main(argv: list[str]) -> int:
    """`python -m kubetune_trainer.preflight_trace PLAN.json CONFIG.json`: trace the plan's step, print JSON."""
    plan = json.loads(Path(argv[0]).read_text())
    config = json.loads(Path(argv[1]).read_text())
    try:
        import torch  # noqa: F401 - a missing torch is a skip reason, not a failure
    except ImportError as exc:
        print(json.dumps({"skipped": f"the trace needs torch ({exc})"}))
        return 0
    from kubetune_trainer.memtrace import TraceError, trace_step

    try:
        report = trace_step(plan, config, model_name=str(config.get("_name_or_path") or ""))
    except TraceError as exc:
        print(json.dumps({"skipped": str(exc)}))
        return 0
    print(json.dumps({"report": report.to_dict()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
