"""A real Prometheus server scrapes the real operator while FineTuneJobs run on the local control
plane; PromQL over its HTTP API must show the operator's series with the right values, and the
chart's alert rules (rendered by helm, loaded into that Prometheus) must evaluate on them."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from kubetune_dev.devcluster.binaries import helm_binary
from kubetune_dev.operator_process import REPO_ROOT, OperatorProcess, install_crds
from tests.support.cluster_helpers import complete_pod, wait_for
from tests.support.finetunejobs import (FtjClient, ProgressServer, free_port, ftj_manifest, summary_json,
                                      gpu_type_with_free_gpus, wait_phase)

SCRAPE_JOB = "kubetune-operator"  # the `job` label Prometheus gives the operator target
PRICED = ("NVIDIA-L4", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3")  # the GPU types the test's jobs may get
PRICE = 2.0  # EUR per GPU-hour
RELEASE_NS = "kubetune-system"  # namespace the chart is rendered for (static label on the target)
PROMETHEUS = shutil.which("prometheus")
KUBE_VERSION = "1.33.13"  # the devcluster's; helm built without ldflags would assume 1.20




HELM = helm_binary()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not on PATH "
                       "(scripts/install-system-deps.sh installs Debian's prometheus package)"),
    pytest.mark.skipif(HELM is None, reason="helm not found (devcluster/build.sh builds it into "
                       "~/.cache/kubetune/bin/current); the chart's monitoring objects are rendered with it"),
]


def render_monitoring(helm: str, out: Path) -> tuple[Path, dict[str, Any]]:
    """The chart's PrometheusRule groups as a rules file (short `for:` so alerts fire in a test) and
    the endpoint of its ServiceMonitor (what a Prometheus Operator would turn into a scrape config)."""
    values = {"monitoring": {"serviceMonitor": {"enabled": True},
                             "prometheusRule": {"enabled": True, "operatorJob": SCRAPE_JOB,
                                                "jobFailedFor": "0s", "operatorDownFor": "0s"}}}
    values_file = out / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rendered = subprocess.run(
        [helm, "template", "kubetune", str(REPO_ROOT / "charts" / "kubetune"), "-n", RELEASE_NS,
         "-f", str(values_file), "--kube-version", KUBE_VERSION,
         "--show-only", "templates/prometheusrule.yaml", "--show-only", "templates/servicemonitor.yaml"],
        capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.stdout) if d}
    path = out / "rules.yaml"
    path.write_text(yaml.safe_dump(docs["PrometheusRule"]["spec"]))
    return path, docs["ServiceMonitor"]["spec"]["endpoints"][0]


class PrometheusServer:
    """`prometheus` on a free loopback port with a generated config; stopped (and reaped) by stop()."""

    def __init__(self, workdir: Path, target_port: int, rules: Path, endpoint: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            # Like the scrape config the Prometheus Operator makes from the chart's ServiceMonitor
            # (path, honorLabels), with the `namespace`/`pod` target labels it adds; 1 s interval for the test.
            "scrape_configs": [{"job_name": SCRAPE_JOB, "metrics_path": endpoint.get("path", "/metrics"),
                                "honor_labels": bool(endpoint.get("honorLabels", False)), "static_configs": [
                {"targets": [f"127.0.0.1:{target_port}"], "labels": {"namespace": RELEASE_NS, "pod": "kubetune-operator-0"}}]}],
        }))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "PrometheusServer":
        """Start the server and wait until /-/ready answers."""
        assert PROMETHEUS is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir))

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as rsp:
                return rsp.status == 200

        wait_for(ready, 60, lambda: f"prometheus ready on {self.url}; log: {self.log_text()[-1500:]}")
        return self

    def log_text(self) -> str:
        """Prometheus' own log."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as rsp:
            body = json.load(rsp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query: the vector's samples as {"metric": labels, "value": float}."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def wait_value(self, promql: str, check: Callable[[float], bool], timeout: float = 20) -> float:
        """Wait until the query returns exactly one sample whose value passes `check`; returns it."""
        last: list[dict[str, Any]] = []

        def ok() -> float | None:
            nonlocal last
            last = self.query(promql)
            return last[0]["value"] if len(last) == 1 and check(last[0]["value"]) else None

        wait_for(lambda: ok() is not None, timeout, lambda: f"PromQL {promql!r} to pass; last result: {last}")
        return last[0]["value"]

    def alerts(self) -> dict[str, dict[str, Any]]:
        """Active alerts by name."""
        return {a["labels"]["alertname"]: a for a in self.api("alerts")["alerts"]}


@pytest.fixture
def progress() -> Iterator[ProgressServer]:
    server = ProgressServer().start()
    yield server
    server.stop()


@pytest.fixture
def operator(cluster, namespace, progress, tmp_path) -> Iterator[OperatorProcess]:
    install_crds(cluster.kubectl)
    op = OperatorProcess(cluster.kubeconfig, [
        "--namespace", namespace, "--lease-namespace", namespace, "--lease-name", f"prom-{uuid.uuid4().hex[:6]}",
        "--lease-seconds", "5", "--resync-seconds", "1", "--progress-seconds", "1", "--liveness-port", "0",
        "--metrics-port", str(free_port()), "--progress-host", "127.0.0.1", "--progress-port", str(progress.port),
        "--no-preflight",  # KWOK pods run no preflight
        "--pricing", ",".join(f"{product}={PRICE}" for product in PRICED), "--currency", "EUR",
    ], tmp_path / "operator.log")
    op.metrics_port = int(op.args[op.args.index("--metrics-port") + 1])
    with op.leading(log_tail=3000):
        yield op


@pytest.fixture
def prometheus(operator, tmp_path) -> Iterator[PrometheusServer]:
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    rules, endpoint = render_monitoring(HELM, workdir)
    server = PrometheusServer(workdir, operator.metrics_port, rules, endpoint)
    try:
        yield server.start()
    finally:
        server.stop()
        print(server.log_text()[-2000:])




def test_prometheus_scrapes_operator_series_and_chart_alerts_fire(prometheus, operator, progress, k8s, namespace):
    prom, ns, ftj = prometheus, namespace, FtjClient(k8s)
    up = f'up{{job="{SCRAPE_JOB}"}}'
    prom.wait_value(up, lambda v: v == 1)
    # Every rule of the chart loads and evaluates without error against the real series.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"KubetuneJobFailed", "KubetuneOperatorDown", "KubetuneTrainingStalled",
                                          "KubetuneTrainingLossNotFinite", "KubetuneReconcileErrors",
                                          "KubetuneJobOverBudget"}
    wait_for(lambda: all(r.get("health") == "ok" for g in prom.api("rules")["groups"] for r in g["rules"]), 15,
             lambda: f"all rules healthy: {[(r['name'], r.get('health'), r.get('lastError')) for r in rules]}")
    wait_for(lambda: "KubetuneOperatorDown" not in prom.alerts(), 15, "KubetuneOperatorDown inactive while up")
    prom.wait_value('kubetune_jobs{phase="Running"}', lambda v: v == 0)

    # A running job: phase gauge, GPUs requested and the rank-0 progress the operator relays.
    progress.set({"version": 1, "phase": "training", "step": 40, "totalSteps": 100, "epoch": 0.4,
                  "trainLoss": 1.9, "evalLoss": None, "learningRate": 0.0002, "tokens": 40960,
                  "tokensPerSecond": 2100.0, "etaSeconds": 38.0, "checkpoint": {"step": 0, "uri": ""}})
    gpu_type = gpu_type_with_free_gpus(k8s, 2)  # jobs of earlier tests may still hold the small L4 nodes
    ftj.create(ns, ftj_manifest("scraped", gpus=2, gpu_type=gpu_type))
    wait_phase(ftj, ns, "scraped", "Running")
    job_sel = f'namespace="{ns}",name="scraped"'
    prom.wait_value('kubetune_jobs{phase="Running"}', lambda v: v == 1)
    assert prom.wait_value(f'kubetune_gpus_requested{{gpu_type="{gpu_type}"}}', lambda v: v == 2) == 2
    prom.wait_value(f"kubetune_job_progress_ratio{{{job_sel}}}", lambda v: v == 0.4)
    prom.wait_value(f"kubetune_job_tokens_per_second{{{job_sel}}}", lambda v: v == 2100)
    prom.wait_value(f"kubetune_job_train_loss{{{job_sel}}}", lambda v: v == 1.9)
    # What it costs: GPU-hours growing on its GPU type, at their price. (No preflight counted its tokens, so there
    # is no estimate to compare with; tests/unit/test_metrics_cost.py and the chart's promtool tests cover that.)
    prom.wait_value(f'kubetune_job_gpu_hours{{{job_sel},gpu_type="{gpu_type}"}}', lambda v: v > 0)
    price = prom.wait_value(f'kubetune_job_cost{{{job_sel},currency="EUR"}} / on (namespace, name) '
                            f'kubetune_job_gpu_hours{{{job_sel}}}', lambda v: v > 0)
    assert price == pytest.approx(PRICE, rel=0.1)  # both rounded to 4 decimals
    assert not prom.query(f"kubetune_job_estimated_cost{{{job_sel}}}")

    # It succeeds: Succeeded=1, nothing Running, final loss and progress from the summary.
    pod = wait_for(lambda: ftj.running_pod(ns, "scraped", 0), 30, "running trainer pod")
    complete_pod(k8s, ns, pod.metadata.name, message=summary_json("scraped"))
    wait_phase(ftj, ns, "scraped", "Succeeded")
    prom.wait_value('kubetune_jobs{phase="Succeeded"}', lambda v: v == 1)
    assert prom.query('kubetune_jobs{phase="Running"}')[0]["value"] == 0
    assert prom.query('kubetune_jobs{phase="Failed"}')[0]["value"] == 0
    prom.wait_value(f"kubetune_job_progress_ratio{{{job_sel}}}", lambda v: v == 1.0)
    prom.wait_value(f"kubetune_job_train_loss{{{job_sel}}}", lambda v: v == 1.23)
    wait_for(lambda: not prom.query("kubetune_gpus_requested"), 15, "GPU request series gone once finished")
    # Scraping followed the whole run, not just its end.
    assert prom.query('max_over_time(kubetune_jobs{phase="Running"}[10m])')[0]["value"] == 1
    # One job became Running once; the reconcile histogram counted passes, and none failed.
    assert prom.wait_value("kubetune_job_time_to_running_seconds_count", lambda v: v == 1) == 1
    assert prom.query("kubetune_job_time_to_running_seconds_sum")[0]["value"] > 0
    passes = prom.wait_value("kubetune_reconcile_duration_seconds_count", lambda v: v > 0)
    inf_bucket = prom.query('kubetune_reconcile_duration_seconds_bucket{le="+Inf"}')[0]["value"]
    assert inf_bucket >= passes > 0
    assert prom.query("kubetune_reconcile_duration_seconds_sum")[0]["value"] > 0
    assert prom.query("kubetune_reconcile_errors_total")[0]["value"] == 0
    print(f"reconcile passes seen by Prometheus: {passes:.0f}")
    assert "KubetuneJobFailed" not in prom.alerts()

    # A trainer data error fails a second job: Failed=1 and the chart's KubetuneJobFailed fires.
    progress.set(None)
    ftj.create(ns, ftj_manifest("broken", gpu_type=gpu_type_with_free_gpus(k8s, 1)))
    pod = wait_for(lambda: ftj.running_pod(ns, "broken", 0), 40, "running trainer pod of broken")
    complete_pod(k8s, ns, pod.metadata.name, exit_code=3,
                 message=summary_json("broken", status="Failed", reason="DataError", message="bad line 3", step=0))
    wait_phase(ftj, ns, "broken", "Failed")
    prom.wait_value('kubetune_jobs{phase="Failed"}', lambda v: v == 1)
    assert prom.query('kubetune_jobs{phase="Succeeded"}')[0]["value"] == 1
    alert = wait_for(lambda: prom.alerts().get("KubetuneJobFailed", {}).get("state") == "firing"
                     and prom.alerts()["KubetuneJobFailed"], 15, "KubetuneJobFailed firing")
    assert float(alert["value"]) == 1 and alert["labels"]["severity"] == "warning"

    # The operator dies: its target goes down and KubetuneOperatorDown fires.
    operator.kill()
    prom.wait_value(up, lambda v: v == 0)
    wait_for(lambda: prom.alerts().get("KubetuneOperatorDown", {}).get("state") == "firing", 15,
             lambda: f"KubetuneOperatorDown firing; alerts: {prom.alerts()}")
