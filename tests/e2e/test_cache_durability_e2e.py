"""End to end, the shared model cache (docs/cache.md) through what goes wrong around it, with real preflight and
trainer pods on process nodes and the tiny model in a local S3 endpoint that counts every download:

- the operator restarts between two jobs on one model: the cache on its claim is still there, the second job's
  preflight finds the entry (a hit, no new download) and both jobs succeed, the first one finished by the new
  operator;
- a preflight pod is deleted while it downloads the model: only its tmp/ directory is left (no complete entry, no
  file in models/, the entry's lock free, a trainer's lookup finds nothing), and the Job's retried preflight
  finishes that download (the files already whole are not fetched again), fills the entry and the job succeeds."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from pathlib import Path

import pytest

from tests.support.cache_jobs import (GatedS3, apply_job, cache_operator, gets, prepare_namespace, upload_tiny_model,
                                      wait_status, wait_terminal)
from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import FtjClient
from kubetune_dev.operator_process import install_crds

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CACHE_CLAIM = "model-cache"
HELD = "tiny-llama/model.safetensors"  # the weights: downloaded after config.json, before the tokenizer files


@pytest.fixture
def s3():
    pytest.importorskip("minio")
    server = GatedS3(f"/models/{HELD}")
    yield server
    server.release.set()
    server.close()


def test_the_cache_survives_an_operator_restart(cluster, k8s, namespace, process_nodes, s3, tmp_path):
    s3.release.set()  # nothing held in this test
    install_crds(cluster.kubectl)
    ftj = FtjClient(k8s)
    keys = upload_tiny_model(s3, tmp_path)
    data_root = Path(process_nodes[0].config.data_root)
    work = prepare_namespace(k8s, namespace, data_root, s3, claims=(CACHE_CLAIM,))
    lease = f"e2e-restart-{uuid.uuid4().hex[:6]}"
    first = cache_operator(cluster, namespace, tmp_path / "operator-1.log", ["--cache-claim", CACHE_CLAIM], lease)
    with first.leading():
        apply_job(cluster, namespace, "before-restart", work)
        # stop the operator as soon as the preflight has filled the cache, with the job still to train
        early = wait_status(ftj, namespace, "before-restart", lambda st: "preflight" in st, "validated")
    assert early["phase"] not in ("Succeeded", "Failed"), early
    assert first.proc is not None and first.proc.returncode is not None  # stopped
    second = cache_operator(cluster, namespace, tmp_path / "operator-2.log", ["--cache-claim", CACHE_CLAIM], lease)
    with second.leading():
        apply_job(cluster, namespace, "after-restart", work)
        before, after = (wait_terminal(ftj, namespace, n) for n in ("before-restart", "after-restart"))
    assert before["phase"] == "Succeeded" and after["phase"] == "Succeeded", (before, after)
    for key in keys:  # two preflights and two trainer pods across two operators: each file downloaded once
        assert gets(s3, key) == 1, (key, s3.requests)
    entry = before["preflight"]["cache"]["model"]
    assert before["preflight"]["cache"]["filled"] == [entry] and before["preflight"]["cache"]["hits"] == []
    hit = after["preflight"]["cache"]
    assert (hit["volume"], hit["model"], hit["filled"], hit["hits"]) == (CACHE_CLAIM, entry, [], [entry]), hit
    cache_root = data_root / "pvc" / CACHE_CLAIM
    assert (cache_root / entry / ".kubetune-entry.json").is_file() and not list((cache_root / "tmp").glob("*"))


def _locked(lock: Path) -> bool:
    """Whether a process holds the flock on `lock` (as the fill takes it)."""
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_a_preflight_killed_mid_download_leaves_only_tmp_and_its_retry_finishes_it(
        cluster, k8s, namespace, process_nodes, s3, tmp_path, monkeypatch):
    from kubernetes import client

    from kubetune_trainer import cache_volume

    install_crds(cluster.kubectl)
    core, batch, ftj = client.CoreV1Api(k8s), client.BatchV1Api(k8s), FtjClient(k8s)
    keys = upload_tiny_model(s3, tmp_path)
    assert keys.index(HELD) > 0, keys  # some files are whole before the held one
    data_root = Path(process_nodes[0].config.data_root)
    work = prepare_namespace(k8s, namespace, data_root, s3, claims=(CACHE_CLAIM,))
    cache_root = data_root / "pvc" / CACHE_CLAIM
    op = cache_operator(cluster, namespace, tmp_path / "operator.log", ["--cache-claim", CACHE_CLAIM])
    with op.leading():
        apply_job(cluster, namespace, "interrupted", work)
        assert s3.arrived.wait(300), f"the preflight never asked for {HELD}; requests: {s3.requests}"
        selector = "kubetune.io/job-name=interrupted,kubetune.io/component=preflight"
        [victim] = core.list_namespaced_pod(namespace, label_selector=selector).items
        staging = wait_for(lambda: next(iter((cache_root / "tmp").glob("models__*")), None), 30, "the tmp/ entry")
        entry = staging.name.replace("__", "/", 1)
        assert _locked(cache_root / "locks" / f"{staging.name}.lock")  # the fill holds the entry's lock
        core.delete_namespaced_pod(victim.metadata.name, namespace, grace_period_seconds=1)

        def dead():
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            return all(p.metadata.uid != victim.metadata.uid or p.status.phase == "Failed" for p in pods)

        wait_for(dead, 60, f"pod {victim.metadata.name} killed")
        # what the killed fill left: its tmp/ directory with the whole files, no entry anyone would use
        assert not (cache_root / entry).exists() and not list((cache_root / "models").glob("*")), \
            sorted(p.name for p in (cache_root / "models").glob("*"))
        assert cache_volume.read_entry(cache_root, entry) is None
        held = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        whole = keys[:keys.index(HELD)]
        assert [f"tiny-llama/{p}" for p in held] == whole, held  # nothing of the weights: their download was held
        assert not _locked(cache_root / "locks" / f"{staging.name}.lock")  # the dead holder's lock is released
        uid = ftj.get(namespace, "interrupted")["metadata"]["uid"]
        monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(cache_root))  # a trainer pod of this job, reading its lease
        monkeypatch.setenv("KUBETUNE_CACHE_LEASE", uid)
        monkeypatch.delenv("KUBETUNE_CACHE_FILL", raising=False)
        lease = json.loads((cache_root / "leases" / f"{uid}.json").read_text())
        assert lease["models"] == {"s3://models/tiny-llama": entry}, lease  # it names the entry being filled
        assert cache_volume.lookup("models", "s3://models/tiny-llama") is None  # a half entry is never used
        s3.release.set()
        done = wait_terminal(ftj, namespace, "interrupted")
    assert done["phase"] == "Succeeded", done
    cache = done["preflight"]["cache"]
    assert cache["model"] == entry and cache["filled"] == [entry] and cache["hits"] == []
    preflight = batch.read_namespaced_job("interrupted-preflight", namespace).status
    assert preflight.succeeded == 1 and preflight.failed == 1, preflight  # the Job's own retry finished it
    for key in whole:  # resumed: the files whole before the kill were not downloaded again
        assert gets(s3, key) == 1, (key, s3.requests)
    assert gets(s3, HELD) == 2  # the held download (its client killed) and the retry's
    for key in keys[keys.index(HELD) + 1:]:
        assert gets(s3, key) == 1, (key, s3.requests)
    for key in keys:  # the entry holds exactly the objects, byte for byte, and nothing else of the download
        assert (cache_root / entry / key.split("/", 1)[1]).read_bytes() == s3.objects[("models", key)], key
    files = sorted(p.relative_to(cache_root / entry).as_posix() for p in (cache_root / entry).rglob("*")
                   if p.is_file())
    assert files == sorted([".kubetune-entry.json", *(k.split("/", 1)[1] for k in keys)]), files
    assert not list((cache_root / "tmp").glob("*")) and os.listdir(cache_root / "models") == [entry.split("/")[1]]
