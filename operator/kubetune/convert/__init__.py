"""`kubetune convert`: other trainers' configs (Axolotl, TRL / transformers, LLaMA-Factory) -> a FineTuneJob.

One module per source format fills a `Draft`; whatever it cannot express is listed by key with the reason
(`Draft.dropped`), never skipped silently. Optimizer names are translated to the canonical spelling here
(kubetune.api.OPTIMIZER_ALIASES), so the FineTuneJob written is what the apiserver stores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from . import axolotl, llamafactory, trl
from .draft import ConvertError, Draft, Dropped, Options

FORMATS = {"axolotl": axolotl, "trl": trl, "llamafactory": llamafactory}


def detect(config: dict[str, Any]) -> str:
    """Guess the source format from characteristic keys."""
    if "base_model" in config or "datasets" in config or "adapter" in config:
        return "axolotl"
    if "stage" in config or "finetuning_type" in config or "cutoff_len" in config:
        return "llamafactory"
    if "model_name_or_path" in config or "per_device_train_batch_size" in config or "output_dir" in config:
        return "trl"
    raise ConvertError("cannot tell the config's format (no base_model/datasets as in Axolotl, stage/"
                       "finetuning_type as in LLaMA-Factory, or model_name_or_path as in TRL); pass --from")


def load(text: str, name: str = "") -> dict[str, Any]:
    """Parse a JSON or YAML config into a mapping."""
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConvertError(f"{name or 'input'} is not valid {'JSON' if name.endswith('.json') else 'YAML'}: "
                           f"{exc}") from exc
    if not isinstance(data, dict):
        raise ConvertError(f"{name or 'input'}: expected a mapping of settings at the top level")
    return data


def convert(config: dict[str, Any], options: Options = Options(), source: str = "") -> Draft:
    """Convert a parsed config; `source` is axolotl | trl | llamafactory (detected when empty)."""
    source = source or detect(config)
    if source not in FORMATS:
        raise ConvertError(f"unknown source format {source!r}; expected one of {', '.join(FORMATS)}")
    module = FORMATS[source]
    draft = Draft(module.SOURCE, options)
    module.convert({k: v for k, v in config.items() if v is not None}, draft)  # null = unset, as in the sources
    draft.manifest()  # validates: a ConvertError here names what is missing
    return draft


def convert_file(path: str | Path, options: Options = Options(), source: str = "") -> Draft:
    """Convert a config file; the job is named after the file unless options.name is given."""
    p = Path(path)
    config = load(p.read_text(encoding="utf-8"), p.name)
    if not options.name:
        options = Options(**{**options.__dict__, "name": p.stem})
    return convert(config, options, source)


__all__ = ["ConvertError", "Draft", "Dropped", "FORMATS", "Options", "convert", "convert_file", "detect", "load"]
