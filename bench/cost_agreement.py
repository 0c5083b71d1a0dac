"""The cost estimate against the run it estimated: status.estimate's time before each run beside the run's measured
time, on one device, through the operator's own functions.

    python bench/cost_agreement.py [--quick] [--device cpu|cuda] [--model tiny|<config.json>] [--method lora]
                                   [--steps 150,300,150,450,...] [--cpus N] [--out PATH]

A sequence of runs of the same job at different lengths (training.maxSteps). Before each run the estimate is made
as the operator makes it when it creates the trainer Job: the trainer's preflight counts the data
(`kubetune.estimate_offline.run_preflight`, once: the data does not change), and `kubetune.estimate.estimate_status`
turns the counts into steps, tokens and a time, calibrated (`kubetune.throughput.calibrate`) from the runs before
it, exactly as a cluster's finished FineTuneJobs calibrate later ones. Each run is the real trainer
(`python -m kubetune_trainer.cli run` on the plan `kubetune.builders.build_plan` writes), timed from process start
to exit (what status.accounting.runningSeconds counts from the container's start to its exit; pod scheduling and
image pulls are outside both). Its termination summary and that time become the run's sample for the next ones.
The first run has nothing to calibrate from and only calibrates.

Printed per run: estimated and measured seconds, their ratio, and the run's steady tokens/s (the JSON also has the
uncalibrated datasheet estimate of each run, on a GPU type with a known peak). The spread of the
steady tokens/s between runs is the device's own run-to-run noise, measured in the same sequence: no estimate made
before a run can agree with it more closely than the device repeats itself. On a GPU both should be small; on a
shared CPU the noise dominates.

Results: bench/results/cost_agreement-<device>.json (or --out) and a printed table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "bench")]

from train_throughput import TINY_PRESETS, build_model, machine_info, write_dataset  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_STEPS = {"cpu": (150, 300, 150, 450, 300, 600), "cuda": (100, 200, 100, 300, 200, 400)}
QUICK_STEPS = (16, 32, 16)


# ----------------------------------------------------------------------------- pure helpers
def job_spec(model_dir: Path, data: Path, method: str, steps: int, preset: dict, gpus: int, cpus: int,
             architecture: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob spec of one run: the model's architecture (no catalog entry), one pod, no evaluation."""
    return {
        "model": {"uri": str(model_dir), "architecture": architecture},
        "dataset": {"uri": str(data), "format": "messages", "evalSplit": 0.0},
        "method": method,
        "training": {"maxSteps": steps, "microBatchSize": preset["micro_batch"], "gradientAccumulationSteps": 1,
                     "maxSeqLength": preset["max_seq"], "learningRate": 2e-4, "gradientCheckpointing": False,
                     "checkpointEverySteps": 1_000_000, "evalEverySteps": 0},
        "resources": {"gpusPerPod": gpus, "pods": 1, "cpu": str(cpus), "memory": "8Gi"},
        "output": {"uri": str(data.parent / "out")},
    }


def architecture_of(config: dict[str, Any]) -> dict[str, Any]:
    """spec.model.architecture from a config.json."""
    return {"family": config["model_type"], "hiddenSize": config["hidden_size"],
            "intermediateSize": config["intermediate_size"], "numHiddenLayers": config["num_hidden_layers"],
            "numAttentionHeads": config["num_attention_heads"],
            "numKeyValueHeads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "vocabSize": config["vocab_size"], "tieWordEmbeddings": bool(config.get("tie_word_embeddings"))}


def finished_job(uid: str, spec: dict[str, Any], layout: dict[str, Any], plan_status: dict[str, Any],
                 summary: dict[str, Any], seconds: float, finished: dt.datetime) -> dict[str, Any]:
    """The FineTuneJob object a clean succeeded run leaves (what `kubetune.throughput.sample_of` reads)."""
    return {"metadata": {"uid": uid}, "spec": spec, "status": {
        "phase": "Succeeded", "completionTime": finished.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "layout": layout,
        "plan": plan_status, "progress": {"step": summary.get("step")},
        "metrics": {k: summary[k] for k in ("tokensPerSecond", "steadyTokensPerSecond") if summary.get(k)},
        "accounting": {"runningSeconds": round(seconds, 2), "tokens": int(summary.get("tokens") or 0),
                       "restarts": 0}}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the estimated runs and the device's own noise (steady tokens/s of every run)."""
    ratios = [r["ratio"] for r in runs if r.get("ratio")]
    rates = [r["steadyTokensPerSecond"] for r in runs if r.get("steadyTokensPerSecond")]
    out: dict[str, Any] = {"estimatedRuns": len(ratios)}
    if ratios:
        out.update(medianRatio=round(statistics.median(ratios), 3),
                   worstRatio=round(max(ratios, key=lambda x: abs(x - 1.0)), 3),
                   within10Percent=sum(abs(x - 1.0) <= 0.10 for x in ratios))
    if len(rates) > 1:
        out["steadyRateSpread"] = round(max(rates) / min(rates) - 1.0, 3)  # fastest run over slowest, minus 1
    return out


# ----------------------------------------------------------------------------- runs
def count_params(model_dir: Path) -> int:
    """The model's parameter count, as the sizer's totalParams."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(p.numel() for p in model.parameters())


def run_trainer(plan: dict[str, Any], work: Path, device: str, cpus: int, timeout: float) -> tuple[dict, float]:
    """The real trainer on `plan` in a fresh process: its termination summary and its wall seconds."""
    work.mkdir(parents=True)
    (work / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, KUBETUNE_PLAN=str(work / "plan.json"), KUBETUNE_WORK_DIR=str(work / "work"),
               KUBETUNE_TERMINATION_LOG=str(work / "summary.json"), KUBETUNE_CPUS=str(cpus),
               PYTHONPATH=os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBETUNE_METRICS_PORT",
                "OMP_NUM_THREADS"):
        env.pop(key, None)
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer.cli", "run"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.monotonic() - started
    summary_file = work / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        raise SystemExit(f"the trainer failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(summary_file.read_text()), seconds


def run_sequence(args: argparse.Namespace) -> dict[str, Any]:
    from kubetune.api import parse_spec
    from kubetune.builders import JobRef, build_plan
    from kubetune.estimate import Pricing, estimate_status, flops_per_token
    from kubetune.estimate_offline import run_preflight
    from kubetune.preflight import preflight_status
    from kubetune.sizing.layout import Layout
    from kubetune.throughput import calibrate, sample_of

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here")
    preset = dict(TINY_PRESETS["quick"])
    steps = [int(s) for s in args.steps.split(",")] if args.steps else \
        list(QUICK_STEPS if args.quick else DEFAULT_STEPS[args.device])
    work = Path(tempfile.mkdtemp(prefix="cost-agreement-"))
    model_dir, model_info = build_model(work, args.model, preset)
    data = write_dataset(work / "data.jsonl", preset["examples"] * 2, 12)
    config = json.loads((model_dir / "config.json").read_text())
    info = machine_info(args.device)
    gpu_type = (info.get("gpu") or {}).get("name", "").replace(" ", "-") if args.device == "cuda" else ""
    gpus = 1 if args.device == "cuda" else 0
    layout = Layout(gpu_type=gpu_type, gpus_per_pod=gpus, pods=1, strategy="none", node_selector={})
    params = count_params(model_dir)
    plan_status = {"estimate": {"totalParams": params}}

    def spec_of(n: int) -> dict[str, Any]:
        return job_spec(model_dir, data, args.method, n, preset, gpus, args.cpus, architecture_of(config))

    def plan_of(n: int, name: str) -> dict[str, Any]:
        plan = build_plan(JobRef(name, "bench", name), parse_spec(spec_of(n)), layout)
        plan["model"]["uri"], plan["dataset"]["uri"] = str(model_dir), str(data)
        plan["dataset"]["evalUri"] = ""
        plan["output"]["uri"] = str(work / name / "out")
        return plan

    message = run_preflight(plan_of(steps[0], "preflight"))
    if message.get("status") != "Succeeded":
        raise SystemExit(f"the preflight failed: {message.get('reason')}: {message.get('message')}")
    preflight = preflight_status(message.get("preflight"), "", "")
    samples, runs = [], []
    for i, n in enumerate(steps):
        spec = spec_of(n)
        calibration = calibrate(samples, gpu_type, args.method, params)
        est = estimate_status(preflight, layout.to_status(), plan_status, parse_spec(spec), Pricing(), calibration)
        datasheet = estimate_status(preflight, layout.to_status(), plan_status, parse_spec(spec), Pricing())
        summary, seconds = run_trainer(plan_of(n, f"run{i}"), work / f"run{i}", args.device, args.cpus,
                                       args.timeout)
        obj = finished_job(f"run{i}", spec, layout.to_status(), plan_status, summary, seconds,
                           dt.datetime.now(dt.timezone.utc))
        sample = sample_of(obj, flops_per_token)
        if sample is not None:
            samples.append(sample)
        eta = est.get("etaSeconds") if calibration is not None else None
        runs.append({"steps": n, "estimatedSteps": est["steps"], "trainedSteps": summary.get("step"),
                     "estimatedSeconds": eta, "seconds": round(seconds, 2),
                     "ratio": round(eta / seconds, 3) if eta else None,
                     # The uncalibrated guess (datasheet peak x MODEL_FLOPS_UTILIZATION; GPUs only), for comparison.
                     "datasheetSeconds": datasheet.get("etaSeconds"),
                     "steadyTokensPerSecond": summary.get("steadyTokensPerSecond"),
                     "basis": est.get("basis", "")})
        print(f"run {i}: {n} steps, estimated {eta if eta is not None else '-'} s, measured {seconds:.1f} s"
              + (f", ratio {runs[-1]['ratio']:.3f}" if eta else " (calibrates only)")
              + f", steady {summary.get('steadyTokensPerSecond')} tokens/s", flush=True)
    return {"schemaVersion": SCHEMA_VERSION, "device": args.device, "machine": info, "model": model_info,
            "params": params, "method": args.method, "preflight": {k: preflight.get(k) for k in (
                "trainRows", "tokensPerEpoch")}, "runs": runs, "summary": summarize(runs),
            "measuredAt": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"three short runs ({','.join(map(str, QUICK_STEPS))})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="tiny", help="tiny (a 256-hidden, 4-layer llama) or a config.json")
    p.add_argument("--method", choices=("lora", "qlora", "full"), default="lora")
    p.add_argument("--steps", default="", help="comma-separated maxSteps of the runs, in order")
    p.add_argument("--cpus", type=int, default=1, help="the pod's CPU request: the trainer's threads (default 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    report = run_sequence(args)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"cost_agreement-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    print(f"{s['estimatedRuns']} estimated run(s): median estimate/measured {s.get('medianRatio')}, worst "
          f"{s.get('worstRatio')}, {s.get('within10Percent')} within 10%; the device's own run-to-run spread of "
          f"steady tokens/s: {s.get('steadyRateSpread', 0):.1%}  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
