"""Where the recipe reads the model and writes outputs: thin wrappers over `kubetune_trainer.storage`."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer import storage


def _local(uri: str) -> Path | None:
    """Local path for pvc://, file:// and plain paths; None for remote schemes (same rules as storage)."""
    return storage.local_path(uri)


def resolve_model(uri: str) -> Path:
    """A local directory holding the model's config, weights and tokenizer."""
    local = _local(uri)
    if local is not None:
        return local
    return Path(storage.fetch_model(uri))


def local_output_dir(uri: str) -> Path:
    """The local directory outputs are written to (the PVC path itself, or a scratch dir for s3)."""
    return Path(storage.output_dir(uri))


def publish_outputs(local_dir: Path, uri: str) -> None:
    """Place the outputs at `uri` (no-op when `uri` is local; upload for s3)."""
    if _local(uri) is not None:
        return
    storage.upload_dir(local_dir, uri)
