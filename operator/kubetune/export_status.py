"""The trainer's `export` block (GGUF + Modelfile, termination summary) → the Exported condition. Pure.

A failed export (e.g. a model family the GGUF converter does not support) never changes the phase: the adapter and
merged weights were exported before it, so the job stays Succeeded and Exported is False with the reason."""

from __future__ import annotations

from typing import Any

from kubetune import reasons as R


def export_verdict(block: dict[str, Any]) -> tuple[bool, str, str]:
    """(Exported, reason, message) for the condition and the Event."""
    if block.get("error"):
        return False, R.EXPORT_FAILED, (f"GGUF export failed: {block['error']}; the adapter and merged weights are "
                                        "exported and the phase stays Succeeded")[:4096]
    return True, R.EXPORT_COMPLETED, (f"GGUF {block.get('type', '')} written ({block.get('architecture', '')}, "
                                      f"{block.get('tensors', '?')} tensors)")
