"""End to end: `kubectl apply` of a FineTuneJob → the operator sizes and launches it → trainer pods run as
local processes on process nodes and really train a tiny model → the FineTuneJob ends with a usable adapter.

Everything is real: control plane, operator subprocess, Job controller, scheduler, the trainer
(`kubetune-train launch`, torch on the CPU). Only the hardware is a process node instead of a kubelet.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from kubetune_dev.devcluster.process_node import create_local_pvc
from tests.support.cluster_helpers import wait_for
from kubetune_dev.operator_process import OperatorProcess, install_crds
from tests.support.finetunejobs import FtjClient, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
DATASET = REPO / "examples" / "data" / "quickstart.jsonl"


def build_tiny_model(out: Path, *flags: str) -> Path:
    """A Llama-style model from `kubetune_trainer.tiny` (its flags: --hidden, --layers, ...) in `out`."""
    subprocess.run([sys.executable, "-m", "kubetune_trainer.tiny", "--out", str(out), *flags], check=True,
                   capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The quickstart's tiny Llama-style model, built locally once for the module."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def operator(cluster, process_nodes, tmp_path_factory):
    """The operator as a subprocess, scheduling CPU-only trainer pods onto the process nodes."""
    install_crds(cluster.kubectl)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, [
        "--all-namespaces", "--liveness-port", "0", "--metrics-port", str(free_port()),
        "--resync-seconds", "1", "--progress-seconds", "1", "--lease-namespace", "default",
        "--lease-name", f"e2e-{uuid.uuid4().hex[:6]}", "--lease-seconds", "5",
        "--cpu-node-selector", "kubetune.io/process-node=true",
    ], log)
    with op.leading():
        yield op


@pytest.fixture
def ftj(k8s, operator):
    return FtjClient(k8s)


class Workspace:
    """One test's PVC (unique claim name) with the tiny model and a dataset, and manifests pointing at it."""

    def __init__(self, k8s, namespace: str, data_root: Path, model: Path) -> None:
        self.namespace = namespace
        self.claim = f"e2e-{namespace}"[:60]
        create_local_pvc(k8s, namespace, self.claim, data_root)
        self.root = data_root / "pvc" / self.claim
        shutil.copytree(model, self.root / "models" / "tiny-llama")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATASET, self.root / "data" / "train.jsonl")

    def uri(self, rel: str) -> str:
        return f"pvc://{self.claim}/{rel}"

    def local(self, uri: str) -> Path:
        assert uri.startswith(f"pvc://{self.claim}/"), uri
        return self.root / uri[len(f"pvc://{self.claim}/"):]

    def manifest(self, name: str, *, dataset: str = "data/train.jsonl", evaluate: bool = False, **training) -> dict:
        """The quickstart for this workspace; without `evaluate` its spec.evaluation and GGUF export are dropped
        (they add half a minute of generation to tests about something else)."""
        m = copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))
        if not evaluate:
            m["spec"].pop("evaluation", None)
            m["spec"]["output"].pop("export", None)
        m["metadata"] = {"name": name}
        m["spec"]["model"]["uri"] = self.uri("models/tiny-llama")
        m["spec"]["dataset"]["uri"] = self.uri(dataset)
        m["spec"]["output"]["uri"] = self.uri(f"outputs/{name}")
        m["spec"]["training"].update(training)
        return m

    def apply(self, cluster, manifest: dict) -> None:
        """The real `kubectl apply -f -` (JSON: PyYAML would dump the string "1e-3" unquoted, which kubectl reads as a number)."""
        cluster.kubectl("-n", self.namespace, "apply", "-f", "-", input=json.dumps(manifest))


@pytest.fixture
def ws(k8s, namespace, process_nodes, tiny_model) -> Workspace:
    return Workspace(k8s, namespace, Path(process_nodes[0].config.data_root), tiny_model)


def wait_terminal(ftj: FtjClient, ns: str, name: str, timeout: float = 600) -> dict:
    last: dict = {}

    def check():
        nonlocal last
        last = ftj.status(ns, name)
        return last if last.get("phase") in ("Succeeded", "Failed", "Cancelled") else None

    return wait_for(check, timeout, lambda: f"{ns}/{name} terminal; last status: {json.dumps(last)[:2000]}")


def _pod_pids(ftj: FtjClient, ns: str, name: str) -> list[int]:
    pids = []
    for pod in ftj.pods(ns, name, "Running"):
        for cs in pod.status.container_statuses or []:
            cid = cs.container_id or ""
            if cid.startswith("process://"):
                pids.append(int(cid.removeprefix("process://")))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_quickstart_ends_succeeded_with_an_adapter_that_loads_and_changes_outputs(cluster, ftj, ws, tiny_model):
    manifest = ws.manifest("quickstart", evaluate=True)
    ws.apply(cluster, manifest)
    st = wait_terminal(ftj, ws.namespace, "quickstart")
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    assert st["progress"]["step"] == manifest["spec"]["training"]["maxSteps"] and st["metrics"]["trainLoss"] > 0
    # The quickstart's evaluation (what the demo ends with): the tuned model answers the held-out prompts the
    # random base cannot, the exactMatch gate passes, and the GGUF the demo asks through llama.cpp is there.
    rows = {r["metric"]: r for r in st["evaluation"]["metrics"]}
    assert rows["exactMatch"]["tuned"] >= 0.8 and rows["exactMatch"]["base"] <= 0.05, rows
    assert rows["tokenF1"]["tuned"] > rows["tokenF1"]["base"] and rows["evalLoss"]["tuned"] < rows["evalLoss"]["base"]
    assert st["evaluation"]["passed"] is True, st["evaluation"]
    assert ws.local(st["artifacts"]["gguf"]).read_bytes()[:4] == b"GGUF"
    assert ws.local(st["artifacts"]["report"]).is_file()
    adapter = ws.local(st["artifacts"]["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("What is the capital of France?", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-3, "the adapter does not change the model's outputs"
    # The held-out loss of the trained run beats an untrained model's (~ln(vocab), uniform) by a wide margin.
    assert st["metrics"]["evalLoss"] < 0.8 * math.log(base.config.vocab_size), st["metrics"]


def test_two_pod_job_rendezvouses_over_the_headless_service(cluster, ftj, ws):
    m = ws.manifest("pair", maxSteps=6, checkpointEverySteps=1000)
    m["spec"]["resources"].update({"pods": 2, "cpu": "1", "memory": "3Gi"})
    ws.apply(cluster, m)
    st = wait_terminal(ftj, ws.namespace, "pair")
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    pods = ftj.pods(ws.namespace, "pair")
    assert len({p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods}) == 2
    # Each pod's log shows it joined a world of 2 processes through the rank-0 pod's Service name.
    logs = []
    for pod in pods:
        out = subprocess.run([sys.executable, "-m", "kubetune_dev", "node", "logs", "--kubeconfig",
                              str(cluster.kubeconfig), f"{ws.namespace}/{pod.metadata.name}"],
                             capture_output=True, text=True, timeout=60)
        logs.append(out.stdout + out.stderr)
    joined = "\n---\n".join(logs)[-4000:]
    assert all(re.search(r"\[rank [01]\] .*strategy \S+ x2", text) for text in logs), joined
    assert "[rank 0]" in logs[0] + logs[1] and "[rank 1]" in logs[0] + logs[1], joined


class PodWatch:
    """Every pod of a namespace the apiserver reports from now on (a watch in a thread): (name, component label)."""

    def __init__(self, ftj: FtjClient, namespace: str) -> None:
        import threading

        self.seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._core, self._ns = ftj.core, namespace
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            for event in watch.Watch().stream(self._core.list_namespaced_pod, self._ns, timeout_seconds=2):
                meta = event["object"].metadata
                self.seen.add((meta.name, (meta.labels or {}).get("kubetune.io/component", "")))

    def stop(self) -> set[tuple[str, str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen


def test_bad_dataset_line_fails_in_preflight_and_no_trainer_pod_is_ever_created(cluster, ftj, ws):
    lines = DATASET.read_text().splitlines()
    lines.insert(6, '{"messages": [{"role": "user", "content": "unterminated')
    (ws.root / "data" / "bad.jsonl").write_text("\n".join(lines) + "\n")
    pods = PodWatch(ftj, ws.namespace)
    ws.apply(cluster, ws.manifest("bad-data", dataset="data/bad.jsonl"))
    st = wait_terminal(ftj, ws.namespace, "bad-data", timeout=300)
    seen = pods.stop()
    assert st["phase"] == "Failed" and st["reason"] == "PreflightFailed", json.dumps(st)[:3000]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert "bad.jsonl:7:" in failed["message"], failed
    validated = next(c for c in st["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False" and validated["reason"] == "DataError", validated
    # Only the preflight pod ever existed (a data error is permanent: no retry), and no trainer Job.
    assert {component for _, component in seen} == {"preflight"} and len(seen) == 1, seen
    assert [j.metadata.name for j in ftj.jobs(ws.namespace)] == ["bad-data-preflight"]
    assert "layout" not in st


def test_an_unreachable_model_is_retried_then_fails_in_preflight_and_no_trainer_pod_is_ever_created(
        cluster, ftj, ws):
    """A model the preflight cannot fetch is not a data error: the usual policy retries it (backoffLimit 1: once),
    the status says why while it does, and the job then fails naming the URI, before any GPU pod exists."""
    m = ws.manifest("no-model")
    m["spec"]["model"]["uri"] = ws.uri("models/not-there")
    m["spec"]["backoffLimit"] = 1
    pods = PodWatch(ftj, ws.namespace)
    ws.apply(cluster, m)
    st = wait_terminal(ftj, ws.namespace, "no-model", timeout=300)
    seen = pods.stop()
    assert st["phase"] == "Failed" and st["reason"] == "PreflightFailed", json.dumps(st)[:3000]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert "models/not-there" in failed["message"] and "before any GPU was used" in failed["message"], failed
    validated = next(c for c in st["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False", validated
    # Two preflight pods (the first try and its retry), no trainer Job, no trainer pod.
    assert {component for _, component in seen} == {"preflight"} and len(seen) == 2, seen
    assert [j.metadata.name for j in ftj.jobs(ws.namespace)] == ["no-model-preflight"]
    assert any("models/not-there" in message
               for _, message in ftj.wait_events(ws.namespace, "no-model", "PreflightFailed"))


def test_the_preflight_counts_the_steps_the_trainer_runs(cluster, ftj, ws):
    """A run sized by epochs (not maxSteps): the steps the preflight counted are the steps the trainer took."""
    ws.apply(cluster, ws.manifest("counted", maxSteps=0, epochs=0.3, gradientAccumulationSteps=3,
                                  checkpointEverySteps=1000))
    st = wait_terminal(ftj, ws.namespace, "counted")
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    pre = st["preflight"]
    assert next(c for c in st["conditions"] if c["type"] == "Validated")["status"] == "True"
    assert pre["steps"] == st["progress"]["step"] == st["progress"]["totalSteps"] > 1, (pre, st["progress"])
    # A CPU-only layout has no GPU memory to check a traced step against: the preflight says so and skips it
    # (tests/e2e/test_cost_e2e.py sees the trace on a GPU layout).
    assert "CPU-only layout" in pre["trace"]["skipped"], pre["trace"]
    assert st["estimate"]["steps"] == pre["steps"] and st["estimate"]["gpuHours"] == 0.0  # CPU-only layout
    lines = DATASET.read_text().splitlines()
    assert pre["examples"] == len(lines) and pre["trainExamples"] + pre["evalExamples"] == len(lines)
    import hashlib

    assert pre["datasetSha256"] == hashlib.sha256(DATASET.read_bytes()).hexdigest()


def test_a_truncation_heavy_dataset_warns_with_its_numbers_and_still_trains(cluster, ftj, ws):
    """maxSeqLength below most examples' length: the preflight counts the cut examples, the job gets the Advice
    condition and a Warning Event with the numbers, and the run goes ahead (advice never blocks)."""
    ws.apply(cluster, ws.manifest("truncated", maxSeqLength=16, maxSteps=3, checkpointEverySteps=1000))
    st = wait_terminal(ftj, ws.namespace, "truncated")
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    pre = st["preflight"]
    examples, truncated = pre["examples"], pre["truncated"]
    assert truncated > 0.05 * examples and pre["tokenLengths"]["max"] > 16, pre
    advice = next(c for c in st["conditions"] if c["type"] == "Advice")
    assert advice["status"] == "True" and advice["reason"] == "Truncation", advice
    numbers = f"{truncated} of {examples} examples ({truncated / examples:.0%}) are longer than training.maxSeqLength 16"
    assert numbers in advice["message"], advice
    assert any(numbers in message for _, message in ftj.wait_events(ws.namespace, "truncated", "Truncation"))


def test_deleting_a_running_job_stops_its_processes(cluster, ftj, ws):
    ws.apply(cluster, ws.manifest("long", maxSteps=100000, checkpointEverySteps=100000))
    pids = wait_for(lambda: _pod_pids(ftj, ws.namespace, "long"), 120, "trainer process running")
    assert all(_alive(p) for p in pids)
    ftj.delete(ws.namespace, "long")
    wait_for(lambda: not any(_alive(p) for p in pids), 60, f"trainer processes {pids} gone")
    wait_for(lambda: not ftj.jobs(ws.namespace), 60, "Job garbage-collected")


def test_a_missing_secret_is_named_in_the_status_and_an_event(cluster, ftj, ws):
    """The pod cannot start its container (CreateContainerConfigError: the Secret does not exist): the job
    says so, instead of 'waiting for the trainer pods to start' forever."""
    m = ws.manifest("nosecret", maxSteps=2)
    m["spec"]["secrets"] = {"hfTokenSecretRef": {"name": "hf-token-missing", "key": "token"}}
    ws.apply(cluster, m)
    last: dict = {}

    def named():
        nonlocal last
        last = ftj.status(ws.namespace, "nosecret")
        return last if last.get("reason") == "TrainerContainerNotStarting" else None

    st = wait_for(named, 120, lambda: f"TrainerContainerNotStarting; last status: {json.dumps(last)[:2000]}")
    assert "CreateContainerConfigError" in st["message"] and "hf-token-missing" in st["message"], st["message"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "hf-token-missing" in ready["message"]
    assert any(reason == "TrainerContainerNotStarting" and "hf-token-missing" in message
               for reason, message in ftj.wait_events(ws.namespace, "nosecret", "TrainerContainerNotStarting"))


def test_evaluation_and_export_reach_the_status_conditions_events_and_kubectl_get(cluster, ftj, ws):
    """spec.evaluation and spec.output.export through the real operator: base vs tuned in status.evaluation, a gate
    set above what the run reached fails EvaluationPassed (with the numbers) while the job stays Succeeded with
    every artifact, and the GGUF + Modelfile are listed in status.artifacts with Exported=True."""
    m = ws.manifest("evaluated", maxSteps=40, checkpointEverySteps=1000)
    m["spec"]["evaluation"] = {"metrics": ["exactMatch", "tokenF1", "evalLoss"], "numExamples": 10,
                               "maxNewTokens": 16,
                               "gates": [{"metric": "evalLoss", "minImprovement": 0.5},
                                         {"metric": "tokenF1", "minImprovement": 1.5}]}
    m["spec"]["output"]["export"] = {"gguf": "f16", "system": "Spell digits out."}
    ws.apply(cluster, m)
    st = wait_terminal(ftj, ws.namespace, "evaluated")
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    ev = st["evaluation"]
    rows = {r["metric"]: r for r in ev["metrics"]}
    assert set(rows) == {"exactMatch", "tokenF1", "evalLoss"}, ev
    assert rows["evalLoss"]["tuned"] < rows["evalLoss"]["base"] - 0.5 and rows["evalLoss"]["passed"] is True, ev
    assert rows["tokenF1"]["passed"] is False and ev["passed"] is False, ev
    cond = next(c for c in st["conditions"] if c["type"] == "EvaluationPassed")
    assert cond["status"] == "False" and cond["reason"] == "EvaluationGatesFailed", cond
    assert "tokenF1 improvement" in cond["message"] and "evalLoss" in cond["message"], cond
    # The Event is recorded after the status write of the same pass: wait for it.
    wait_for(lambda: any(reason == "EvaluationGatesFailed" for reason, _ in ftj.events(ws.namespace, "evaluated")),
             60, "an EvaluationGatesFailed Event")
    for key in ("adapter", "evaluation", "report"):
        assert ws.local(st["artifacts"][key]).exists(), (key, st["artifacts"])
    doc = json.loads(ws.local(st["artifacts"]["evaluation"]).read_text())
    assert len(doc["examples"]) == 10 and doc["passed"] is False
    row = cluster.kubectl("get", "ftj", "evaluated", "-n", ws.namespace).stdout
    assert "tokenF1" in row and "failed" in row, row
    # The serving export ran too: a GGUF and a Modelfile that points at it.
    exported = next(c for c in st["conditions"] if c["type"] == "Exported")
    assert exported["status"] == "True" and exported["reason"] == "GGUFExported", exported
    gguf_path = ws.local(st["artifacts"]["gguf"])
    assert gguf_path.read_bytes()[:4] == b"GGUF"
    modelfile = ws.local(st["artifacts"]["modelfile"]).read_text()
    assert f"FROM ./{gguf_path.name}" in modelfile and 'SYSTEM """Spell digits out."""' in modelfile


def test_tracking_logs_the_run_to_a_real_mlflow_server(cluster, ftj, ws, tmp_path):
    """spec.tracking through the real operator: the trainer pod logs to an `mlflow server` started here; the run ID
    and URL reach status.tracking and the Tracked condition, and the run holds the job's parameters and metrics."""
    from tests.support.mlflow_server import SKIP_REASON, get, mlflow_bin, running_server

    binary = mlflow_bin()
    if binary is None:
        pytest.skip(SKIP_REASON)
    with running_server(binary, tmp_path) as url:
        m = ws.manifest("tracked", maxSteps=8, checkpointEverySteps=1000, logEverySteps=2)
        m["spec"]["tracking"] = {"mlflow": {"trackingUri": url, "experiment": "kubetune-e2e"}}
        ws.apply(cluster, m)
        st = wait_terminal(ftj, ws.namespace, "tracked")
        assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
        run_id = st["tracking"]["runId"]
        assert st["tracking"]["url"] == f"{url}/#/experiments/1/runs/{run_id}", st["tracking"]
        cond = next(c for c in st["conditions"] if c["type"] == "Tracked")
        assert cond["status"] == "True" and cond["reason"] == "TrackingRunLogged" and run_id in cond["message"]
        run = get(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tracked"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["training.maxSteps"] == "8" and params["model.uri"] == m["spec"]["model"]["uri"]
        history = get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train_loss")["metrics"]
        assert sorted(h["step"] for h in history) == list(range(1, 9))
        assert history[-1]["value"] == pytest.approx(st["metrics"]["trainLoss"], rel=1e-4)
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["kubetune.artifact.adapter"] == st["artifacts"]["adapter"]


def test_tracking_writes_an_offline_wandb_run_into_the_output(cluster, ftj, ws):
    """spec.tracking.wandb through the real operator, offline (the W&B service cannot be reached here): the trainer
    pod writes the run files, they land under output.uri/wandb/, and the run ID and the files' URI reach
    status.tracking.wandb and the Tracked condition; read back, the run holds every step's loss."""
    pytest.importorskip("wandb")
    from tests.support.wandb_files import read_run

    m = ws.manifest("wandb-offline", maxSteps=6, checkpointEverySteps=1000)
    m["spec"]["tracking"] = {"wandb": {"project": "kubetune-e2e", "mode": "offline"}}
    ws.apply(cluster, m)
    st = wait_terminal(ftj, ws.namespace, "wandb-offline")
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    w = st["tracking"]["wandb"]
    assert w["runDir"].startswith(m["spec"]["output"]["uri"] + "/wandb/offline-run-"), w
    assert w["runDir"].endswith(w["runId"]) and "url" not in w, w
    cond = next(c for c in st["conditions"] if c["type"] == "Tracked")
    assert cond["status"] == "True" and cond["reason"] == "TrackingRunLogged" and w["runDir"] in cond["message"]
    run = read_run(ws.local(w["runDir"]))
    assert (run.run_id, run.project, run.name) == (w["runId"], "kubetune-e2e", "wandb-offline")
    assert run.group == f"{ws.namespace}/wandb-offline" and run.exit_code == 0
    assert sorted(run.series("train_loss")) == list(range(1, 7))
    assert run.summary["kubetune.artifact.adapter"] == st["artifacts"]["adapter"]
