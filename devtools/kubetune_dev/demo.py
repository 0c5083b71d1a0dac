"""`kubetune-dev demo`: kubectl apply of a FineTuneJob → a trained adapter, on this machine, end to end.

What it runs (all local processes, nothing mocked):
  1. the local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) plus
     KWOK simulating a GPU fleet, so the sizer sees a realistic cluster;
  2. the FineTuneJob CRD (`kubectl apply -f crds/`);
  3. a process node, which runs the pods scheduled to it as local processes, and a PVC
     `kubetune-demo` backed by `<work dir>/data/pvc/kubetune-demo/` holding a tiny model (built
     locally by `python -m kubetune_trainer.tiny`) and the quickstart dataset;
  4. the operator (`python -m kubetune operator`, a subprocess);
  5. `kubectl apply -f examples/quickstart.yaml`, the preflight line (examples, tokens, steps, estimated GPU-hours
     and cost, from the CPU preflight before training), then one line per status change (phase, step/total,
     loss, tokens/s, read from the FineTuneJob's status), and at the end `kubectl get ftj`, the adapter
     files and, for a job with spec.evaluation (the quickstart's), the base-vs-tuned table from status.evaluation,
     the report path, held-out examples before/after and one held-out prompt answered from the exported GGUF by
     llama.cpp (`python -m kubetune_trainer.export.ask`; through transformers, saying so, without llama_cpp).
     Without spec.evaluation: greedy generations before/after the adapter (`python -m kubetune_trainer.generate`).

Everything is stopped and removed on exit, on Ctrl-C and on SIGTERM. With `--keep` the cluster
stays up after the run (until Ctrl-C) and the KUBECONFIG to use is printed.
This module never imports torch: the model building and generation run in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kubetune import API_GROUP, API_VERSION, PLURAL
from kubetune_dev.demo_ending import after_training_note

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MANIFEST = REPO_ROOT / "examples" / "quickstart.yaml"
DEFAULT_DATASET = REPO_ROOT / "examples" / "data" / "quickstart.jsonl"
DEMO_CLAIM = "kubetune-demo"
PROCESS_NODE_SELECTOR = "kubetune.io/process-node=true"
TERMINAL = ("Succeeded", "Failed", "Cancelled")


# --------------------------------------------------------------------------- pure helpers
def pvc_local_path(uri: str, pvc_root: Path) -> Path:
    """`pvc://claim/path` → `<pvc_root>/claim/path` (where a process node keeps that claim)."""
    if not uri.startswith("pvc://"):
        raise ValueError(f"not a pvc:// URI: {uri!r}")
    return pvc_root / uri[len("pvc://"):].strip("/")


def manifest_paths(manifest: dict[str, Any]) -> dict[str, str]:
    """The pvc:// URIs of a FineTuneJob manifest the demo must provide or read: model, dataset, output."""
    spec = manifest.get("spec") or {}
    return {"model": spec["model"]["uri"], "dataset": spec["dataset"]["uri"], "output": spec["output"]["uri"]}


@dataclass(frozen=True)
class ProgressView:
    """The parts of a FineTuneJob's status the demo prints."""

    phase: str = ""
    reason: str = ""
    step: int | None = None
    total: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    message: str = ""

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> "ProgressView":
        """Read phase, progress and metrics from `.status`."""
        progress = status.get("progress") or {}
        metrics = status.get("metrics") or {}
        return cls(phase=status.get("phase") or "", reason=status.get("reason") or "",
                   step=progress.get("step"), total=progress.get("totalSteps"),
                   train_loss=metrics.get("trainLoss"), eval_loss=metrics.get("evalLoss"),
                   tokens_per_second=metrics.get("tokensPerSecond"), eta_seconds=progress.get("etaSeconds"),
                   message=status.get("message") or "")

    def key(self) -> tuple:
        """What must change for a new line to be printed (not the ETA, which ticks on its own)."""
        return (self.phase, self.reason, self.step, self.total, self.train_loss, self.eval_loss,
                self.tokens_per_second)


def format_progress(view: ProgressView, elapsed: float) -> str:
    """One display line: `[  41.3s] Running    step  12/20   loss 5.4321  eval 5.61  1234 tok/s  eta 9s`."""
    parts = [f"[{elapsed:6.1f}s] {view.phase or '(no status yet)':<10}"]
    if view.total:
        width = len(str(view.total))
        parts.append(f"step {view.step or 0:>{width}}/{view.total}")
    if view.train_loss is not None:
        parts.append(f"loss {view.train_loss:.4f}")
    if view.eval_loss is not None:
        parts.append(f"eval {view.eval_loss:.4f}")
    if view.tokens_per_second is not None:
        parts.append(f"{view.tokens_per_second:.0f} tok/s")
    if view.eta_seconds is not None and view.phase == "Running":
        parts.append(f"eta {view.eta_seconds:.0f}s")
    if not view.total or view.phase != "Running":
        parts.append(f"{view.reason}: {view.message}" if view.reason else view.message)
    return "  ".join(p for p in parts if p)


def format_preflight(status: dict[str, Any]) -> str | None:
    """The preflight line, once the trainer Job is created with its estimate: examples, tokens, steps, estimated
    GPU-hours and cost (None before)."""
    pre, est = status.get("preflight") or {}, status.get("estimate") or {}
    if not pre or not est:
        return None
    line = (f"preflight: {pre.get('examples', 0)} examples ({pre.get('trainExamples', 0)} trained), "
            f"{est.get('tokens', 0):,} tokens, {est.get('steps', 0)} steps")
    if est.get("gpuHours") is not None:
        line += f", estimated {est['gpuHours']:.2f} GPU-hours"
        if est.get("cost") is not None:
            line += f", cost {est['cost']:.2f} {est.get('currency', '')}".rstrip()
    if est.get("basis"):
        line += f" ({est['basis']})"
    if pre.get("datasetSha256"):
        line += f"; dataset sha256 {pre['datasetSha256'][:12]}"
    return line


# --------------------------------------------------------------------------- the run
class Demo:
    """Owns every process the demo starts; `close()` stops them all (idempotent)."""

    def __init__(self, args: argparse.Namespace, out: Callable[[str], None] = print) -> None:
        self.args = args
        self.out = out
        self.t0 = time.monotonic()
        self.own_work_dir = args.work_dir is None
        self.work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kubetune-demo-"))
        self.data_root = self.work_dir / "data"
        self.cluster: Any = None
        self.operator: Any = None
        self.api: Any = None

    def say(self, text: str) -> None:
        """Print a timestamped line."""
        self.out(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    # ----------------------------------------------------------------- steps
    def start_cluster(self) -> None:
        """Control plane + KWOK fleet + the CRD + a process node."""
        from kubetune_dev.devcluster import Cluster
        from kubetune_dev.devcluster.cluster import ClusterOptions
        from kubetune_dev.operator_process import install_crds

        self.cluster = Cluster(ClusterOptions(work_dir=self.work_dir / "cluster"))
        self.cluster.start()
        fleet = self.cluster.fleet
        products = sorted({g.gpuProduct for g in fleet.groups if g.gpuProduct})
        self.say(f"control plane up: etcd, kube-apiserver, kube-controller-manager, kube-scheduler; KWOK simulates "
                 f"{len(fleet.node_names)} GPU nodes ({fleet.total_gpus} GPUs: {', '.join(products)})")
        install_crds(self.cluster.kubectl)
        self.say("installed the FineTuneJob CRD (kubectl apply -f crds/)")
        self.api = self.cluster.api_client()
        self.cluster.start_process_node("process-node-0", self.data_root, cpu=str(self.args.node_cpu),
                                        memory="16Gi")
        self._wait(lambda: self._node_ready("process-node-0"), 30, "process-node-0 Ready")
        self.say(f"process node process-node-0 Ready (pods run as local processes under {self.data_root}/nodes)")

    def prepare_data(self, manifest: dict[str, Any]) -> dict[str, Path]:
        """The demo PVC with the tiny model and the dataset the manifest points at."""
        from kubetune_dev.devcluster.process_node import create_local_pvc

        uris = manifest_paths(manifest)
        pvc_root = self.data_root / "pvc"
        paths = {k: pvc_local_path(v, pvc_root) for k, v in uris.items()}
        claims = {v[len("pvc://"):].split("/", 1)[0] for v in uris.values()}
        for claim in sorted(claims):
            create_local_pvc(self.api, self.args.namespace, claim, self.data_root)
        if not (paths["model"] / "config.json").exists():
            cmd = [sys.executable, "-m", "kubetune_trainer.tiny", "--out", str(paths["model"])]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"building the tiny model failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
        info = json.loads((paths["model"] / "kubetune-tiny.json").read_text())
        paths["dataset"].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.args.dataset, paths["dataset"])
        lines = sum(1 for line in paths["dataset"].read_text().splitlines() if line.strip())
        self.say(f"PVC {', '.join(sorted(claims))}: tiny {info['arch']} model ({info['parameters']:,} parameters, "
                 f"built locally) at {uris['model']}; dataset {self.args.dataset.name} ({lines} examples) at "
                 f"{uris['dataset']}")
        return paths

    def start_operator(self) -> None:
        """`python -m kubetune operator` as a subprocess, scheduling CPU-only trainer pods on process nodes."""
        from kubetune_dev.devcluster.cluster import free_port
        from kubetune_dev.operator_process import OperatorProcess

        metrics_port = free_port()
        args = ["--namespace", self.args.namespace, "--no-leader-election", "--liveness-port", "0",
                "--metrics-port", str(metrics_port), "--resync-seconds", str(self.args.resync_seconds),
                "--progress-seconds", str(self.args.resync_seconds),
                "--cpu-node-selector", PROCESS_NODE_SELECTOR]
        self.operator = OperatorProcess(self.cluster.kubeconfig, args, self.work_dir / "operator.log").start()
        self.say(f"operator started (pid {self.operator.pid}; log {self.operator.log_path}; "
                 f"metrics http://127.0.0.1:{metrics_port}/metrics)")

    def apply(self, manifest_path: Path) -> None:
        """The real `kubectl apply -f`."""
        result = self.cluster.kubectl("-n", self.args.namespace, "apply", "-f", str(manifest_path))
        self.say(f"$ kubectl apply -f {_rel(manifest_path)}\n          {result.stdout.strip()}")

    def follow(self, name: str) -> dict[str, Any]:
        """Print one line per status change until the FineTuneJob is terminal; return the object."""
        from kubernetes import client

        objects = client.CustomObjectsApi(self.api)
        deadline = time.monotonic() + self.args.timeout
        last_key = None
        preflight_shown = after_shown = False
        while True:
            obj = objects.get_namespaced_custom_object(API_GROUP, API_VERSION, self.args.namespace, PLURAL, name)
            line = None if preflight_shown else format_preflight(obj.get("status") or {})
            if line:
                preflight_shown = True
                self.out(f"[{time.monotonic() - self.t0:6.1f}s] {line}")
            view = ProgressView.from_status(obj.get("status") or {})
            if view.key() != last_key:
                last_key = view.key()
                self.out(format_progress(view, time.monotonic() - self.t0))
                note = None if after_shown else after_training_note(obj.get("spec") or {}, view.phase, view.step,
                                                                    view.total)
                if note:
                    after_shown = True
                    self.out(f"[{time.monotonic() - self.t0:6.1f}s] {note}")
            if view.phase in TERMINAL:
                return obj
            if self.operator is not None and not self.operator.alive():
                raise RuntimeError("the operator exited:\n" + self.operator.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"FineTuneJob {name} not finished after {self.args.timeout}s; last status: "
                                   f"{json.dumps(obj.get('status') or {})[:2000]}")
            time.sleep(0.5)

    def report(self, obj: dict[str, Any], paths: dict[str, Path]) -> int:
        """`kubectl get ftj`, the adapter files and before/after generations; 0 when Succeeded."""
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        self.out("")
        self.out(f"$ kubectl get ftj {name}")
        self.out(self.cluster.kubectl("-n", self.args.namespace, "get", "ftj", name).stdout.rstrip())
        if status.get("phase") != "Succeeded":
            self.out(f"\nFineTuneJob {name} ended {status.get('phase')}: {status.get('reason')}: {status.get('message')}")
            self._print_pod_logs(name)
            return 1
        adapter_uri = (status.get("artifacts") or {}).get("adapter", "")
        if not adapter_uri:
            self.out(f"\nno adapter in status.artifacts: {status.get('artifacts')}")
            return 1
        adapter = pvc_local_path(adapter_uri, self.data_root / "pvc")
        files = sorted(p.name for p in adapter.iterdir()) if adapter.is_dir() else []
        self.out(f"\nadapter: {adapter_uri}\n  = {adapter}\n  files: {', '.join(files) or '(missing!)'}")
        metrics = status.get("metrics") or {}
        if metrics:
            self.out("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if not files:
            return 1
        if status.get("evaluation") is not None:
            return self.evaluation_ending(status, paths["model"], adapter)
        training = ((obj.get("spec") or {}).get("training") or {})
        eval_split = ((obj.get("spec") or {}).get("dataset") or {}).get("evalSplit", 0.0)
        cmd = [sys.executable, "-m", "kubetune_trainer.generate", "--base", str(paths["model"]),
               "--adapter", str(adapter), "--dataset", str(paths["dataset"]), "--num", str(self.args.prompts),
               "--seed", str(training.get("seed", 42)), "--eval-split", str(eval_split)]
        if eval_split:
            cmd.append("--held-out")
        self.out(f"\ngreedy generations on {'held-out ' if eval_split else ''}prompts of the toy task "
                 "(python -m kubetune_trainer.generate):")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            self.out(f"generation failed ({result.returncode}):\n{result.stderr[-3000:]}")
            return 1
        self.out(result.stdout.rstrip())
        return 0

    def evaluation_ending(self, status: dict[str, Any], model: Path, adapter: Path) -> int:
        """spec.evaluation ran: the base-vs-tuned table, the report, held-out examples, and one held-out prompt
        answered from the exported GGUF (llama.cpp; transformers, saying so, where llama_cpp is not installed).
        0 when the gates passed and the tuned model beats the base on every metric."""
        from kubetune_dev import demo_ending

        evaluation, artifacts = status["evaluation"], status.get("artifacts") or {}
        pvc_root = self.data_root / "pvc"
        doc_path = pvc_local_path(artifacts["evaluation"], pvc_root) if artifacts.get("evaluation") else None
        doc = json.loads(doc_path.read_text()) if doc_path is not None and doc_path.is_file() else {}
        self.out("\n" + demo_ending.format_evaluation(evaluation, len(doc.get("examples") or []) or None))
        if artifacts.get("report"):
            self.out(f"report: {artifacts['report']}\n  = {pvc_local_path(artifacts['report'], pvc_root)}")
        shown = max(self.args.prompts, 0)
        if doc.get("examples"):
            self.out(f"\nheld-out examples (greedy, from {doc_path.name}):\n" + demo_ending.format_examples(doc, shown))
        ok = bool(evaluation.get("passed")) and all(demo_ending.improved(r) for r in evaluation.get("metrics") or [])
        if not artifacts.get("gguf") or not doc.get("examples"):
            self.out(f"\nno GGUF to ask (status.artifacts: {sorted(artifacts)})")
            return 0 if ok else 1
        gguf = pvc_local_path(artifacts["gguf"], pvc_root)
        example = doc["examples"][min(shown, len(doc["examples"]) - 1)]
        cmd = demo_ending.ask_command(sys.executable, str(gguf), str(adapter), example["prompt"], str(model),
                                      str(adapter))
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            self.out(f"asking the GGUF failed ({result.returncode}):\n{result.stderr[-3000:]}")
            return 1
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        self.out("\n" + demo_ending.format_answer(answer, gguf.name, example["reference"]))
        if artifacts.get("modelfile"):
            self.out(f"Ollama Modelfile next to it: {pvc_local_path(artifacts['modelfile'], pvc_root)}")
        return 0 if ok else 1

    def keep_running(self) -> None:
        """--keep: leave everything up until Ctrl-C."""
        kubeconfig = self.cluster.kubeconfig
        self.out(f"\nThe cluster keeps running (--keep). In another shell:\n"
                 f"  export KUBECONFIG={kubeconfig}\n"
                 f"  kubectl get ftj,jobs,pods -n {self.args.namespace}\n"
                 f"  kubetune-dev node logs {self.args.namespace}/<pod>\n"
                 f"Press Ctrl-C to stop it and remove {self.work_dir}.")
        while True:
            if self.operator is not None and not self.operator.alive():
                self.out("the operator exited; stopping")
                return
            time.sleep(1)

    def close(self) -> None:
        """Stop the operator, the process node and the control plane; remove the work dir we created."""
        if self.operator is not None:
            self.operator.stop(timeout=10)
            self.operator = None
        if self.api is not None:
            try:
                self.api.close()
            except Exception:  # noqa: BLE001 - best effort
                pass
            self.api = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # ----------------------------------------------------------------- helpers
    def _node_ready(self, name: str) -> bool:
        from kubernetes import client

        node = client.CoreV1Api(self.api).read_node(name)
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    @staticmethod
    def _wait(check: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except Exception as exc:  # noqa: BLE001 - reported on timeout
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last})")

    def _print_pod_logs(self, name: str) -> None:
        pods_root = self.data_root / "nodes"
        logs = sorted(pods_root.glob(f"*/pods/{self.args.namespace}_{name}-trainer-*/logs/*.log"))
        for path in logs[-2:]:
            tail = path.read_text(errors="replace").splitlines()[-30:]
            self.out(f"\n--- {path} (last lines)\n" + "\n".join(tail))
        if self.operator is not None:
            self.out("\n--- operator log (last lines)\n" + "\n".join(self.operator.log_text().splitlines()[-20:]))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    """`kubetune-dev demo` flags."""
    p = argparse.ArgumentParser(prog="kubetune-dev demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true",
                   help="keep the cluster running after the run (until Ctrl-C) and print the KUBECONFIG")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="FineTuneJob to apply")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                   help="dataset file copied to the manifest's dataset.uri in the demo PVC")
    p.add_argument("--namespace", default="default")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the cluster, PVC data and logs here (default: a temp dir removed on exit)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the FineTuneJob to finish")
    p.add_argument("--prompts", type=int, default=3, help="how many held-out prompts to show before/after")
    p.add_argument("--node-cpu", default="4", help="allocatable CPU of the process node")
    p.add_argument("--resync-seconds", type=float, default=1.0,
                   help="operator resync period (how often progress is read from the trainer)")
    return p


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kubetune-dev demo`."""
    import yaml

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.manifest.is_file():
        print(f"no such manifest: {args.manifest}", file=sys.stderr)
        return 2
    if not args.dataset.is_file():
        print(f"no such dataset: {args.dataset}", file=sys.stderr)
        return 2
    manifest = yaml.safe_load(args.manifest.read_text())
    name = manifest["metadata"]["name"]
    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGHUP, _on_sigterm)
    demo = Demo(args, out=lambda text: print(text, flush=True))
    code = 1
    try:
        demo.say(f"kubetune-dev demo: {_rel(args.manifest)} on a local control plane (work dir {demo.work_dir})")
        demo.start_cluster()
        paths = demo.prepare_data(manifest)
        demo.start_operator()
        demo.apply(args.manifest)
        obj = demo.follow(name)
        code = demo.report(obj, paths)
        demo.say("done" if code == 0 else "failed")
        if args.keep:
            demo.keep_running()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", flush=True)
        code = 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        if demo.cluster is not None:
            demo._print_pod_logs(name)
        code = 1
    finally:
        demo.close()
        if code in (0, 130):
            print(f"stopped everything (total {time.monotonic() - demo.t0:.1f}s)", flush=True)
    return code


def threading_main() -> bool:
    """Whether we run on the main thread (signal handlers can only be set there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
