"""Model/dataset/output URIs (docs/contracts.md §1, §3, §4): pvc://, file:// and plain paths resolve to local
files; hf:// is served from a local hub cache with HF_HUB_OFFLINE=1; s3:// goes through the real MinIO client
against a small S3-compatible HTTP server started by the test (path-style ListObjectsV2/HEAD/GET/PUT)."""

from __future__ import annotations

import hashlib
import json
import threading
import xml.sax.saxutils as saxutils
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from kubetune_trainer import storage
from kubetune_trainer.errors import DataError, StorageError

pytestmark = pytest.mark.unit

ALPACA = {"instruction": "Say hi", "output": "hi"}


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """KUBETUNE_PVC_ROOT / KUBETUNE_WORK_DIR under tmp (what the operator's pod env sets)."""
    pvc, work = tmp_path / "pvc", tmp_path / "work"
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(pvc))
    monkeypatch.setenv("KUBETUNE_WORK_DIR", str(work))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return pvc, work


def _jsonl(path: Path, records=(ALPACA,)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- URI parsing

@pytest.mark.parametrize("uri,expected", [
    ("pvc://data/sub/train.jsonl", ("pvc", "data", "sub/train.jsonl", "", "")),
    ("pvc://data", ("pvc", "data", "", "", "")),
    ("s3://bucket/prefix/run/", ("s3", "bucket", "prefix/run", "", "")),
    ("hf://meta-llama/Llama-3.1-8B@main", ("hf", "meta-llama/Llama-3.1-8B", "", "main", "model")),
    ("hf://gpt2", ("hf", "gpt2", "", "", "model")),
    ("hf://datasets/org/set@v1/data/train.jsonl", ("hf", "org/set", "data/train.jsonl", "v1", "dataset")),
    ("hf://datasets/org/set/train.parquet", ("hf", "org/set", "train.parquet", "", "dataset")),
    ("file:///abs/train.jsonl", ("file", "", "/abs/train.jsonl", "", "")),
    ("relative/train.jsonl", ("local", "", "relative/train.jsonl", "", "")),
])
def test_parse_uri(uri, expected):
    u = storage.parse_uri(uri)
    assert (u.scheme, u.authority, u.path, u.revision, u.repo_type) == expected


@pytest.mark.parametrize("uri,fragment", [
    ("pvc://data/../etc/passwd", "'..' is not allowed"),
    ("s3://bucket/a/../../b", "'..' is not allowed"),
    ("pvc:///x", "expected pvc://claim/path"),
    ("s3:///key", "expected s3://bucket/prefix"),
    ("gs://bucket/x", "unsupported URI scheme 'gs'"),
    ("file://relative/x", "need an absolute path"),
    ("hf://", "expected hf://org/name"),
    ("  ", "empty URI"),
])
def test_bad_uris_are_rejected_with_a_clear_message(uri, fragment):
    with pytest.raises(StorageError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        storage.parse_uri(uri)


# ----------------------------------------------------------------------------- join_uri

@pytest.mark.parametrize("base,parts,expected", [
    ("s3://bucket", ("final", "model"), "s3://bucket/final/model"),
    ("s3://bucket/runs/demo/", ("checkpoints", "step-4"), "s3://bucket/runs/demo/checkpoints/step-4"),
    ("s3://bucket/runs//", ("/final/", "metrics.json"), "s3://bucket/runs/final/metrics.json"),
    ("pvc://outputs", ("run/final", "adapter"), "pvc://outputs/run/final/adapter"),
    ("pvc://outputs/run", ("", "final", ".", "merged/"), "pvc://outputs/run/final/merged"),
    ("pvc://outputs/run/", (), "pvc://outputs/run"),
    ("hf://datasets/org/set@v1", ("data", "train.jsonl"), "hf://datasets/org/set@v1/data/train.jsonl"),
    ("file:///srv/out/", ("final",), "file:///srv/out/final"),
    ("file:///", ("srv", "out"), "file:///srv/out"),
    ("file:///", (), "file:///"),
    ("/srv/out", ("a//b", "c"), "/srv/out/a/b/c"),
    ("/", ("srv",), "/srv"),
    ("/", ("",), "/"),
    ("relative/out/", ("final",), "relative/out/final"),
])
def test_join_uri(base, parts, expected):
    assert storage.join_uri(base, *parts) == expected


def test_joined_uris_parse_back_to_the_same_place(roots):
    pvc, _ = roots
    joined = storage.join_uri("pvc://outputs/run/", "checkpoints", "step-4")
    assert storage.local_path(joined) == pvc / "outputs" / "run" / "checkpoints" / "step-4"
    parsed = storage.parse_uri(storage.join_uri("s3://bucket/runs/", "final/model"))
    assert (parsed.authority, parsed.path) == ("bucket", "runs/final/model")
    parsed = storage.parse_uri(storage.join_uri("hf://datasets/org/set@v1/", "data/train.jsonl"))
    assert (parsed.authority, parsed.revision, parsed.path) == ("org/set", "v1", "data/train.jsonl")


@pytest.mark.parametrize("base,parts,fragment", [
    ("s3://bucket/run", ("..",), r"s3://bucket/run: cannot append '\.\.': '\.\.' is not allowed"),
    ("pvc://outputs/run", ("final", "../../etc"), r"cannot append '\.\./\.\./etc': '\.\.' is not allowed"),
    ("/srv/out", ("a/../b",), r"cannot append 'a/\.\./b'"),
    ("file:///srv", ("..",), r"'\.\.' is not allowed in a URI path"),
    ("s3://", ("x",), "expected s3://bucket/prefix"),
    ("pvc:///x", ("y",), "expected pvc://claim/path"),
    ("gs://bucket", ("x",), "unsupported URI scheme 'gs'"),
    ("", ("x",), "empty URI"),
    ("s3://bucket", (7,), "path parts must be strings"),
])
def test_join_uri_refuses_escapes_and_bad_bases(base, parts, fragment):
    with pytest.raises(StorageError, match=fragment):
        storage.join_uri(base, *parts)


def test_one_module_owns_uris():
    """The URI helpers live in storage only: no second join_uri, no locations wrapper module."""
    import importlib.util

    from kubetune_trainer import recipe

    assert importlib.util.find_spec("kubetune_trainer.locations") is None
    assert recipe.join_uri is storage.join_uri


# ----------------------------------------------------------------------------- pvc / local

def test_pvc_and_local_paths_resolve(roots, tmp_path):
    pvc, _ = roots
    data = _jsonl(pvc / "data" / "sets" / "train.jsonl")
    assert storage.local_path("pvc://data/sets/train.jsonl") == data
    assert storage.fetch_dataset("pvc://data/sets/train.jsonl") == data
    assert storage.fetch_dataset("pvc://data/sets") == data  # a directory holding exactly one data file
    assert storage.fetch_dataset(f"file://{data}") == data
    assert storage.fetch_dataset(str(data)) == data
    model = pvc / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert storage.fetch_model("pvc://models/tiny") == model
    assert storage.fetch_model(f"file://{model}/") == model
    assert storage.output_dir("pvc://outputs/run") == pvc / "outputs" / "run"
    assert (pvc / "outputs" / "run").is_dir()
    assert storage.output_dir(storage.join_uri("pvc://outputs/", "run2")) == pvc / "outputs" / "run2"


def test_dataset_through_the_loader_resolves_pvc_uris(roots):
    from kubetune_trainer.data import load_examples

    pvc, _ = roots
    _jsonl(pvc / "data" / "train.jsonl", [ALPACA, ALPACA])
    examples = load_examples("pvc://data/train.jsonl")
    assert len(examples) == 2 and examples[1].line == 2
    assert "pvc://data/train.jsonl" in examples[0].source  # messages name the URI the user wrote


def test_missing_and_ambiguous_local_data_fail_with_data_errors(roots):
    pvc, _ = roots
    with pytest.raises(DataError, match="dataset file not found"):
        storage.fetch_dataset("pvc://data/none.jsonl")
    _jsonl(pvc / "two" / "a.jsonl")
    _jsonl(pvc / "two" / "b.parquet")
    (pvc / "two" / "README.md").write_text("not data")
    with pytest.raises(DataError, match=r"exactly one .* found 2 \(a.jsonl, b.parquet\)"):
        storage.fetch_dataset("pvc://two")
    with pytest.raises(StorageError, match="no config.json"):
        storage.fetch_model("pvc://two")
    with pytest.raises(StorageError, match="does not exist"):
        storage.fetch_model("pvc://models/absent")


def test_upload_to_a_local_uri_copies_and_is_a_noop_in_place(roots, tmp_path):
    pvc, _ = roots
    src = tmp_path / "staging"
    (src / "final").mkdir(parents=True)
    (src / "final" / "metrics.json").write_text("{}")
    assert storage.upload_dir(src, "pvc://outputs/copy") == 1
    assert (pvc / "outputs" / "copy" / "final" / "metrics.json").read_text() == "{}"
    assert storage.upload_dir(pvc / "outputs" / "copy", "pvc://outputs/copy") == 1


# ----------------------------------------------------------------------------- Hugging Face hub (offline cache)

SHA = "0123456789abcdef0123456789abcdef01234567"


def _hub_repo(cache: Path, kind: str, repo: str, files: dict[str, str], ref: str = "main") -> Path:
    """A repo in the hub cache layout: <kind>s--org--name/refs/<ref> + snapshots/<sha>/files."""
    folder = cache / f"{kind}s--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(SHA)
    snap = folder / "snapshots" / SHA
    for name, content in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(content)
    return snap


@pytest.fixture
def offline_hub(roots, monkeypatch):
    """HF_HUB_OFFLINE=1 as the pod would start with it (the hub library reads it at import, so set both)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, work = roots
    return work / "hf" / "hub"  # the default cache: $KUBETUNE_WORK_DIR/hf/hub


def test_hf_model_and_dataset_from_offline_cache(offline_hub):
    snap = _hub_repo(offline_hub, "model", "org/tiny", {"config.json": "{}", "tokenizer.json": "{}"})
    assert storage.fetch_model("hf://org/tiny") == snap
    assert storage.fetch_model(f"hf://org/tiny@{SHA}") == snap
    assert storage.fetch_model("hf://org/tiny@main") == snap
    data_snap = _hub_repo(offline_hub, "dataset", "org/set", {"data/train.jsonl": json.dumps(ALPACA) + "\n",
                                                             "README.md": "card"})
    assert storage.fetch_dataset("hf://datasets/org/set/data/train.jsonl") == data_snap / "data" / "train.jsonl"
    assert storage.fetch_dataset("hf://datasets/org/set") == data_snap / "data" / "train.jsonl"

    from kubetune_trainer.data import load_examples

    assert load_examples("hf://datasets/org/set/data/train.jsonl")[0].to_dict()["messages"][1]["content"] == "hi"


def test_hf_cache_dir_override_and_errors(offline_hub, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    snap = _hub_repo(other, "model", "org/tiny", {"config.json": "{}"})
    assert storage.fetch_model("hf://org/tiny") == snap
    with pytest.raises(StorageError) as err:
        storage.fetch_model("hf://org/not-cached")
    message = str(err.value)
    assert message.startswith("hf://org/not-cached: cannot fetch from Hugging Face")
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(DataError, match="must start with hf://datasets/"):
        storage.fetch_dataset("hf://org/tiny/train.jsonl")
    with pytest.raises(StorageError, match="names a repo, not a file"):
        storage.fetch_dir("hf://datasets/org/set/train.jsonl")


# ----------------------------------------------------------------------------- S3 (real MinIO client, local server)

class LocalS3:
    """A minimal path-style S3 endpoint: ListObjectsV2, HEAD/GET/PUT object; bucket 'locked' answers 403."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, bucket: str, key: str, data: bytes | str) -> None:
        self.objects[(bucket, key)] = data.encode() if isinstance(data, str) else data

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        s3 = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _target(self) -> tuple[str, str, dict]:
                url = urlparse(self.path)
                bucket, _, key = unquote(url.path).lstrip("/").partition("/")
                s3.requests.append(f"{self.command} {url.path}")
                return bucket, key, parse_qs(url.query, keep_blank_values=True)

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)) if not head else (headers or {}).get(
                    "X-Length", "0"))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _error(self, code: int, s3code: str, bucket: str, key: str, head: bool = False) -> None:
                body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{s3code}</Code>"
                        f"<Message>{s3code} from the test server</Message><Resource>/{bucket}/{key}</Resource>"
                        f"<RequestId>1</RequestId><HostId>local</HostId></Error>").encode()
                self._send(code, b"" if head else body, {"Content-Type": "application/xml"})

            def _object_headers(self, data: bytes) -> dict:
                return {"ETag": f'"{hashlib.md5(data).hexdigest()}"', "Content-Type": "application/octet-stream",
                        "Last-Modified": formatdate(0, usegmt=True)}

            def do_GET(self) -> None:  # noqa: N802
                bucket, key, query = self._target()
                if bucket == "locked":
                    return self._error(403, "AccessDenied", bucket, key)
                if not key and "location" in query:
                    return self._send(200, b'<?xml version="1.0"?><LocationConstraint '
                                           b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>')
                if not key:
                    prefix = query.get("prefix", [""])[0]
                    keys = sorted(k for b, k in s3.objects if b == bucket and k.startswith(prefix))
                    contents = "".join(
                        f"<Contents><Key>{saxutils.escape(k)}</Key><LastModified>2024-01-01T00:00:00.000Z"
                        f"</LastModified><ETag>&quot;x&quot;</ETag><Size>{len(s3.objects[(bucket, k)])}</Size>"
                        f"<StorageClass>STANDARD</StorageClass></Contents>" for k in keys)
                    body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                            f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{bucket}</Name>'
                            f"<Prefix>{saxutils.escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
                            f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>")
                    return self._send(200, body.encode(), {"Content-Type": "application/xml"})
                data = s3.objects.get((bucket, key))
                if data is None:
                    return self._error(404, "NoSuchKey", bucket, key)
                self._send(200, data, self._object_headers(data))

            def do_HEAD(self) -> None:  # noqa: N802
                bucket, key, _ = self._target()
                data = s3.objects.get((bucket, key))
                if data is None:
                    return self._error(404, "NoSuchKey", bucket, key, head=True)
                self._send(200, headers={**self._object_headers(data), "X-Length": str(len(data))}, head=True)

            def do_PUT(self) -> None:  # noqa: N802
                bucket, key, _ = self._target()
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if bucket == "locked":
                    return self._error(403, "AccessDenied", bucket, key)
                s3.objects[(bucket, key)] = data
                self._send(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

            def log_message(self, *args) -> None:
                return

        return Handler


@pytest.fixture
def s3(roots, monkeypatch):
    pytest.importorskip("minio")
    server = LocalS3()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield server
    server.close()


def test_s3_dataset_file_and_prefix_download(s3, roots):
    _, work = roots
    line = json.dumps(ALPACA) + "\n"
    s3.put("bucket", "sets/a/train.jsonl", line * 3)
    s3.put("bucket", "sets/b/README.md", "card")
    s3.put("bucket", "sets/b/data/train.parquet", b"PAR1")
    path = storage.fetch_dataset("s3://bucket/sets/a/train.jsonl")
    assert path == work / "s3" / "bucket" / "sets" / "a" / "train.jsonl" and path.read_text() == line * 3
    prefix = storage.fetch_dataset("s3://bucket/sets/b")
    assert prefix == work / "s3" / "bucket" / "sets" / "b" / "data" / "train.parquet"
    assert prefix.read_bytes() == b"PAR1" and (prefix.parent.parent / "README.md").read_text() == "card"

    from kubetune_trainer.data import load_examples

    assert len(load_examples("s3://bucket/sets/a/train.jsonl")) == 3


def test_s3_model_download(s3, roots):
    s3.put("models", "tiny/config.json", "{}")
    s3.put("models", "tiny/sub/tokenizer.json", '{"t": 1}')
    s3.put("models", "tiny-other/config.json", "{}")  # shares the prefix string, not the directory
    local = storage.fetch_model("s3://models/tiny")
    assert (local / "config.json").is_file() and (local / "sub" / "tokenizer.json").read_text() == '{"t": 1}'
    assert not (local.parent / "tiny-other").exists()


def test_s3_outputs_stage_locally_and_upload(s3, roots):
    _, work = roots
    staging = storage.output_dir("s3://outputs/runs/demo")
    assert staging == work / "outputs" / "outputs" / "runs" / "demo" and staging.is_dir()
    (staging / "final" / "adapter").mkdir(parents=True)
    (staging / "final" / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (staging / "final" / "metrics.json").write_text("{}")
    assert storage.upload_dir(staging, "s3://outputs/runs/demo") == 2
    assert s3.objects[("outputs", "runs/demo/final/adapter/adapter_config.json")] == b'{"r": 8}'
    assert ("outputs", "runs/demo/final/metrics.json") in s3.objects


def test_s3_errors_name_the_uri_and_the_s3_code(s3, roots, tmp_path):
    with pytest.raises(DataError) as err:
        storage.fetch_dataset("s3://bucket/missing.jsonl")
    assert "s3://bucket/missing.jsonl" in str(err.value) and "no objects under this prefix" in str(err.value)
    with pytest.raises(DataError) as err:
        storage.fetch_dataset("s3://locked/data")
    assert "cannot list objects: AccessDenied" in str(err.value) and "s3://locked/data" in str(err.value)
    src = tmp_path / "up"
    src.mkdir()
    (src / "f.txt").write_text("x")
    with pytest.raises(StorageError, match=r"s3://locked/run/f.txt: cannot upload: AccessDenied"):
        storage.upload_dir(src, "s3://locked/run")


@pytest.mark.parametrize("endpoint,fragment", [("http://host:9000/some/path", "a path after the host"),
                                               ("http://", "has no host")])
def test_s3_endpoint_validation(monkeypatch, endpoint, fragment):
    pytest.importorskip("minio")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(StorageError, match=fragment):
        storage.s3_client()
