"""The operator-scale benchmark as a regression check: its quick preset (20 KWOK nodes, 50 FineTuneJobs at
once) must end with every job sized, launched and Succeeded, nothing lost, no errors, the operator under its
memory target, and a throughput ratio measured against direct Job creation in the same run. Its peer phase
runs the real Kubeflow Trainer and JobSet managers (built from devcluster/kubeflow/go.mod) on the same fleet:
50 TrainJobs must all get their pods and complete, and every kubetune/Kubeflow ratio must be measured."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BENCH_CATEGORIES = load_module_from_file("operator_scale_bench", ROOT / "bench" / "operator_scale.py").PROFILE_CATEGORIES


def test_quick_operator_scale_run_completes_every_job(tmp_path):
    if shutil.which("go"):
        # A cold build of the two managers takes minutes: outside the benchmark's own time limit.
        from kubetune_dev.devcluster.kubeflow import build_kubeflow

        build_kubeflow()
    out = tmp_path / "scale.json"
    profile = tmp_path / "apiserver.pprof"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "operator_scale.py"), "--quick", "--out", str(out),
                           "--timeout", "300", "--apiserver-profile", str(profile), "--apiserver-profile-seconds", "3",
                           "--audit"],
                          capture_output=True, text=True, timeout=1200)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    creation, completion = result["kubetune"]["creation"], result["kubetune"]["completion"]
    assert creation["complete"] and creation["lost_count"] == 0 and creation["create_error_count"] == 0, creation
    assert completion["all_succeeded"], completion
    assert result["baseline"]["error_count"] == 0 and result["baseline_running"]["error_count"] == 0
    assert result["baseline_running"]["complete"] and result["baseline_running"]["drain_s"] >= 0
    assert result["ratio"] and result["ratio"] > 0, result
    assert result["ratio_vs_running_jobs"] and result["ratio_vs_running_jobs"] > 0, result
    assert creation["services_expected"] == 0 and creation["with_services"] == 0  # single-pod runs: no Service
    operator_rss = result["kubetune"]["operator"]["peak_rss_mib"]
    assert operator_rss < 300, operator_rss
    assert proc.returncode == 0 and result["ok"], proc.stdout[-3000:]
    # CPU per process for each creation phase: the evidence of what bounds the ratio on a saturated machine.
    for phase in (result["baseline"], creation):
        cpu = phase["cpu_s_by_process"]
        assert {"kube-apiserver", "etcd", "bench client"} <= set(cpu), cpu
        assert cpu["kube-apiserver"] > 0 and cpu["TOTAL"] >= cpu["kube-apiserver"] and cpu["cores_busy"] > 0, cpu
    assert creation["cpu_s_by_process"]["operator"] > 0, creation["cpu_s_by_process"]
    # Who sent the requests (the audit log): the operator under its own name, one trainer Job per FineTuneJob,
    # and it never GETs a FineTuneJob (its reads come from watches).
    clients = creation["apiserver_requests_by_client"]
    operator_requests = clients["kubetune-operator"]
    assert operator_requests.get("create jobs") == result["jobs"], clients
    assert clients["OpenAPI-Generator"].get("create finetunejobs") == result["jobs"], clients
    for phase in (clients, completion["apiserver_requests_by_client"]):
        assert "get finetunejobs" not in phase.get("kubetune-operator", {}), phase
    assert "apiserver requests by client (creation phase, audit log): " in proc.stdout
    # The apiserver CPU profile of the creation phase: a gzipped pprof file, summarised by category with `go`.
    prof = creation["apiserver_profile"]
    assert "error" not in prof, prof
    assert profile.read_bytes()[:2] == b"\x1f\x8b", prof
    if shutil.which("go"):
        shares = prof["share_by_category"]
        assert prof["total_cpu_s"] > 0 and set(shares) == set(BENCH_CATEGORIES), prof
        assert 0 < shares["object creates (all kinds)"] <= 1, shares
        assert "apiserver CPU profile" in proc.stdout
    # The Kubeflow Trainer peer, measured the same way on the same fleet (skipped, with the reason, only without go).
    peer = result["kubeflow"]
    if not shutil.which("go"):
        assert "go is not installed" in peer["skipped"], peer
        return
    assert "skipped" not in peer, peer
    kf, kt = peer["creation"], creation["to_pods"]
    assert kf["to_pods"]["complete"] and kf["lost_count"] == 0 and kf["create_error_count"] == 0, kf
    assert kf["to_pods"]["with_pods"] == result["jobs"] and kf["with_jobsets"] == result["jobs"], kf
    assert peer["completion"]["all_succeeded"], peer["completion"]
    assert peer["controllers"]["alive_at_end"], peer["controllers"]
    assert kt["complete"] and kt["with_pods"] == result["jobs"], kt
    for side in (kf["to_pods"], kt):
        assert side["throughput_per_s"] > 0 and side["latency_s"]["samples"] == result["jobs"], side
        assert side["cpu_s_per_job"]["controllers"] > 0 and side["cpu_s_per_job"]["kube-apiserver"] > 0, side
    assert set(kf["to_pods"]["cpu_s_by_process"]) >= {"trainer-controller-manager", "jobset-controller-manager"}
    assert "operator" not in kf["to_pods"]["cpu_s_by_process"]  # the operator is stopped before the peer runs
    ratios = result["peer_ratios"]
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in ratios.values()), ratios
    assert result["peer_ok"] and "ratio kubetune/Kubeflow throughput_until_pods" in proc.stdout
