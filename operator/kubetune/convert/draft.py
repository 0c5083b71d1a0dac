"""The converter's working state: a FineTuneJob spec being filled in and the settings it could not express.

A source-format module (axolotl, trl, llamafactory) walks every key of the input, either setting spec fields
(`Draft.set`) or recording why the key has no FineTuneJob equivalent (`Draft.drop`); nothing is skipped silently.
`Draft.manifest()` gives the FineTuneJob, validated by the typed spec model (kubetune.api), and `render()` the YAML
with the unexpressed settings listed as a header comment.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import yaml

from kubetune import API_GROUP, API_VERSION, KIND
from pydantic import BaseModel

from kubetune.api import CHAT_TEMPLATE_NAMES, OPTIMIZER_ALIASES, OPTIMIZERS, FineTuneJobSpec, parse_spec

NAME_MAX = 52  # the CRD's bound on metadata.name
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


class ConvertError(ValueError):
    """The input cannot become a FineTuneJob without more information (the message says which option gives it)."""


@dataclasses.dataclass(frozen=True)
class Dropped:
    """One input setting with no FineTuneJob equivalent."""

    key: str
    value: Any
    reason: str

    def line(self) -> str:
        """`key: value  # reason` as one comment line."""
        value = json.dumps(self.value, ensure_ascii=False, sort_keys=False, default=str)
        if len(value) > 60:
            value = value[:57] + "..."
        return f"{self.key}: {value} -- {self.reason}"


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line adds to the input: where the data and weights live in the cluster, the job's name."""

    name: str = ""
    model_uri: str = ""
    dataset_uri: str = ""
    eval_uri: str = ""
    output_uri: str = ""


class Draft:
    """A FineTuneJob spec under construction plus the list of dropped settings."""

    def __init__(self, source: str, options: Options) -> None:
        self.source = source
        self.options = options
        self.spec: dict[str, Any] = {}
        self.dropped: list[Dropped] = []
        self.name = options.name

    def set(self, path: str, value: Any) -> None:
        """Set spec.<path> (dotted camelCase)."""
        node = self.spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    def get(self, path: str, default: Any = None) -> Any:
        """spec.<path> if set."""
        node: Any = self.spec
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def drop(self, key: str, value: Any, reason: str) -> None:
        """Record an input setting that the FineTuneJob cannot express."""
        self.dropped.append(Dropped(key, value, reason))

    # ------------------------------------------------------------------ shared translations
    def optimizer(self, key: str, value: Any) -> None:
        """An optimizer name in any ecosystem spelling -> the canonical one, or dropped."""
        name = OPTIMIZER_ALIASES.get(str(value), str(value))
        if name in OPTIMIZERS:
            self.set("training.optimizer", name)
        else:
            self.drop(key, value, f"optimizer not available here (use one of {', '.join(OPTIMIZERS)}); "
                                  "the default adamw applies")

    def scheduler(self, key: str, value: Any) -> None:
        """A learning-rate schedule name, or dropped."""
        if value in SCHEDULERS:
            self.set("training.scheduler", value)
        else:
            self.drop(key, value, f"schedule not available here (one of {', '.join(SCHEDULERS)}); the default "
                                  "cosine applies")

    def learning_rate(self, value: Any) -> None:
        """The learning rate as a YAML number."""
        self.set("training.learningRate", float(value))

    def chat_template(self, key: str, name: str, mapping: dict[str, str]) -> None:
        """A named template of the source project -> ours (or the tokenizer's own for its 'default' names)."""
        ours = mapping.get(name, name if name in CHAT_TEMPLATE_NAMES else None)
        if ours == "":
            return  # the tokenizer's own template: the default here too
        if ours is None:
            self.drop(key, name, f"no built-in template of that name (built-in: {', '.join(CHAT_TEMPLATE_NAMES)}); "
                                 "put its Jinja text in spec.dataset.chatTemplate, otherwise the tokenizer's own "
                                 "template is used")
            return
        self.set("dataset.chatTemplate", ours)

    def model(self, key: str, value: Any, revision: str = "") -> None:
        """A Hugging Face model id -> hf://org/name[@revision]; a local path needs --model-uri."""
        if self.options.model_uri:
            self.set("model.uri", self.options.model_uri)
            return
        text = str(value)
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", text):
            self.set("model.uri", f"hf://{text}" + (f"@{revision}" if revision else ""))
            return
        raise ConvertError(f"{key}: {text!r} is not a Hugging Face model id (org/name); copy the weights to a "
                           "PVC or bucket and pass --model-uri pvc://claim/path or s3://bucket/prefix")

    def dataset(self, key: str, value: Any, *, eval_set: bool = False) -> bool:
        """A Hugging Face dataset id -> hf://datasets/org/name; a local file needs --dataset-uri / --eval-uri."""
        given = self.options.eval_uri if eval_set else self.options.dataset_uri
        field = "dataset.evalUri" if eval_set else "dataset.uri"
        if given:
            self.set(field, given)
            return True
        text = str(value)
        local_file = text.lower().endswith((".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow"))
        if not local_file and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", text):
            self.set(field, f"hf://datasets/{text}")
            return True
        if text.startswith(("s3://", "pvc://", "hf://")):
            self.set(field, text)
            return True
        if eval_set:
            self.drop(key, value, "a local file: copy it to a PVC or bucket and pass --eval-uri (until then "
                                  "evalSplit holds out part of the training data)")
            return False
        raise ConvertError(f"{key}: {text!r} is a local file or a dataset name this command cannot resolve; copy "
                           "the data to a PVC or bucket and pass --dataset-uri pvc://claim/path.jsonl")

    # ------------------------------------------------------------------ result
    def manifest(self) -> dict[str, Any]:
        """The FineTuneJob; its spec is validated by the typed spec model (ConvertError on a problem)."""
        spec = dict(self.spec)
        spec.setdefault("output", {"uri": self.options.output_uri or f"pvc://outputs/{self.job_name()}"})
        training = spec.setdefault("training", {})
        if not training.get("maxSteps") and not training.get("epochs"):
            training["epochs"] = 1
        if "maxSteps" in training and training.get("epochs"):
            training.pop("epochs")  # transformers: max_steps > 0 overrides num_train_epochs
        for required in ("model", "dataset", "method"):
            if required not in spec:
                raise ConvertError(f"the {self.source} config gives no {required}")
        try:
            parse_spec(spec)
        except ValueError as exc:
            raise ConvertError(f"the converted spec is not valid: {exc}") from exc
        return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": self.job_name()},
                "spec": _ordered(spec, FineTuneJobSpec)}

    def job_name(self) -> str:
        """metadata.name: the --name option, or the input file's stem made a DNS label without dots."""
        raw = (self.name or "finetune").lower()
        name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:NAME_MAX].strip("-")
        return name or "finetune"

    def render(self) -> str:
        """The FineTuneJob YAML with a header naming the source and every dropped setting with its reason."""
        lines = [f"# Converted from {self.source} config by `kubetune convert`."]
        if self.dropped:
            lines.append(f"# Not expressed ({len(self.dropped)} setting(s)):")
            lines += [f"#   {d.line()}" for d in self.dropped]
        else:
            lines.append("# Every setting was expressed.")
        body = yaml.dump(self.manifest(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
        return "\n".join(lines) + "\n" + body


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (prompt and chat templates) as literal blocks, as people write them."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(ch in value for ch in "\t\r") and value == value.rstrip(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _ordered(values: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`values` with its keys in the spec model's field order (the order of the CRD and docs/contracts.md)."""
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    out: dict[str, Any] = {}
    for key in list(fields) + [k for k in values if k not in fields]:
        if key not in values:
            continue
        value = values[key]
        sub = _submodel(fields[key].annotation) if key in fields else None
        out[key] = _ordered(value, sub) if isinstance(value, dict) and sub is not None else value
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def sanitize_lora_targets(value: Any) -> list[str] | None:
    """A target-module setting (list, comma-separated string, 'all' / 'all-linear') -> a list, None when unusable."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        return None
    if items in (["all"], ["all-linear"], ["all_linear"]):
        return ["all-linear"]
    return items or None


def set_lora(draft: Draft, config: dict[str, Any], *, rank: str, alpha: str, dropout: str, targets: str,
             targets_reason: str) -> None:
    """spec.lora from a format's own key names for rank, alpha, dropout and target modules (an unusable target
    setting is listed with `targets_reason`)."""
    for key, name, cast in ((rank, "r", int), (alpha, "alpha", float), (dropout, "dropout", float)):
        if config.get(key) is not None:
            draft.set(f"lora.{name}", cast(config[key]))
    if config.get(targets) is not None:
        modules = sanitize_lora_targets(config[targets])
        if modules:
            draft.set("lora.targetModules", modules)
        else:
            draft.drop(targets, config[targets], targets_reason)
