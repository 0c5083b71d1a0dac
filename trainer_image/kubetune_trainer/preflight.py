"""`kubetune-train preflight`: check a plan's model and data on a CPU pod before any GPU pod starts.

It runs the trainer's own code on the plan: resolve the model (config and tokenizer only; no weights), read,
convert, split, tokenize and pack the dataset exactly as a training run does (`data.build_datasets`, so every bad
line is named as file:line), and count the examples, tokens and optimizer steps the run will take
(`recipe.total_optimizer_steps` for the plan's world size), then trace the real training step on fake tensors for
the exact model and data (`preflight_trace`; bounded in time, a skip reason when it cannot run). The result is the
container's termination message
(JSON, under 4 KiB): `{"version": 1, "status": "Succeeded", "reason": "Validated", "preflight": {...}}`, or a failure
summary with the reason and exit code of a training run (a bad line: `DataError`, exit 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import KubetuneTrainerError, StorageError

log = logging.getLogger("kubetune_trainer.preflight")

MAX_MESSAGE_BYTES = 4000  # the kubelet keeps at most 4096 bytes of a termination message
# Weight files the preflight never downloads from the hub: it needs the config and the tokenizer only.
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.onnx", "*.ckpt"]
_WORD = re.compile(r"\w+")


def resolve_model(uri: str, filler: Any = None) -> tuple[Path, str]:
    """(local directory with config.json and the tokenizer, the exact revision when the hub names one). An s3://
    model is fetched whole either way: with a cache (`filler`, kubetune_trainer.cache) straight into it."""
    from kubetune_trainer import storage

    parsed = storage.parse_uri(uri)
    if filler is not None and parsed.scheme == "s3":
        path = filler.model(uri)
        if path is not None:
            if not (path / "config.json").is_file():
                raise StorageError(f"{uri}: no config.json in {path}; not a transformers model directory")
            return path, ""
    if parsed.scheme == "hf" and storage.local_path(uri) is None:
        if parsed.path:
            raise StorageError(f"{uri}: a model URI names a repo, not a file inside it")
        path = storage._hf_snapshot(parsed, [*storage.HF_MODEL_IGNORE, *WEIGHT_PATTERNS])  # noqa: SLF001
        if not (path / "config.json").is_file():
            raise StorageError(f"{uri}: no config.json in the repository; not a transformers model")
        # The hub cache keeps a snapshot per commit: snapshots/<commit sha>/.
        return path, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else parsed.revision
    return storage.fetch_model(uri), ""


def load_tokenizer(model_dir: Path, trust_remote_code: bool, chat_template: str):
    """The tokenizer as the recipe loads it (pad = eos when missing, the plan's chat template applied)."""
    from transformers import AutoTokenizer

    from kubetune_trainer.data.chat_templates import apply_override

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    apply_override(tokenizer, chat_template)
    return tokenizer


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalized_text(example: Any) -> str:
    """An example's words, lower-cased, without punctuation or spacing: near-duplicates share it."""
    parts = [example.text] if example.is_text else [m.content for m in example.messages]
    return " ".join(_WORD.findall(" ".join(parts).lower()))


def near_duplicate_count(examples: list[Any]) -> int:
    """Examples whose normalized words repeat an earlier example's (exact duplicates included)."""
    counts = Counter(normalized_text(ex) for ex in examples)
    return sum(c - 1 for c in counts.values())


def count_run(train_rows: int, tokens_per_epoch: int, training: Any, world: int) -> dict[str, int]:
    """Optimizer steps, micro-batches and tokens the run processes (the recipe's own step formula)."""
    from kubetune_trainer.recipe import total_optimizer_steps

    steps, micro_per_epoch = total_optimizer_steps(train_rows, training.micro_batch_size,
                                                   training.gradient_accumulation_steps, world, training.epochs,
                                                   training.max_steps)
    micro_batches = steps * training.gradient_accumulation_steps  # per process
    rows = micro_batches * training.micro_batch_size * world
    tokens = round(tokens_per_epoch * rows / train_rows) if train_rows else 0
    return {"steps": steps, "microBatchesPerEpoch": micro_per_epoch, "world": world, "tokens": tokens}


def run_preflight(plan: Any) -> dict[str, Any]:
    """The preflight report of a validated plan (raises the trainer's errors for a bad model or dataset)."""
    from kubetune_trainer import cache, storage
    from kubetune_trainer.data import build_datasets, load_examples

    filler = cache.start(f"{plan.job.namespace}/{plan.job.name}")
    model_dir, revision = resolve_model(plan.model.uri, filler)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = load_tokenizer(model_dir, plan.model.trust_remote_code, plan.dataset.chat_template)
    dataset = plan.dataset.to_json_dict()
    data_path = storage.fetch_dataset(plan.dataset.uri)
    prepared = build_datasets(dataset, plan.training.to_json_dict(), tokenizer, plan.training.seed)
    report = prepared.report
    examples = load_examples(str(data_path), dataset.get("format") or "auto", dataset.get("promptTemplate"))
    world = plan.distributed.num_nodes * plan.distributed.procs_per_node  # the processes of the GPU Job
    rows = len(prepared.train)
    run = count_run(rows, int(report["trainTokens"]), plan.training, world)
    out: dict[str, Any] = {
        "model": {"uri": plan.model.uri, "revision": revision, "modelType": str(config.get("model_type") or ""),
                  "vocabSize": int(config.get("vocab_size") or len(tokenizer))},
        "dataset": {"uri": plan.dataset.uri, "sha256": file_sha256(data_path), "format": report["format"]},
        "examples": report["examples"], "trainExamples": report["trainExamples"],
        "evalExamples": report["evalExamples"], "trainRows": rows,
        "tokensPerEpoch": report["trainTokens"], "targetTokensPerEpoch": report["trainTargetTokens"],
        "tokenLengths": report["tokens"], "maxSeqLength": report["maxSeqLength"],
        "truncated": report["truncated"], "truncatedLocations": report["truncatedLocations"],
        "droppedNoTargets": report["droppedNoTargets"],
        "duplicates": report["duplicates"], "nearDuplicates": near_duplicate_count(examples),
        "emptyAnswers": report["emptyAnswers"], "emptyAnswerLocations": report["emptyAnswerLocations"],
        **run,
    }
    # The real step on fake tensors for this exact model and data (kubetune_trainer.preflight_trace); bounded in
    # time, and a skip reason instead of a figure when it cannot run: the analytic estimate then stands.
    from kubetune_trainer.preflight_trace import run_trace, traced_seq_length

    seq = traced_seq_length([len(ids) for ids in prepared.train["input_ids"]], plan.training.max_seq_length)
    out["trace"] = run_trace(plan, config, seq)
    datasets = {plan.dataset.uri: (data_path, out["dataset"]["sha256"])}
    if plan.dataset.eval_uri:
        eval_path = storage.fetch_dataset(plan.dataset.eval_uri)
        out["dataset"]["evalSha256"] = file_sha256(eval_path)
        datasets[plan.dataset.eval_uri] = (eval_path, out["dataset"]["evalSha256"])
    # A validated job fills the shared cache (kubetune_trainer.cache): a hub model's weights once per commit.
    if filler is None:
        out["cache"] = {"volume": "none"}
        return out
    filler.model(plan.model.uri, revision)
    for uri, (path, sha) in datasets.items():
        filler.dataset(uri, path, sha)
    out["cache"] = filler.report()
    return out


def encode_message(message: dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """Compact JSON under `limit` bytes: the location lists are shortened first, then dropped."""
    message = json.loads(json.dumps(message))
    report = message.get("preflight") or {}

    def dump() -> bytes:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()

    for keep in (3, 1, 0):
        if len(dump()) < limit:
            break
        for key in ("truncatedLocations", "emptyAnswerLocations"):
            if key in report:
                report[key] = report[key][:keep]
    if len(dump()) >= limit and isinstance(report.get("trace"), dict):  # the figures stay, the peak's place goes
        report["trace"].pop("peakAt", None)
    data = dump()
    if len(data) >= limit:
        raise ValueError(f"preflight message of {len(data)} bytes does not fit in {limit}")
    return data


def preflight_main(plan_path: str | None) -> int:
    """Entry point: run the preflight, print the report, write the termination message; the exit code of the
    reason (0 when validated)."""
    from kubetune_trainer.outcomes import exit_code_for
    from kubetune_trainer.plan import load_plan
    from kubetune_trainer.summary import encode_summary, failure_summary
    from kubetune_trainer.worker import resolve_plan_path

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [preflight] %(levelname)s %(name)s: %(message)s")
    try:
        plan = load_plan(resolve_plan_path(plan_path))
        report = run_preflight(plan)
    except Exception as exc:  # noqa: BLE001 - every failure ends as a termination message with its reason
        summary = failure_summary(exc)
        log.error("preflight failed: %s: %s", summary["reason"], summary["message"])
        _write(encode_summary(summary))
        return exit_code_for(summary["reason"])
    message = {"version": 1, "status": "Succeeded", "reason": "Validated", "message": "", "preflight": report}
    data = encode_message(message)
    print(json.dumps(report, indent=2))
    _write(data)
    return 0


def _write(data: bytes) -> None:
    from kubetune_trainer.summary import termination_log_path

    target = termination_log_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", target, exc)


if __name__ == "__main__":
    raise SystemExit(preflight_main(sys.argv[1] if len(sys.argv) > 1 else None))
