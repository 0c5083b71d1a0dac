"""The development tools (kubetune_dev) and the test support find the repository's files from their new home,
and `kubetune-dev` dispatches the commands that left `kubetune`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_dev import demo, operator_process
from kubetune_dev.devcluster import binaries, cluster, fleet
from tests.support import finetunejobs

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", [
    fleet.DEFAULT_FLEET_FILE, binaries.BUILD_SCRIPT, cluster.KWOK_STAGES_FILE, operator_process.CRDS_DIR,
    demo.DEFAULT_MANIFEST, demo.DEFAULT_DATASET, finetunejobs.ARGOCD_HEALTH_SCRIPT,
], ids=lambda p: str(Path(p).relative_to(ROOT)))
def test_repository_paths_of_the_tools_exist(path):
    assert Path(path).exists(), path


def test_demo_reads_the_quickstart_pvc_paths():
    manifest = yaml.safe_load(demo.DEFAULT_MANIFEST.read_text())
    uris = demo.manifest_paths(manifest)
    assert all(uri.startswith("pvc://") for uri in uris.values()), uris
    claim, _, rest = uris["dataset"][len("pvc://"):].partition("/")
    assert demo.pvc_local_path(uris["dataset"], Path("/data/pvc")) == Path("/data/pvc") / claim / rest


def test_kwok_nodes_are_the_fleet_files_nodes_plus_the_kwok_marker():
    from kubetune import fleet_file

    groups = fleet.load_fleet()
    plain = fleet_file.node_manifests(groups)
    kwok = fleet.node_manifests(groups)
    assert [n["metadata"]["name"] for n in kwok] == groups.node_names == [n["metadata"]["name"] for n in plain]
    for p, k in zip(plain, kwok):
        assert k["metadata"]["labels"] == {**p["metadata"]["labels"], "type": "kwok"}
        assert k["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
        assert k["status"] == p["status"]
    assert sum(int(n["status"]["allocatable"].get("nvidia.com/gpu", 0)) for n in kwok) == groups.total_gpus > 0


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_kubetune_dev_dispatches_cluster_node_and_demo():
    listing = _run("kubetune_dev", "--help")
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")] == [
        "cluster", "node", "demo"]
    for command, prog in (("cluster", "kubetune-dev cluster"), ("node", "kubetune-dev node"),
                          ("demo", "kubetune-dev demo")):
        result = _run("kubetune_dev", command, "--help")
        assert result.returncode == 0 and f"usage: {prog}" in result.stdout, result.stdout + result.stderr
    assert _run("kubetune", "demo").returncode == 2  # not a product command any more


def test_a_kubelets_node_lease_keeps_the_controller_managers_default_grace():
    assert cluster.node_monitor_flags(cluster.DEFAULT_NODE_LEASE_SECONDS) == []


@pytest.mark.parametrize("lease, grace", [(60, 75), (240, 300), (41, 52)])
def test_a_longer_node_lease_gets_a_grace_of_the_same_ratio(lease, grace):
    assert cluster.node_monitor_flags(lease) == [f"--node-monitor-grace-period={grace}s"]
    # KWOK renews every quarter of the lease: a node is never NotReady between two renewals.
    assert grace > lease / 4 and grace >= cluster.DEFAULT_NODE_MONITOR_GRACE_SECONDS


def test_a_node_lease_under_ten_seconds_is_refused():
    with pytest.raises(ValueError, match="at least 10 s"):
        cluster.node_monitor_flags(5)


def test_live_things_are_stopped_last_first_and_a_failing_stop_does_not_stop_the_rest(monkeypatch):
    stopped = []

    class Thing:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def stop(self):
            stopped.append(self.name)
            if self.fail:
                raise RuntimeError("boom")

    monkeypatch.setattr(cluster, "_live", [])
    a, b, c = Thing("cluster"), Thing("operator", fail=True), Thing("second operator")
    for thing in (a, b, c):
        cluster.track_live(thing)
    cluster.untrack_live(c)
    cluster._stop_all_live()
    assert stopped == ["operator", "cluster"]


def test_an_operator_process_is_tracked_while_it_runs(monkeypatch, tmp_path):
    """Started: stopped with the clusters if the benchmark or test process is ended by a signal."""
    monkeypatch.setattr(cluster, "_live", [])
    op = operator_process.OperatorProcess(tmp_path / "missing-kubeconfig", ["--help"], tmp_path / "op.log")
    op.start()
    try:
        assert cluster._live == [op]
    finally:
        op.stop()
    assert cluster._live == []
