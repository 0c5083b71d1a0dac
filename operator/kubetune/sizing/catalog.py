"""The built-in model catalog (YAML data in `catalog/`) and model resolution from a FineTuneJob spec."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from kubetune.api import ModelSource

from .architecture import Architecture, ArchitectureError, apply_hints, architecture_from_config

CATALOG_DIR = Path(__file__).parent / "catalog"

# Suffixes that name a fine-tuned variant with the same architecture as its base model.
_VARIANT_SUFFIXES = ("-instruct", "-chat", "-it", "-hf", "-base")


@functools.lru_cache(maxsize=1)
def load_catalog() -> dict[str, Architecture]:
    """All catalog models by canonical name (lowercase), read from the YAML files."""
    models: dict[str, Architecture] = {}
    for path in sorted(CATALOG_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        common = doc.get("common") or {}
        for entry in doc["models"]:
            cfg = {**common, **entry.get("config", {})}
            targets = tuple(entry.get("loraDefaultTargets") or doc.get("loraDefaultTargets") or ())
            arch = architecture_from_config(cfg, name=entry["name"], source="catalog",
                                            lora_default_targets=targets or None)
            models[entry["name"].lower()] = arch
    return models


@functools.lru_cache(maxsize=1)
def _alias_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for path in sorted(CATALOG_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for entry in doc["models"]:
            name = entry["name"].lower()
            for key in [name, *entry.get("aliases", [])]:
                index[key.lower()] = name
                index[normalize_model_name(key)] = name
    return index


def normalize_model_name(name: str) -> str:
    """Canonical catalog key for a repo or model name: `Qwen/Qwen2.5-7B-Instruct` -> `qwen2.5-7b`."""
    n = name.strip().lower().rstrip("/")
    n = n.split("/")[-1]
    n = re.sub(r"^meta-(?=llama)", "", n)
    changed = True
    while changed:
        changed = False
        for suffix in _VARIANT_SUFFIXES:
            if suffix in n:
                # strip "-instruct" both at the end and before a version tag ("-instruct-v0.3")
                n2 = re.sub(re.escape(suffix) + r"(?=$|-v\d)", "", n)
                if n2 != n:
                    n, changed = n2, True
    return n


def catalog_names() -> list[str]:
    """Canonical names of all catalog models."""
    return sorted(load_catalog())


def lookup_catalog(name: str) -> Architecture | None:
    """Catalog architecture for a name, alias, repo id or URI; None when unknown."""
    key = name.strip()
    for scheme in ("hf://", "pvc://", "s3://"):
        if key.lower().startswith(scheme):
            key = key[len(scheme):]
    key = key.split("@", 1)[0]  # drop @revision
    index = _alias_index()
    candidates = [key.lower(), key.lower().rstrip("/").split("/")[-1], normalize_model_name(key)]
    # pvc://claim/path/llama-3.1-8b: the last path component names the model
    for cand in candidates:
        if cand in index:
            return load_catalog()[index[cand]]
    return None


def resolve_architecture(model: ModelSource | Mapping[str, Any], config: Mapping[str, Any] | None = None
                         ) -> Architecture:
    """Architecture for `spec.model`: a given config.json dict, else the catalog by URI; inline hints win.

    `model` is the typed spec.model (a camelCase dict is validated into one). Raises ArchitectureError
    with a message that says what to add when nothing matches.
    """
    if not isinstance(model, ModelSource):
        model = ModelSource.model_validate(dict(model))
    uri = model.uri
    hints = model.architecture.dump() if model.architecture is not None else {}
    name = uri.split("@", 1)[0]
    base: Architecture | None = None
    if config:
        base = architecture_from_config(config, name=name or "config.json", source="config")
    elif uri:
        base = lookup_catalog(uri)
    try:
        return apply_hints(base, hints, name=base.name if base else name)
    except ArchitectureError as exc:
        if base is None and str(exc) == "no architecture":
            raise ArchitectureError(
                f"model {uri or '(no uri)'} is not in the sizing catalog and no architecture was given: "
                "set spec.model.architecture (family, hiddenSize, intermediateSize, numHiddenLayers, "
                "numAttentionHeads, numKeyValueHeads, vocabSize) or use a catalog model "
                f"({', '.join(catalog_names())})"
            ) from None
        raise
