"""`kubetune estimate -f job.yaml --data FILE`: the preflight and the estimate without a cluster.

The operator package never imports the trainer: the preflight runs as `python -m kubetune_trainer.preflight` in
a subprocess (like `--trace`), on the plan the operator would write for the sized layout, with the dataset URI
replaced by the local file. Its report goes through the same functions as in the operator
(`kubetune.preflight.preflight_status`, `kubetune.estimate.estimate_status`), so the figures are the ones the
FineTuneJob's status would show. With `--runs FILE` (finished FineTuneJobs, e.g. `kubectl get finetunejobs -A -o
yaml`), their clean succeeded runs calibrate the time as the operator's would (`kubetune.throughput`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import JobRef, build_plan
from kubetune.estimate import Pricing, estimate_status, flops_per_token, plan_params
from kubetune.preflight import preflight_status
from kubetune.preflight_trace import traced_fit
from kubetune.sizing.layout import Layout
from kubetune.throughput import ThroughputBook

PREFLIGHT_TIMEOUT_SECONDS = 1800


def run_preflight(plan: dict[str, Any], *, pvc_root: str = "", timeout: float = PREFLIGHT_TIMEOUT_SECONDS
                  ) -> dict[str, Any]:
    """The trainer's preflight on `plan` in a subprocess: its termination message (JSON)."""
    with tempfile.TemporaryDirectory(prefix="kubetune-preflight-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        env = dict(os.environ, KUBETUNE_PLAN=str(plan_path), KUBETUNE_TERMINATION_LOG=str(Path(tmp) / "message"),
                   KUBETUNE_WORK_DIR=os.environ.get("KUBETUNE_WORK_DIR") or str(Path(tmp) / "work"))
        if pvc_root:
            env["KUBETUNE_PVC_ROOT"] = str(Path(pvc_root).resolve())
        try:
            run = subprocess.run([sys.executable, "-m", "kubetune_trainer.preflight", str(plan_path)], env=env,
                                 capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ValueError(f"the preflight took longer than {timeout:.0f} s") from exc
        message = Path(tmp) / "message"
        if not message.is_file():
            missing = "No module named 'kubetune_trainer" in run.stderr
            why = ("the preflight needs the trainer package (pip install 'kubetune[trainer]')" if missing
                   else (run.stderr.strip().splitlines() or ["the preflight wrote no result"])[-1])
            raise ValueError(why)
        return json.loads(message.read_text())


def finished_runs(text: str) -> ThroughputBook:
    """The throughput samples of the FineTuneJobs in a YAML/JSON text: a `kind: List` (what `kubectl get -o yaml`
    prints), one or more FineTuneJob documents, or a JSON array. Objects of other kinds are skipped; only clean
    succeeded runs count (`kubetune.throughput.sample_of`)."""
    import yaml

    book = ThroughputBook(flops_per_token)
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict):
            items = doc.get("items") if doc.get("kind") == "List" else [doc]
        else:
            items = doc if isinstance(doc, list) else []
        for obj in items or []:
            if isinstance(obj, dict) and obj.get("kind", "FineTuneJob") == "FineTuneJob":
                book.observe(obj)
    return book


def offline_estimate(name: str, spec: FineTuneJobSpec, layout: Layout, plan_status: dict[str, Any] | None,
                     data: str, *, model_dir: str = "", pvc_root: str = "", pricing: Pricing | None = None,
                     runs: ThroughputBook | None = None) -> dict[str, Any]:
    """{"preflight": status.preflight, "estimate": status.estimate} for the job on `layout`, with the local
    dataset `data` (and `model_dir` instead of the spec's model), or {"error": message}."""
    plan = build_plan(JobRef(name, "default", "offline"), spec, layout)
    plan["dataset"]["uri"] = str(Path(data).resolve())
    plan["dataset"]["evalUri"] = ""  # the held-out split of the local file, as evalSplit says
    if model_dir:
        plan["model"]["uri"] = str(Path(model_dir).resolve())
    try:
        message = run_preflight(plan, pvc_root=pvc_root)
    except ValueError as exc:
        return {"error": str(exc)}
    if message.get("status") != "Succeeded":
        return {"error": f"{message.get('reason', 'Failed')}: {message.get('message', '')}"}
    pre = preflight_status(message.get("preflight"), "", "")
    pre.pop("specHash"), pre.pop("completedAt")
    fit = traced_fit(pre.get("trace"), plan_status, layout)  # as the operator checks it
    if fit is not None:
        pre["trace"].update(fit.record(), check=fit.message())
    calibration = runs.calibration(layout.gpu_type, spec.method, plan_params(plan_status)) \
        if runs is not None else None
    est = estimate_status(pre, layout.to_status(), plan_status, spec, pricing or Pricing(), calibration)
    return {"preflight": pre, "estimate": est}


def describe(result: dict[str, Any]) -> str:
    """Text lines for `kubetune estimate`."""
    if "error" in result:
        return f"  preflight failed: {result['error']}"
    pre, est = result["preflight"], result["estimate"]
    lines = [f"  preflight: {pre['display']}; token lengths p50 {pre['tokenLengths'].get('p50')} "
             f"p95 {pre['tokenLengths'].get('p95')} max {pre['tokenLengths'].get('max')} "
             f"(maxSeqLength {pre['maxSeqLength']}); duplicates {pre['duplicates']}, near-duplicates "
             f"{pre['nearDuplicates']}, empty answers {pre['emptyAnswers']}",
             f"  dataset sha256 {pre['datasetSha256']}" + (f"; model revision {pre['modelRevision']}"
                                                          if pre["modelRevision"] else ""),
             f"  estimate: {est['display']}" + (f" ({est['basis']})" if est.get("basis") else "")]
    trace = pre.get("trace") or {}
    if trace.get("skipped"):
        lines.append(f"  trace skipped: {trace['skipped']} (the analytic estimate stands)")
    elif trace:
        check = trace.get("check") or f"peak {trace.get('peakGiB')} GiB per GPU"
        lines.append(f"  traced step: {check}"
                     + ("" if trace.get("fits", True) else "; DOES NOT FIT: the operator would re-size the job")
                     + f" ({trace.get('seconds')} s)")
    return "\n".join(lines)
