"""Where the recipe reads the model and writes outputs: thin wrappers over `kubetune_trainer.storage`."""

from __future__ import annotations

import os
from pathlib import Path


def _pvc_root() -> Path:
    return Path(os.environ.get("KUBETUNE_PVC_ROOT") or "/mnt/pvc")


def _local(uri: str) -> Path | None:
    """Local path for pvc://, file:// and plain paths; None for remote schemes."""
    if uri.startswith("pvc://"):
        return _pvc_root() / uri[len("pvc://"):].strip("/")
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri:
        return Path(uri)
    return None


def resolve_model(uri: str) -> Path:
    """A local directory holding the model's config, weights and tokenizer."""
    local = _local(uri)
    if local is not None:
        return local
    from kubetune_trainer import storage

    return Path(storage.fetch_model(uri))


def local_output_dir(uri: str) -> Path:
    """The local directory outputs are written to (the PVC path itself, or a scratch dir for s3)."""
    local = _local(uri)
    if local is None:
        from kubetune_trainer import storage

        local = Path(storage.local_output_dir(uri))
    local.mkdir(parents=True, exist_ok=True)
    return local


def publish_outputs(local_dir: Path, uri: str) -> None:
    """Place the outputs at `uri` (no-op when `uri` is local; upload for s3)."""
    if _local(uri) is not None:
        return
    from kubetune_trainer import storage

    storage.upload_outputs(local_dir, uri)
