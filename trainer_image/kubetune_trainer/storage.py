"""Every URI the trainer touches, in one module: parse, join, resolve to a local path, fetch models and
datasets, stage and publish outputs.

Schemes (docs/contracts.md §1, §3):

- ``pvc://claim/path``  -> ``$KUBETUNE_PVC_ROOT/claim/path`` (default root ``/mnt/pvc``)
- ``file:///abs/path`` and plain paths -> local files
- ``hf://org/name[@rev]`` -> model snapshot via ``huggingface_hub.snapshot_download``;
  ``hf://datasets/org/name[@rev]/path/file.jsonl`` -> one dataset file (or the single data file of
  the repo when no path is given). Token from ``HF_TOKEN``; cache ``$KUBETUNE_WORK_DIR/hf/hub``
  (or ``$HF_HUB_CACHE``); ``HF_HUB_OFFLINE=1`` serves from that cache only.
- ``s3://bucket/key`` -> objects downloaded under ``$KUBETUNE_WORK_DIR/s3/bucket/key`` with the
  MinIO client; endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (default AWS),
  credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Models come from `fetch_model(uri)`, datasets from `fetch_dataset(uri)`. Outputs are written to
`output_dir(uri)` (the PVC/local directory itself, or a staging directory for S3) and published with
`upload_dir(local_dir, uri)` (nothing to copy when that directory is already the destination).
`join_uri(uri, *parts)` builds the URIs of artifacts under an output URI.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from .errors import DataError, StorageError

DEFAULT_PVC_ROOT = "/mnt/pvc"
DEFAULT_WORK_DIR = "/var/lib/kubetune"
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")
HF_MODEL_IGNORE = ["*.pth", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "original/*", "onnx/*"]
SCHEMES = ("pvc", "file", "hf", "s3")


@dataclass(frozen=True)
class Uri:
    """A parsed location: scheme plus scheme-specific parts."""

    scheme: str          # pvc | file | hf | s3 | local
    authority: str = ""  # pvc claim, s3 bucket, hf repo id
    path: str = ""       # path inside claim / key prefix / file inside the hf repo
    revision: str = ""   # hf revision
    repo_type: str = ""  # hf: model | dataset
    raw: str = ""


def pvc_root() -> Path:
    """Where PVCs are mounted (`KUBETUNE_PVC_ROOT`)."""
    return Path(os.environ.get("KUBETUNE_PVC_ROOT") or DEFAULT_PVC_ROOT)


def work_dir() -> Path:
    """Scratch directory (`KUBETUNE_WORK_DIR`)."""
    return Path(os.environ.get("KUBETUNE_WORK_DIR") or DEFAULT_WORK_DIR)


def hf_cache_dir() -> Path:
    """Hugging Face hub cache: `$HF_HUB_CACHE`, else `$KUBETUNE_WORK_DIR/hf/hub`."""
    return Path(os.environ.get("HF_HUB_CACHE") or work_dir() / "hf" / "hub")


def _clean_relative(path: str, raw: str) -> str:
    parts = [p for p in PurePosixPath(path).parts if p not in ("", "/", ".")]
    if ".." in parts:
        raise StorageError(f"{raw}: '..' is not allowed in a URI path", reason="InvalidPlan")
    return "/".join(parts)


def parse_uri(uri: str) -> Uri:
    """Parse a kubetune URI (pvc://, file://, hf://, s3://) or a plain local path."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError("empty URI", reason="InvalidPlan")
    text = uri.strip()
    if "://" not in text:
        return Uri("local", path=text, raw=uri)
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        parsed = urlparse(text)
        path = parsed.path
        if parsed.netloc not in ("", "localhost") or not path.startswith("/"):
            raise StorageError(f"{uri}: file:// URIs need an absolute path (file:///abs/path)", reason="InvalidPlan")
        return Uri("file", path=path, raw=uri)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not claim:
            raise StorageError(f"{uri}: expected pvc://claim/path", reason="InvalidPlan")
        return Uri("pvc", authority=claim, path=_clean_relative(path, uri), raw=uri)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: expected s3://bucket/prefix", reason="InvalidPlan")
        return Uri("s3", authority=bucket, path=_clean_relative(key, uri), raw=uri)
    if scheme == "hf":
        return _parse_hf(rest, uri)
    raise StorageError(f"{uri}: unsupported URI scheme {scheme!r}; expected one of {', '.join(SCHEMES)}",
                       reason="InvalidPlan")


def _parse_hf(rest: str, raw: str) -> Uri:
    parts = [p for p in rest.split("/") if p]
    repo_type = "model"
    if parts and parts[0] in ("datasets", "models"):
        repo_type = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:]
    if not parts:
        raise StorageError(f"{raw}: expected hf://org/name[@rev] or hf://datasets/org/name[@rev]/file",
                           reason="InvalidPlan")
    # The revision is attached to the repo name: org/name@rev or name@rev.
    repo_parts: list[str] = []
    revision = ""
    for index, part in enumerate(parts):
        repo_parts.append(part)
        if "@" in part:
            name, revision = part.split("@", 1)
            repo_parts[-1] = name
            file_parts = parts[index + 1:]
            break
        if len(repo_parts) == 2:
            file_parts = parts[index + 1:]
            break
    else:
        file_parts = []
    if not repo_parts[-1]:
        raise StorageError(f"{raw}: empty Hugging Face repo name", reason="InvalidPlan")
    return Uri("hf", authority="/".join(repo_parts), path="/".join(file_parts), revision=revision,
               repo_type=repo_type, raw=raw)


def local_path(uri: str) -> Path | None:
    """The local filesystem path for pvc://, file:// and plain paths; None for remote schemes."""
    parsed = parse_uri(uri)
    if parsed.scheme == "local":
        return Path(parsed.path)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "pvc":
        return pvc_root() / parsed.authority / parsed.path
    return None


def join_uri(uri: str, *parts: str) -> str:
    """`uri` (any scheme or a plain path) with `parts` appended as path segments, '/'-separated.

    Trailing slashes on `uri`, empty parts and '.' segments are dropped, so the result never holds a
    doubled slash; a '..' segment is refused (StorageError), so a joined URI never leaves `uri`.
    """
    parsed = parse_uri(uri)  # refuses empty URIs, unknown schemes, pvc:// and s3:// without claim/bucket
    segments: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise StorageError(f"{uri}: cannot append {part!r}: path parts must be strings")
        if ".." in part.split("/"):
            raise StorageError(f"{uri}: cannot append {part!r}: '..' is not allowed in a URI path",
                               reason="InvalidPlan")
        cleaned = _clean_relative(part, uri)
        if cleaned:
            segments.append(cleaned)
    if parsed.scheme == "file" and not parsed.path.strip("/"):
        head = "file://"  # file:/// is the root: its last slash is the path
    else:
        head = uri.strip().rstrip("/")
    if not segments:
        return head + "/" if head in ("", "file://") else head  # "/" and file:/// stay roots
    return "/".join([head, *segments])


# --------------------------------------------------------------------------- Hugging Face

def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _hf_error(uri: Uri, exc: Exception) -> StorageError:
    hint = ""
    name = type(exc).__name__
    if name in ("GatedRepoError", "RepositoryNotFoundError") or "401" in str(exc):
        hint = " (private or gated repo: set spec.secrets.hfTokenSecretRef so HF_TOKEN is available)"
    elif name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        hint = " (not in the local cache and the hub cannot be reached or HF_HUB_OFFLINE is set)"
    return StorageError(f"{uri.raw}: cannot fetch from Hugging Face: {name}: {exc}{hint}")


def _hf_snapshot(uri: Uri, ignore_patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=uri.authority, repo_type=uri.repo_type, revision=uri.revision or None,
                                      token=_hf_token(), cache_dir=str(hf_cache_dir()),
                                      ignore_patterns=ignore_patterns))
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot fetch"
        raise _hf_error(uri, exc) from exc


def _hf_file(uri: Uri) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=uri.authority, filename=uri.path, repo_type=uri.repo_type,
                                    revision=uri.revision or None, token=_hf_token(), cache_dir=str(hf_cache_dir())))
    except Exception as exc:
        raise _hf_error(uri, exc) from exc


# --------------------------------------------------------------------------- S3

def s3_client():
    """A MinIO client configured from the AWS_* environment variables."""
    from minio import Minio

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    parsed = urlparse(endpoint)
    if not parsed.hostname:
        raise StorageError(f"AWS_ENDPOINT_URL {endpoint!r} has no host")
    if parsed.path not in ("", "/"):
        raise StorageError(f"AWS_ENDPOINT_URL {endpoint!r}: a path after the host is not supported")
    host = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
    if ":" in (parsed.hostname or "") and parsed.port is None:  # bare IPv6 literal
        host = f"[{parsed.hostname}]"
    elif ":" in (parsed.hostname or ""):
        host = f"[{parsed.hostname}]:{parsed.port}"
    return Minio(
        host,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
    )


def _s3_error(uri: Uri, exc: Exception, action: str) -> StorageError:
    code = getattr(exc, "code", "") or type(exc).__name__
    message = getattr(exc, "message", "") or str(exc)
    return StorageError(f"s3://{uri.authority}/{uri.path}: cannot {action}: {code}: {message}")


def _s3_objects(client, uri: Uri) -> dict[str, int]:
    """Key -> size of the objects under the prefix, sorted by key."""
    prefix = uri.path.rstrip("/") + "/" if uri.path else ""
    try:
        return {obj.object_name: int(obj.size or 0) for obj in sorted(
            client.list_objects(uri.authority, prefix=prefix, recursive=True), key=lambda o: o.object_name)
            if not obj.is_dir}
    except Exception as exc:
        raise _s3_error(uri, exc, "list objects") from exc


def _s3_download_dir(uri: Uri, target: Path | None = None, *, resume: bool = False) -> Path:
    """Download every object under the prefix into `target`. With `resume`, a file already there at the listed
    size is kept (the client writes each file under a temporary name and renames it when complete, so a file
    of that name is whole): the cache's interrupted fills, whose directory is keyed by the listing itself."""
    client = s3_client()
    objects = _s3_objects(client, uri)
    if not objects:
        raise StorageError(f"{uri.raw}: no objects under this prefix")
    target = target if target is not None else work_dir() / "s3" / uri.authority / uri.path
    prefix = uri.path.rstrip("/") + "/" if uri.path else ""
    for key, size in objects.items():
        dest = target / _clean_relative(key[len(prefix):], uri.raw)
        if resume and dest.is_file() and dest.stat().st_size == size:
            continue
        _s3_get(client, uri, key, dest)
    return target


def _s3_get(client, uri: Uri, key: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.fget_object(uri.authority, key, str(dest))
    except Exception as exc:
        raise _s3_error(Uri("s3", uri.authority, key, raw=uri.raw), exc, "download") from exc
    return dest


def _s3_object_exists(client, uri: Uri) -> bool:
    try:
        client.stat_object(uri.authority, uri.path)
        return True
    except Exception as exc:
        if getattr(exc, "code", "") in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return False
        raise _s3_error(uri, exc, "stat object") from exc


# --------------------------------------------------------------------------- public API

def fetch_dir(uri: str) -> Path:
    """Make the directory at `uri` available locally (models, checkpoints); returns its local path."""
    parsed = parse_uri(uri)
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise StorageError(f"{uri}: directory {path} does not exist")
        return path
    if parsed.scheme == "hf":
        if parsed.path:
            raise StorageError(f"{uri}: a model URI names a repo, not a file inside it")
        return _hf_snapshot(parsed, HF_MODEL_IGNORE if parsed.repo_type == "model" else None)
    return _s3_download_dir(parsed)


def fetch_model(uri: str) -> Path:
    """Local directory holding the model (config.json, weights, tokenizer): the shared cache's copy when the job's
    preflight put it there (kubetune_trainer.cache), else fetched."""
    from .cache_volume import lookup

    path = lookup("models", uri) or fetch_dir(uri)
    if not (path / "config.json").is_file():
        raise StorageError(f"{uri}: no config.json in {path}; not a transformers model directory")
    return path


def _single_data_file(directory: Path, uri: str) -> Path:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if len(files) != 1:
        names = ", ".join(str(p.relative_to(directory)) for p in files[:10]) or "none"
        raise DataError(f"expected exactly one .jsonl/.json/.parquet file, found {len(files)} ({names}); "
                        "name the file in the URI", path=uri)
    return files[0]


def fetch_dataset(uri: str) -> Path:
    """Local path of a dataset file (a directory or prefix must hold exactly one data file): the shared cache's
    copy when the job's preflight put it there, else fetched."""
    from .cache_volume import lookup

    cached = lookup("datasets", uri)
    if cached is not None:
        return cached
    try:
        parsed = parse_uri(uri)
        path = local_path(uri)
        if path is not None:
            if path.is_dir():
                return _single_data_file(path, uri)
            if not path.is_file():
                raise DataError(f"dataset file not found (looked at {path})", path=uri)
            return path
        if parsed.scheme == "hf":
            if parsed.repo_type != "dataset":
                raise DataError("a Hugging Face dataset URI must start with hf://datasets/", path=uri)
            if parsed.path:
                return _hf_file(parsed)
            return _single_data_file(_hf_snapshot(parsed), uri)
        client = s3_client()
        if parsed.path and parsed.path.lower().endswith(DATA_SUFFIXES) and _s3_object_exists(client, parsed):
            return _s3_get(client, parsed, parsed.path, work_dir() / "s3" / parsed.authority / parsed.path)
        return _single_data_file(_s3_download_dir(parsed), uri)
    except StorageError as exc:
        raise DataError(f"cannot fetch dataset: {exc}", path=uri) from exc


def output_dir(uri: str) -> Path:
    """Directory to write outputs into: the PVC/local path itself, or a staging dir for s3:// outputs."""
    parsed = parse_uri(uri)
    path = local_path(uri)
    if path is None:
        if parsed.scheme != "s3":
            raise StorageError(f"{uri}: outputs can go to pvc://, file://, a local path or s3://, "
                               f"not {parsed.scheme}://", reason="InvalidPlan")
        path = work_dir() / "outputs" / parsed.authority / parsed.path
    path.mkdir(parents=True, exist_ok=True)
    return path


def upload_dir(local_dir: str | Path, uri: str) -> int:
    """Publish every file under `local_dir` to `uri` (s3 upload or pvc/local copy); returns the file count."""
    source = Path(local_dir)
    if not source.is_dir():
        raise StorageError(f"cannot upload {source}: not a directory")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    parsed = parse_uri(uri)
    path = local_path(uri)
    if path is not None:
        if path.resolve() == source.resolve():
            return len(files)
        path.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, path, dirs_exist_ok=True)
        return len(files)
    if parsed.scheme != "s3":
        raise StorageError(f"{uri}: uploading to {parsed.scheme}:// is not supported", reason="InvalidPlan")
    client = s3_client()
    for file in files:
        key = "/".join(p for p in (parsed.path, file.relative_to(source).as_posix()) if p)
        try:
            client.fput_object(parsed.authority, key, str(file))
        except Exception as exc:
            raise _s3_error(Uri("s3", parsed.authority, key, raw=uri), exc, "upload") from exc
    return len(files)
