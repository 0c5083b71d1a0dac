"""The FineTuneJob CRD against the real apiserver: invalid specs are rejected with a message naming
the field (OpenAPI schema + CEL), defaults are applied, and immutability/transition rules hold."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from kubetune_dev.operator_process import install_crds

pytestmark = pytest.mark.integration

VALID = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
        "dataset": {"uri": "pvc://data/train.jsonl"},
        "method": "lora",
        "training": {"epochs": 1},
        "output": {"uri": "pvc://outputs/run"},
    },
}


@pytest.fixture(scope="module", autouse=True)
def crds(cluster):
    install_crds(cluster.kubectl)


def _with(path: str, value, base: dict | None = None) -> dict:
    """VALID with spec.<path> set (value None deletes it)."""
    obj = copy.deepcopy(base or VALID)
    node = obj["spec"]
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return obj


def _apply(cluster, namespace: str, obj: dict, *extra: str):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False)


QLORA = _with("quantization", {"bits": 4}, _with("method", "qlora"))


def _named(name: str) -> dict:
    obj = copy.deepcopy(VALID)
    obj["metadata"]["name"] = name
    return obj

# (case id, manifest, substrings the apiserver's error must contain)
INVALID = [
    ("missing-model", _with("model", None), ["spec.model", "Required"]),
    ("missing-output", _with("output", None), ["spec.output", "Required"]),
    ("output-uri-empty", _with("output.uri", ""), ["spec.output.uri"]),
    ("model-uri-scheme", _with("model.uri", "http://example.com/model"), ["spec.model.uri", "should match"]),
    ("dataset-uri-scheme", _with("dataset.uri", "/data/train.jsonl"), ["spec.dataset.uri"]),
    ("output-uri-hf-not-writable", _with("output.uri", "hf://org/model"), ["spec.output.uri"]),
    ("method-enum", _with("method", "prefix-tuning"), ["spec.method", "Unsupported value"]),
    ("format-enum", _with("dataset.format", "csv"), ["spec.dataset.format"]),
    ("qlora-without-quantization", _with("method", "qlora"), ["spec.quantization", "required when spec.method is qlora"]),
    ("qlora-8-bit", _with("quantization", {"bits": 8}, QLORA), ["spec.quantization", "bits: 4"]),
    ("quantization-with-lora", _with("quantization", {"bits": 4}), ["spec.quantization", "only allowed when spec.method is qlora"]),
    ("lora-block-with-full", _with("lora", {"r": 8}, _with("method", "full")), ["spec.lora", "only allowed"]),
    ("epochs-and-max-steps", _with("training", {"epochs": 1, "maxSteps": 10}), ["spec.training", "exactly one of"]),
    ("neither-epochs-nor-max-steps", _with("training", {"microBatchSize": 2}), ["spec.training", "exactly one of"]),
    ("micro-batch-zero", _with("training", {"epochs": 1, "microBatchSize": 0}), ["spec.training.microBatchSize"]),
    ("seq-length-too-small", _with("training", {"epochs": 1, "maxSeqLength": 8}), ["spec.training.maxSeqLength"]),
    ("learning-rate-text", _with("training", {"epochs": 1, "learningRate": "fast"}), ["spec.training.learningRate"]),
    ("learning-rate-above-one", _with("training", {"epochs": 1, "learningRate": 2.0}), ["spec.training.learningRate: 2"]),
    ("learning-rate-zero", _with("training", {"epochs": 1, "learningRate": 0.0}), ["spec.training.learningRate"]),
    ("learning-rate-string-range", _with("training", {"epochs": 1, "learningRate": "1e30"}),
     ["spec.training.learningRate: 1e30"]),
    ("learning-rate-list", _with("training", {"epochs": 1, "learningRate": [0.1]}),
     ["spec.training.learningRate: a list or object"]),
    ("learning-rate-bool", _with("training", {"epochs": 1, "learningRate": True}), ["spec.training.learningRate"]),
    ("name-too-long", _named("n" * 53), ["metadata.name must be at most 52 characters"]),
    ("name-with-dot", _named("llama.v2"), ["metadata.name must not contain '.'"]),
    ("eval-split-range", _with("dataset.evalSplit", 0.9), ["spec.dataset.evalSplit"]),
    ("lora-rank-zero", _with("lora", {"r": 0}), ["spec.lora.r"]),
    ("test-only-faults", _with("faults", {"outOfMemoryAtStep": 5}), ["unknown field", "spec.faults"]),
    ("divergence-factor-one", _with("training", {"epochs": 1, "divergence": {"factor": 1.0}}),
     ["spec.training.divergence.factor"]),
    ("divergence-action-enum", _with("training", {"epochs": 1, "divergence": {"action": "ignore"}}),
     ["spec.training.divergence.action", "Unsupported value"]),
    ("lora-dropout-one", _with("lora", {"dropout": 1.0}), ["spec.lora.dropout"]),
    ("gpus-per-pod-range", _with("resources", {"gpusPerPod": 32}), ["spec.resources.gpusPerPod"]),
    ("max-gpus-exceeded", _with("resources", {"gpusPerPod": 8, "pods": 2, "maxGpus": 8}), ["spec.resources.maxGpus", "exceeds"]),
    ("memory-quantity", _with("resources", {"memory": "lots"}), ["spec.resources.memory"]),
    ("zero-stage-range", _with("distributed", {"zeroStage": 4}), ["spec.distributed.zeroStage"]),
    ("ddp-with-zero", _with("distributed", {"strategy": "ddp", "zeroStage": 2}), ["spec.distributed.strategy", "deepspeed"]),
    ("zero3-with-lora", _with("distributed", {"strategy": "deepspeed", "zeroStage": 3}), ["spec.distributed.zeroStage", "method full"]),
    ("backoff-limit-negative", _with("backoffLimit", -1), ["spec.backoffLimit"]),
    ("unknown-scheduler", _with("training", {"epochs": 1, "scheduler": "step"}), ["spec.training.scheduler"]),
    ("secret-name-invalid", _with("secrets", {"hfTokenSecretRef": {"name": "Bad_Name"}}), ["spec.secrets.hfTokenSecretRef.name"]),
    # post-training evaluation
    ("evaluation-metric-unknown", _with("evaluation", {"metrics": ["exactMatch", "accuracy"]}),
     ["spec.evaluation.metrics[1]", "Unsupported value", "accuracy"]),
    ("evaluation-gate-metric-unknown", _with("evaluation", {"gates": [{"metric": "bleurt", "minImprovement": 0.1}]}),
     ["spec.evaluation.gates[0].metric", "Unsupported value"]),
    ("evaluation-gate-on-unscored-metric", _with("evaluation", {"metrics": ["exactMatch"],
                                                                "gates": [{"metric": "rougeL"}]}),
     ["spec.evaluation.gates", "must be one of the metrics listed in spec.evaluation.metrics"]),
    ("evaluation-without-held-out-data", _with("evaluation", {}, _with("dataset.evalSplit", 0)),
     ["spec.evaluation", "needs held-out examples"]),
    ("evaluation-max-new-tokens-zero", _with("evaluation", {"maxNewTokens": 0}), ["spec.evaluation.maxNewTokens"]),
    ("evaluation-regression-above-one", _with("evaluation", {"maxGeneralRegression": 2}),
     ["spec.evaluation.maxGeneralRegression"]),
    ("export-gguf-type-unknown", _with("output.export", {"gguf": "q3_k_s"}),
     ["spec.output.export.gguf", "Unsupported value"]),
    # settings other trainers' configs carry
    ("warmup-steps-and-ratio", _with("training", {"epochs": 1, "warmupSteps": 10, "warmupRatio": 0.1}),
     ["spec.training.warmupSteps", "only one of spec.training.warmupSteps or spec.training.warmupRatio"]),
    ("warmup-steps-negative", _with("training", {"epochs": 1, "warmupSteps": -1}), ["spec.training.warmupSteps"]),
    ("keep-checkpoints-negative", _with("training", {"epochs": 1, "keepCheckpoints": -1}),
     ["spec.training.keepCheckpoints"]),
    ("log-every-steps-negative", _with("training", {"epochs": 1, "logEverySteps": -2}), ["spec.training.logEverySteps"]),
    ("checkpoint-strategy-enum", _with("training", {"epochs": 1, "checkpointStrategy": "best"}),
     ["spec.training.checkpointStrategy", "Unsupported value"]),
    ("optimizer-alias-names-canonical", _with("training", {"epochs": 1, "optimizer": "adamw_bnb_8bit"}),
     ["spec.training.optimizer", "adamw_bnb_8bit is spelled adamw_8bit"]),
    ("optimizer-alias-torch", _with("training", {"epochs": 1, "optimizer": "adamw_torch"}),
     ["adamw_torch is spelled adamw"]),
    ("optimizer-unknown", _with("training", {"epochs": 1, "optimizer": "adafactor"}),
     ["spec.training.optimizer", "unsupported optimizer adafactor"]),
    ("chat-template-unknown-name", _with("dataset.chatTemplate", "vicuna"),
     ["spec.dataset.chatTemplate", "chatml, llama3"]),
    ("prompt-template-without-placeholder", _with("dataset.promptTemplate", {"prompt": "Q:", "completion": "{a}"}),
     ["spec.dataset.promptTemplate.prompt", "{field} placeholder"]),
    ("prompt-template-needs-completion", _with("dataset.promptTemplate", {"prompt": "Q: {q}"}),
     ["spec.dataset.promptTemplate.completion", "Required"]),
    ("prompt-template-with-chat-format", _with("dataset.format", "messages",
                                               _with("dataset.promptTemplate", {"prompt": "{q}", "completion": "{a}"})),
     ["spec.dataset.promptTemplate", "format auto or text"]),
    ("tracking-uri-scheme", _with("tracking", {"mlflow": {"trackingUri": "mlflow.svc:5000", "experiment": "x"}}),
     ["spec.tracking.mlflow.trackingUri"]),
    ("tracking-needs-experiment", _with("tracking", {"mlflow": {"trackingUri": "http://mlflow:5000"}}),
     ["spec.tracking.mlflow.experiment", "Required"]),
    ("wandb-online-needs-key", _with("tracking", {"wandb": {"project": "p"}}),
     ["spec.tracking.wandb.apiKeySecretRef", "mode online needs apiKeySecretRef"]),
    ("wandb-mode-enum", _with("tracking", {"wandb": {"project": "p", "mode": "cloud"}}),
     ["spec.tracking.wandb.mode", "Unsupported value"]),
    ("wandb-project-path", _with("tracking", {"wandb": {"project": "team/p", "mode": "offline"}}),
     ["spec.tracking.wandb.project"]),
    ("wandb-key-needs-secret-name", _with("tracking", {"wandb": {"project": "p", "apiKeySecretRef": {"key": "k"}}}),
     ["spec.tracking.wandb.apiKeySecretRef.name", "Required"]),
    ("prompt-and-chat-template", _with("dataset.chatTemplate", "chatml",
                                       _with("dataset.promptTemplate", {"prompt": "{q}", "completion": "{a}"})),
     ["spec.dataset.chatTemplate", "exclude each other"]),
]

VALID_CONFIG_FIELDS = [
    ("warmup-steps", _with("training", {"epochs": 1, "warmupSteps": 100})),
    ("warmup-ratio", _with("training", {"epochs": 1, "warmupRatio": 0.1})),
    ("checkpointing", _with("training", {"maxSteps": 50, "checkpointStrategy": "epoch", "keepCheckpoints": 0,
                                         "logEverySteps": 5})),
    ("named-chat-template", _with("dataset.chatTemplate", "llama3")),
    ("mlflow-tracking", _with("tracking", {"mlflow": {"trackingUri": "http://mlflow.mlflow.svc:5000",
                                                      "experiment": "support", "credentialsSecretRef": {"name": "m"}},
                                           "required": True})),
    ("hf-dataset-repository", _with("dataset.uri", "hf://datasets/HuggingFaceH4/ultrachat_200k@main")),
    ("inline-chat-template", _with("dataset.chatTemplate",
                                   "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")),
    ("prompt-template", _with("dataset.promptTemplate", {"prompt": "### Q:\n{question}\n### A:\n",
                                                          "completion": "{answer}"})),
]


@pytest.mark.parametrize("case,manifest", VALID_CONFIG_FIELDS, ids=[c[0] for c in VALID_CONFIG_FIELDS])
def test_config_fields_are_accepted_and_read_back(cluster, namespace, case, manifest):
    result = _apply(cluster, namespace, manifest, "--dry-run=server", "-o", "json")
    assert result.returncode == 0, f"{case}: {result.stderr}"
    from kubetune.api import parse_spec
    stored = json.loads(result.stdout)["spec"]
    assert parse_spec(stored).dump()["training"]["optimizer"] == "adamw"
    for block in ("training", "dataset"):
        for key, value in manifest["spec"].get(block, {}).items():
            assert stored[block][key] == value, f"{case}: spec.{block}.{key}"


@pytest.mark.parametrize("case,manifest,needles", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(cluster, namespace, case, manifest, needles):
    result = _apply(cluster, namespace, manifest, "--dry-run=server")
    assert result.returncode != 0, f"{case}: the apiserver accepted an invalid spec"
    for needle in needles:
        assert needle in result.stderr, f"{case}: {needle!r} not in the apiserver's error:\n{result.stderr}"


def test_the_longest_name_gives_children_the_apiserver_accepts(cluster, namespace):
    """A 52-character name (the CRD's bound) gives children whose names and pod hostnames fit in 63."""
    manifest = _named("n" * 52)
    result = _apply(cluster, namespace, manifest)
    assert result.returncode == 0, result.stderr
    got = json.loads(cluster.kubectl("get", "ftj", "n" * 52, "-n", namespace, "-o", "json").stdout)["spec"]
    from kubetune.api import parse_spec
    from kubetune.builders import BuildConfig, JobRef, build_children
    from kubetune.sizing.layout import layout_from_resources
    spec = parse_spec(got)
    children = build_children(JobRef("n" * 52, namespace, "00000000-0000-0000-0000-000000000001"), got, spec,
                              layout_from_resources(spec), BuildConfig())
    for child in children:
        meta = {k: v for k, v in child["metadata"].items() if k != "ownerReferences"}
        result = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-",
                                 input=json.dumps({**child, "metadata": meta}), check=False)
        assert result.returncode == 0, f"{child['kind']}: {result.stderr}"
    job = children[-1]
    assert len(f"{job['metadata']['name']}-{job['spec']['completions'] - 1}") <= 63  # pod hostnames


@pytest.mark.parametrize("wandb,stored", [
    ({"project": "p", "mode": "offline"}, {"project": "p", "entity": "", "runName": "", "mode": "offline"}),
    ({"project": "p", "entity": "team", "apiKeySecretRef": {"name": "wandb-key"}},
     {"project": "p", "entity": "team", "runName": "", "mode": "online",
      "apiKeySecretRef": {"name": "wandb-key", "key": "apiKey"}})])
def test_wandb_tracking_gets_defaults(cluster, namespace, wandb, stored):
    result = _apply(cluster, namespace, _with("tracking", {"wandb": wandb}), "--dry-run=server", "-o", "json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)["spec"]["tracking"]
    assert got == {"wandb": stored, "required": False}
    from kubetune.api import parse_spec
    assert parse_spec(json.loads(result.stdout)["spec"]).tracking.wandb.dump() == {
        "apiKeySecretRef": None, **stored}


def test_valid_spec_gets_defaults(cluster, namespace):
    result = _apply(cluster, namespace, VALID)
    assert result.returncode == 0, result.stderr
    spec = json.loads(cluster.kubectl("get", "ftj", "valid", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["training"]["learningRate"] == 0.0002 and spec["training"]["maxSteps"] == 0
    assert spec["dataset"]["format"] == "auto" and spec["dataset"]["evalSplit"] == 0.05
    assert spec["distributed"] == {"strategy": "auto", "zeroStage": 0, "offloadOptimizer": False,
                                   "offloadParams": False}
    assert spec["resources"]["gpusPerPod"] == 0 and spec["backoffLimit"] == 3 and spec["suspend"] is False
    assert "lora" not in spec  # the block is optional; the operator applies the LoRA defaults
    assert spec["training"]["divergence"] == {"action": "stop", "factor": 10.0, "patience": 10}
    # A qlora spec gets the quantization defaults.
    q = copy.deepcopy(QLORA)
    q["metadata"]["name"] = "qlora"
    assert _apply(cluster, namespace, q).returncode == 0
    qspec = json.loads(cluster.kubectl("get", "ftj", "qlora", "-n", namespace, "-o", "json").stdout)["spec"]
    assert qspec["quantization"] == {"bits": 4, "quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}


@pytest.mark.parametrize("written,stored", [
    ("2e-4", 0.0002), ("0.0002", 0.0002), ("1e-5", 1e-5), ("1", 1), ('"2e-4"', "2e-4"), ('"0.0002"', "0.0002")])
def test_learning_rate_is_a_yaml_number_or_a_decimal_string(cluster, namespace, written, stored):
    """`learningRate: 2e-4` as kubectl parses it (a number) and the quoted string both apply; the operator
    reads both as the same float."""
    manifest = yaml.safe_dump(VALID).replace("  epochs: 1\n", f"  epochs: 1\n    learningRate: {written}\n")
    assert f"learningRate: {written}" in manifest
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    spec = json.loads(cluster.kubectl("get", "ftj", "valid", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["training"]["learningRate"] == stored
    from kubetune.api import parse_spec
    assert parse_spec(spec).training.learning_rate == pytest.approx(float(stored))


def test_evaluation_gets_defaults_and_changes_only_while_suspended(cluster, namespace):
    manifest = _with("evaluation", {"gates": [{"metric": "tokenF1"}], "maxGeneralRegression": 0.05})
    manifest["metadata"]["name"] = "evaluated"
    result = _apply(cluster, namespace, manifest)
    assert result.returncode == 0, result.stderr
    got = json.loads(cluster.kubectl("get", "ftj", "evaluated", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["evaluation"] == {"metrics": ["exactMatch", "tokenF1", "rougeL"], "numExamples": 50,
                                 "datasetUri": "", "maxNewTokens": 64, "temperature": 0, "generalProbeUri": "",
                                 "gates": [{"metric": "tokenF1", "minImprovement": 0}],
                                 "maxGeneralRegression": 0.05}
    from kubetune.api import parse_spec
    assert parse_spec(got).evaluation.gates[0].metric == "tokenF1"
    change = json.dumps({"spec": {"evaluation": {"numExamples": 10}}})
    refused = cluster.kubectl("patch", "ftj", "evaluated", "-n", namespace, "--type=merge", "-p", change, check=False)
    assert refused.returncode != 0 and "set spec.suspend: true first" in refused.stderr, refused.stderr


def test_export_gets_defaults(cluster, namespace):
    manifest = _with("output.export", {"system": "Be brief."})
    manifest["metadata"]["name"] = "exported"
    result = _apply(cluster, namespace, manifest)
    assert result.returncode == 0, result.stderr
    got = json.loads(cluster.kubectl("get", "ftj", "exported", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["output"]["export"] == {"gguf": "f16", "modelfile": True, "system": "Be brief.", "temperature": 0.7,
                                       "topP": 0.9, "numCtx": 0}


def test_learning_rate_changes_only_while_suspended(cluster, namespace):
    """The untyped learningRate is still covered by the CRD's run-settings immutability rule, and the admission
    policy checks a changed value on update too."""
    assert _apply(cluster, namespace, VALID).returncode == 0
    change = json.dumps({"spec": {"training": {"learningRate": 0.0003}}})
    refused = cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", change, check=False)
    assert refused.returncode != 0 and "set spec.suspend: true first" in refused.stderr, refused.stderr
    cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    bad = cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p",
                          json.dumps({"spec": {"training": {"learningRate": "fast"}}}), check=False)
    assert bad.returncode != 0 and "spec.training.learningRate: fast" in bad.stderr, bad.stderr
    cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", change)
    got = json.loads(cluster.kubectl("get", "ftj", "valid", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["training"]["learningRate"] == 0.0003


@pytest.mark.parametrize("field,value,needle", [
    ("model", {"uri": "hf://meta-llama/Llama-3.1-70B"}, "spec.model is immutable"),
    ("dataset", {"uri": "pvc://data/other.jsonl"}, "spec.dataset is immutable"),
    ("method", "full", "spec.method is immutable"),
])
def test_model_dataset_method_are_immutable(cluster, namespace, field, value, needle):
    assert _apply(cluster, namespace, VALID).returncode == 0
    patch = json.dumps({"spec": {field: value}})
    result = cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", patch, check=False)
    assert result.returncode != 0 and needle in result.stderr, result.stderr


def test_run_settings_change_only_while_suspended(cluster, namespace):
    assert _apply(cluster, namespace, VALID).returncode == 0
    change = json.dumps({"spec": {"training": {"maxSeqLength": 4096}}})
    refused = cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", change, check=False)
    assert refused.returncode != 0 and "set spec.suspend: true first" in refused.stderr, refused.stderr
    cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", change)
    got = json.loads(cluster.kubectl("get", "ftj", "valid", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["training"]["maxSeqLength"] == 4096
    # Lifecycle fields stay mutable without suspending.
    cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"suspend":false,"ttlSecondsAfterFinished":60}}')


def test_cancel_cannot_be_reverted(cluster, namespace):
    assert _apply(cluster, namespace, VALID).returncode == 0
    cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge", "-p", '{"spec":{"cancel":true}}')
    result = cluster.kubectl("patch", "ftj", "valid", "-n", namespace, "--type=merge",
                             "-p", '{"spec":{"cancel":false}}', check=False)
    assert result.returncode != 0 and "spec.cancel cannot be set back" in result.stderr, result.stderr


def test_printer_columns_and_short_name(cluster, namespace):
    assert _apply(cluster, namespace, VALID).returncode == 0
    out = cluster.kubectl("get", "ftj", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "REASON", "METHOD", "MODEL", "GPUS", "PROGRESS", "EVAL", "AGE"], out
    assert "hf://meta-llama/Llama-3.1-8B" in out and "lora" in out
    assert "finetunejob" in cluster.kubectl("get", "kubetune", "-n", namespace, "-o", "name").stdout


def test_crd_is_structural_with_descriptions(cluster):
    crd = yaml.safe_load(cluster.kubectl("get", "crd", "finetunejobs.kubetune.io", "-o", "yaml").stdout)
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds.get("NonStructuralSchema", "False") == "False" and conds["Established"] == "True"
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:
        for name, child in (node.get("properties") or {}).items():
            if path == "" and name in ("apiVersion", "kind", "metadata"):
                continue
            if not child.get("description"):
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    assert not missing, f"fields without a description: {missing}"
