"""The shared model/dataset cache (kubetune_trainer.cache, docs/cache.md): content-addressed layout, one download per
entry under a lock, atomic fills (a fill killed midway is never used and the next one finishes it), and the
eviction policy (size cap, least recently used, never an entry a live lease names)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_trainer import cache, storage
from kubetune_trainer.errors import NoSpaceError, PermissionDeniedError

from .test_storage import LocalS3

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SHA_A = "a" * 64
SHA_B = "b" * 64


# ----------------------------------------------------------------------------- layout

def test_layout_is_content_addressed():
    assert cache.model_key("hf://org/tiny", "0123abcd") == "models/hf%3A%2F%2Forg%2Ftiny@0123abcd"
    assert cache.model_key("s3://models/llama/8b", "s3-12ab") == "models/s3%3A%2F%2Fmodels%2Fllama%2F8b@s3-12ab"
    assert cache.dataset_key(SHA_A) == f"datasets/{SHA_A}"
    long = "s3://bucket/" + "x" * 400
    name = cache.escape(long)
    assert len(name) <= 200 and "/" not in name and name != cache.escape(long + "y")
    with pytest.raises(ValueError, match="needs a revision"):
        cache.model_key("hf://org/tiny", "")
    with pytest.raises(ValueError, match="not a SHA-256"):
        cache.dataset_key("../../etc")


# ----------------------------------------------------------------------------- eviction policy (pure)

def E(key: str, size: int, used: float) -> cache.Entry:  # noqa: N802 - a short constructor for the tables below
    return cache.Entry(key, size, used)


def test_eviction_removes_least_recently_used_until_under_the_cap():
    entries = [E("models/a", 40, 3.0), E("models/b", 30, 1.0), E("datasets/c", 20, 2.0), E("models/d", 10, 4.0)]
    assert cache.choose_evictions(entries, 100) == []  # 100 bytes fit
    assert cache.choose_evictions(entries, 80) == ["models/b"]  # the oldest goes first
    assert cache.choose_evictions(entries, 50) == ["models/b", "datasets/c"]
    assert cache.choose_evictions(entries, 45) == ["models/b", "datasets/c", "models/a"]
    assert cache.choose_evictions(entries, 0) == []  # no cap


def test_eviction_never_takes_an_entry_in_use():
    entries = [E("models/a", 40, 3.0), E("models/b", 30, 1.0), E("datasets/c", 20, 2.0)]
    assert cache.choose_evictions(entries, 50, in_use={"models/b"}) == ["datasets/c", "models/a"]
    # what is in use alone is over the cap: everything else goes, the used entry stays
    assert cache.choose_evictions(entries, 10, in_use={"models/a", "models/b"}) == ["datasets/c"]


def test_live_keys_come_from_unexpired_leases():
    leases = [{"expiresAt": 200, "models": {"hf://a": "models/a@1"}, "datasets": {"s3://d": f"datasets/{SHA_A}/t.jsonl"}},
              {"expiresAt": 50, "models": {"hf://b": "models/b@1"}}]
    assert cache.live_keys(leases, now=100) == {"models/a@1", f"datasets/{SHA_A}"}


# ----------------------------------------------------------------------------- fills on a real directory

def _counting_fill(root: str, key: str, counter: str, delay: float) -> str:
    def download(target: Path) -> None:
        with open(counter, "a") as fh:
            fh.write("x")
        time.sleep(delay)
        (target / "config.json").write_text("{}")

    path, _ = cache.fill(Path(root), key, download, {"uri": "test"})
    return str(path)


def test_two_fills_of_one_entry_download_it_once(tmp_path):
    counter = tmp_path / "downloads"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_counting_fill, [(str(tmp_path / "c"), "models/m@1", str(counter), 1.0)] * 2)
    assert counter.read_text() == "x"  # the second waited for the lock, then found the entry complete
    assert paths[0] == paths[1] == str(tmp_path / "c" / "models" / "m@1")
    assert cache.read_entry(tmp_path / "c", "models/m@1")["bytes"] == 2


KILLED_FILL = """
import sys, time
from pathlib import Path
from kubetune_trainer import cache

def download(target):
    (target / "model-00001.safetensors").write_text("first half")
    Path(sys.argv[2]).write_text("started")
    time.sleep(60)

cache.fill(Path(sys.argv[1]), "models/m@1", download, {"uri": "test"})
"""


def test_a_fill_killed_midway_is_never_used_and_the_next_fill_finishes_it(tmp_path, monkeypatch):
    root, flag = tmp_path / "c", tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer_image")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FILL, str(root), str(flag)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the fill did not start"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (root / "models" / "m@1").exists() and cache.read_entry(root, "models/m@1") is None
    assert (root / "tmp" / "models__m@1" / "model-00001.safetensors").is_file()
    # a trainer whose lease names the entry does not use the half-written download
    cache.write_lease(root, "uid-1", "ns/job", {"hf://m": "models/m@1"}, {}, now=time.time(), ttl=60)
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(root))
    monkeypatch.setenv("KUBETUNE_CACHE_LEASE", "uid-1")
    assert cache.lookup("models", "hf://m") is None

    seen = []

    def finish(target: Path) -> None:
        seen.extend(sorted(p.name for p in target.iterdir()))  # the interrupted fill's files are there to resume
        (target / "model-00002.safetensors").write_text("second half")
        (target / "config.json").write_text("{}")

    path, new = cache.fill(root, "models/m@1", finish, {"uri": "hf://m"})
    assert new and seen == ["model-00001.safetensors"]
    assert sorted(p.name for p in path.iterdir()) == [cache.ENTRY_FILE, "config.json", "model-00001.safetensors",
                                                       "model-00002.safetensors"]
    assert not (root / "tmp" / "models__m@1").exists()
    assert cache.lookup("models", "hf://m") == path


def test_a_failed_download_leaves_no_entry_and_full_or_read_only_volumes_say_so(tmp_path):
    root = tmp_path / "c"

    def full(target: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceError, match=r"model cache volume .* is full"):
        cache.fill(root, "models/m@1", full, {})
    assert cache.read_entry(root, "models/m@1") is None and not (root / "models" / "m@1").exists()

    def read_only(target: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(PermissionDeniedError, match="not writable .* read-write"):
        cache.fill(root, "models/m@2", read_only, {})


def _entry(root: Path, key: str, size: int, used: float) -> None:
    def download(target: Path) -> None:
        (target / "blob").write_bytes(b"x" * size)

    cache.fill(root, key, download, {})
    os.utime(root / key / cache.ENTRY_FILE, (used, used))


def test_sweep_applies_the_policy_on_the_volume(tmp_path):
    root, now = tmp_path / "c", time.time()
    _entry(root, "models/old@1", 400, now - 300)
    _entry(root, "models/leased@1", 400, now - 400)
    _entry(root, "models/new@1", 400, now - 10)
    cache.write_lease(root, "running", "ns/a", {"hf://l": "models/leased@1"}, {}, now=now, ttl=3600)
    cache.write_lease(root, "finished", "ns/b", {"hf://o": "models/old@1"}, {}, now=now - 7200, ttl=3600)
    (root / "tmp" / "models__abandoned@1").mkdir(parents=True)  # a fill that died long ago; nobody holds its lock
    (root / "tmp" / "models__abandoned@1" / "part").write_text("half")
    for path in (root / "tmp" / "models__abandoned@1" / "part", root / "tmp" / "models__abandoned@1"):
        os.utime(path, (now - cache.ABANDONED_SECONDS - 60,) * 2)
    (root / "tmp" / "models__interrupted@1").mkdir()  # one that died a minute ago: kept for its retry to finish
    (root / "tmp" / "models__interrupted@1" / "part").write_text("half")
    with cache.locked(root, "models/filling@1"):  # a fill in progress elsewhere keeps its directory
        (root / "tmp" / "models__filling@1").mkdir()
        result = cache.sweep(root, cap_bytes=1000, now=now)
        assert (root / "tmp" / "models__filling@1").is_dir()
    assert result["evicted"] == ["models/old@1"] and result["abandoned"] == 1
    assert result["bytes"] == 800 and result["entries"] == 2  # sizes come from the manifests
    assert sorted(e.key for e in cache.scan(root)) == ["models/leased@1", "models/new@1"]
    assert not (root / "leases" / "finished.json").exists() and (root / "leases" / "running.json").exists()
    assert not (root / "tmp" / "models__abandoned@1").exists()
    assert (root / "tmp" / "models__interrupted@1" / "part").is_file()
    # the leased entry is the oldest, but a live lease protects it: the newer unleased one goes first
    assert cache.sweep(root, cap_bytes=500, now=now)["evicted"] == ["models/new@1"]
    assert [e.key for e in cache.scan(root)] == ["models/leased@1"]
    # an hour later nobody finished them: the interrupted download and the one whose fill has let go of its lock go
    assert cache.sweep(root, cap_bytes=0, now=now + cache.ABANDONED_SECONDS + 60)["abandoned"] == 2
    assert not list((root / "tmp").iterdir())


def test_without_a_cache_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBETUNE_CACHE_DIR", raising=False)
    assert cache.lookup("models", "hf://org/tiny") is None
    assert cache.prepare("hf://org/tiny", "abc", {}, job="ns/j") == {"volume": "none"}


# ----------------------------------------------------------------------------- through the real fetch code (S3)

@pytest.fixture
def s3(tmp_path, monkeypatch):
    pytest.importorskip("minio")
    server = LocalS3()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("KUBETUNE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    yield server
    server.close()


def _gets(s3: LocalS3, prefix: str) -> int:
    return sum(1 for r in s3.requests if r.startswith(f"GET {prefix}"))


def test_two_jobs_on_one_s3_model_download_it_once_and_trainers_read_the_cache(s3, tmp_path, monkeypatch):
    s3.put("models", "tiny/config.json", '{"model_type": "llama"}')
    s3.put("models", "tiny/model.safetensors", b"\0" * 4096)
    s3.put("data", "train.jsonl", '{"instruction": "Say hi", "output": "hi"}\n')
    root = tmp_path / "cache"
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(root))
    monkeypatch.setenv("KUBETUNE_CACHE_VOLUME", "model-cache")
    monkeypatch.setenv("KUBETUNE_CACHE_FILL", "true")
    reports = []
    for uid in ("uid-a", "uid-b"):  # two jobs' preflights, as `kubetune-train preflight` calls it
        monkeypatch.setenv("KUBETUNE_CACHE_LEASE", uid)
        data = storage.fetch_dataset("s3://data/train.jsonl")
        from kubetune_trainer.preflight import file_sha256

        reports.append(cache.prepare("s3://models/tiny", "", {"s3://data/train.jsonl": (data, file_sha256(data))},
                                     job=f"ns/{uid}"))
    assert _gets(s3, "/models/tiny/model.safetensors") == 1 and _gets(s3, "/models/tiny/config.json") == 1
    first, second = reports
    key = first["model"]
    assert key.startswith("models/s3%3A%2F%2Fmodels%2Ftiny@s3-") and first["dataset"].startswith("datasets/")
    assert first["filled"] == [key, first["dataset"]] and first["hits"] == [] and first["volume"] == "model-cache"
    assert second["filled"] == [] and second["hits"] == [key, first["dataset"]]
    assert Path(second["modelDir"]) == root / key and first["bytes"] == second["bytes"] > 4096

    # a trainer pod of job b: read-only, finds its model and data through its lease, downloads nothing
    monkeypatch.delenv("KUBETUNE_CACHE_FILL")
    before = len(s3.requests)
    assert storage.fetch_model("s3://models/tiny") == root / key
    assert storage.fetch_dataset("s3://data/train.jsonl") == root / first["dataset"] / "train.jsonl"
    assert len(s3.requests) == before
    # a job without a lease (no preflight) downloads as before
    monkeypatch.setenv("KUBETUNE_CACHE_LEASE", "uid-other")
    assert storage.fetch_model("s3://models/tiny") == tmp_path / "work" / "s3" / "models" / "tiny"
    assert _gets(s3, "/models/tiny/model.safetensors") == 2

    # a changed object is a new revision: a new entry, filled once more
    s3.put("models", "tiny/model.safetensors", b"\1" * 4097)
    monkeypatch.setenv("KUBETUNE_CACHE_FILL", "true")
    third = cache.prepare("s3://models/tiny", "", {}, job="ns/c")
    assert third["model"] != key and third["filled"] == [third["model"]]


def test_an_interrupted_s3_fill_is_finished_without_downloading_its_whole_files_again(s3, tmp_path, monkeypatch):
    s3.put("models", "tiny/config.json", '{"model_type": "llama"}')
    s3.put("models", "tiny/model.safetensors", b"\0" * 4096)
    s3.put("models", "tiny/tokenizer.json", "{}")
    root = tmp_path / "cache"
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(root))
    monkeypatch.setenv("KUBETUNE_CACHE_FILL", "true")
    key = cache.model_key("s3://models/tiny", cache.s3_revision("s3://models/tiny"))
    staging = root / "tmp" / key.replace("/", "__")  # what a preflight killed during the weights' download left
    staging.mkdir(parents=True)
    (staging / "config.json").write_text('{"model_type": "llama"}')
    (staging / "model.safetensors").write_bytes(b"\0" * 100)  # cut short (not the client's own way, but possible)
    report = cache.prepare("s3://models/tiny", "", {}, job="ns/retry")
    assert report["model"] == key and report["filled"] == [key]
    assert _gets(s3, "/models/tiny/config.json") == 0  # whole: kept
    assert _gets(s3, "/models/tiny/model.safetensors") == 1 and _gets(s3, "/models/tiny/tokenizer.json") == 1
    assert (root / key / "model.safetensors").read_bytes() == b"\0" * 4096 and not staging.exists()
    # without the cache (a pod's own download into its work directory) nothing is taken for whole by its size
    monkeypatch.delenv("KUBETUNE_CACHE_DIR")
    target = tmp_path / "work" / "s3" / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"model_type": "llama"}')
    storage.fetch_model("s3://models/tiny")
    assert _gets(s3, "/models/tiny/config.json") == 1


def test_hf_models_are_keyed_by_the_resolved_commit(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        target = Path(kwargs["local_dir"])
        (target / ".cache" / "huggingface").mkdir(parents=True)  # the hub's resume bookkeeping
        (target / "config.json").write_text("{}")
        return str(target)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_CACHE_FILL", "true")
    commit = "0123456789abcdef0123456789abcdef01234567"
    for _ in range(2):
        report = cache.prepare("hf://org/tiny@main", commit, {}, job="ns/j")
    assert len(calls) == 1 and calls[0]["revision"] == commit and calls[0]["repo_id"] == "org/tiny"
    assert report["model"] == f"models/hf%3A%2F%2Forg%2Ftiny@{commit}"
    assert not (tmp_path / "cache" / report["model"] / ".cache").exists()
