"""`kubetune estimate -f job.yaml --data FILE`: the trainer's preflight in a subprocess and the operator's estimate,
without a cluster: the same figures status.preflight and status.estimate show."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from kubetune.estimate import optimizer_steps

from ._support import build_model, write_dataset

pytestmark = pytest.mark.trainer

JOB = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "offline"},
       "spec": {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "pvc://data/train.jsonl",
                                                                            "evalSplit": 0.1},
                "method": "lora", "output": {"uri": "pvc://out/run"},
                "training": {"epochs": 2, "microBatchSize": 4, "gradientAccumulationSteps": 2,
                             "learningRate": "2e-4", "maxSeqLength": 64}}}


def _estimate(tmp_path, data, *extra):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    return subprocess.run([sys.executable, "-m", "kubetune", "estimate", "-f", str(job), "--data", str(data),
                           "--model-dir", str(tmp_path / "model"), "--gpu", "NVIDIA-H100-80GB-HBM3:2",
                           "--pricing", "NVIDIA-H100-80GB-HBM3=2.5", *extra],
                          capture_output=True, text=True, timeout=600)


def test_estimate_with_data_prints_the_preflight_and_the_cost(tmp_path):
    pytest.importorskip("torch")
    build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "train.jsonl", n=150)
    run = _estimate(tmp_path, data, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    job = json.loads(run.stdout)["jobs"][0]
    pre, est = job["preflight"], job["estimate"]
    assert pre["examples"] == 150 and len(pre["datasetSha256"]) == 64
    assert est["steps"] == pre["steps"] == optimizer_steps(pre["trainRows"], 4, 2, est["world"], 2, 0)
    assert est["gpuHours"] > 0 and est["cost"] == pytest.approx(est["gpuHours"] * 2.5, rel=1e-3)
    text = _estimate(tmp_path, data)
    assert text.returncode == 0 and "preflight: 150 examples" in text.stdout and "USD" in text.stdout, text.stdout
    # The model's real step traced at the data's length, against one GPU of the sized layout.
    assert pre["trace"]["fits"] is True and pre["trace"]["gpuType"] == "NVIDIA-H100-80GB-HBM3", pre["trace"]
    assert "traced step: traced peak" in text.stdout and "usable on one NVIDIA-H100-80GB-HBM3" in text.stdout


def test_estimate_with_a_bad_line_names_it_and_fails(tmp_path):
    pytest.importorskip("torch")
    build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "train.jsonl", n=20)
    lines = data.read_text().splitlines()
    lines[3] = "{not json"
    data.write_text("\n".join(lines) + "\n")
    run = _estimate(tmp_path, data)
    assert run.returncode == 1 and f"{data}:4" in run.stdout, run.stdout + run.stderr


def test_finished_runs_from_the_cluster_calibrate_the_offline_time(tmp_path):
    pytest.importorskip("torch")
    build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "train.jsonl", n=150)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    sized = subprocess.run([sys.executable, "-m", "kubetune", "estimate", "-f", str(job), "--gpu",
                            "NVIDIA-H100-80GB-HBM3:2", "--json"], capture_output=True, text=True, timeout=120)
    assert sized.returncode == 0, sized.stderr[-3000:]
    params = json.loads(sized.stdout)["jobs"][0]["plan"]["estimate"]["totalParams"]
    # One earlier run of this model on this GPU type, as `kubectl get finetunejobs -o yaml` lists it: 1e6 tokens at
    # 2,500 tokens/s in 1,000 s of running -> 600 s outside training steps.
    finished = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"uid": "earlier"},
                "spec": JOB["spec"], "status": {
                    "phase": "Succeeded", "completionTime": "2026-11-01T10:00:00Z",
                    "layout": {"gpuType": "NVIDIA-H100-80GB-HBM3", "totalGpus": 1, "pods": 1},
                    "plan": {"estimate": {"totalParams": params}}, "metrics": {"steadyTokensPerSecond": 2500.0},
                    "accounting": {"runningSeconds": 1000.0, "tokens": 1_000_000, "restarts": 0}}}
    runs = tmp_path / "runs.yaml"
    runs.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [finished]}))
    run = _estimate(tmp_path, data, "--json", "--runs", str(runs))
    assert run.returncode == 0, run.stderr[-3000:]
    est = json.loads(run.stdout)["jobs"][0]["estimate"]
    assert "calibrated on this cluster: median of 1 finished lora run(s) of this model size" in est["basis"], est
    # The same model and method: each of its GPUs runs at the earlier run's tokens/s.
    assert est["etaSeconds"] == pytest.approx(600.0 + est["tokens"] / (est["gpus"] * 2500.0), rel=1e-3)
