"""Training data pipeline: format detection/conversion, JSONL/JSON/Parquet loading, errors naming file and line,
completion-only masking on the tiny tokenizer's real chat template, packing, leak-free split and the data report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kubetune_trainer.data import DataError, convert, detect_format, load_examples
from kubetune_trainer.data.conversation import Conversation, Message
from kubetune_trainer.data.split import duplicate_count, split_by_hash

ALPACA = {"instruction": "Spell out", "input": "3 1", "output": "three one", "system": "Be brief."}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Spell out: 3 1"},
                              {"from": "gpt", "value": "three one"}, {"from": "human", "value": "Again: 2"},
                              {"from": "gpt", "value": "two"}]}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Spell out: "},
                                                      {"type": "text", "text": "3 1"}]},
                         {"role": "assistant", "content": "three one"}]}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}


def msgs(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def spell(i: int, answer: str | None = None) -> dict:
    """A distinct small messages example."""
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    digits = [int(d) for d in str(i)]
    return msgs(("user", "Spell out: " + " ".join(map(str, digits))),
                ("assistant", " ".join(words[d] for d in digits) if answer is None else answer))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- formats (pure)

@pytest.mark.unit
@pytest.mark.parametrize("record,fmt,expected", [
    (ALPACA, "alpaca", [("system", "Be brief."), ("user", "Spell out\n\n3 1"), ("assistant", "three one")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", [("user", "Say hi"), ("assistant", "hi")]),
    (SHAREGPT, "sharegpt", [("system", "Be brief."), ("user", "Spell out: 3 1"), ("assistant", "three one"),
                            ("user", "Again: 2"), ("assistant", "two")]),
    (MESSAGES, "messages", [("system", "Be brief."), ("user", "Spell out: 3 1"), ("assistant", "three one")]),
])
def test_auto_detects_and_converts_chat_formats(record, fmt, expected):
    assert detect_format(record) == fmt
    conv = convert(record, fmt, "f.jsonl", 7)
    assert [(m.role, m.content) for m in conv.messages] == expected
    assert conv.fmt == fmt and conv.where == "f.jsonl:7" and not conv.is_text


@pytest.mark.unit
def test_auto_detects_plain_text():
    assert detect_format(TEXT) == "text"
    conv = convert(TEXT, "text")
    assert conv.is_text and conv.text == TEXT["text"] and conv.to_dict() == TEXT


@pytest.mark.unit
def test_same_content_in_different_formats_hashes_the_same():
    a = convert({"instruction": "Spell out: 3 1", "output": "three one"}, "alpaca")
    s = convert({"conversations": [{"from": "human", "value": "Spell out: 3 1"},
                                   {"from": "gpt", "value": "three one"}]}, "sharegpt")
    m = convert(msgs(("user", "Spell out: 3 1"), ("assistant", "three one")), "messages")
    assert a.content_hash() == s.content_hash() == m.content_hash()
    assert m.content_hash() != convert(msgs(("user", "Spell out: 3 1"), ("assistant", "three two")),
                                       "messages").content_hash()


@pytest.mark.unit
@pytest.mark.parametrize("record,fmt,fragment", [
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "conversations[0].from"),
    (msgs(("user", "only a question")), "messages", "no assistant turn"),
    (msgs(("user", "q"), ("assistant", "a"), ("system", "late")), "messages", "system message must come first"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content"),
    ({"instruction": "x"}, "alpaca", "missing required field 'output'"),
    ({"text": "   "}, "text", "field 'text' is empty"),
])
def test_bad_records_name_the_field(record, fmt, fragment):
    with pytest.raises(DataError) as err:
        convert(record, fmt, "d.jsonl", 4)
    assert fragment in str(err.value) and str(err.value).startswith("d.jsonl:4: ")
    assert err.value.reason == "DataError"


# ----------------------------------------------------------------------------- loading (pure)

RECORDS = [ALPACA, {"instruction": "Say hi", "output": "hi"}, {"instruction": "Count", "input": "1 2", "output": "3"}]


@pytest.mark.unit
def test_jsonl_json_and_parquet_load_the_same_examples(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    array = tmp_path / "a.json"
    array.write_text(json.dumps(RECORDS, indent=2))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"meta": "x", "data": RECORDS}))
    loaded = {"jsonl": load_examples(jsonl), "array": load_examples(array), "wrapped": load_examples(wrapped)}
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": r.get("input", ""),
                                          "output": r["output"], "system": r.get("system")} for r in RECORDS]),
                   parquet)
    loaded["parquet"] = load_examples(parquet)
    expected = [convert(r, "alpaca").to_dict() for r in RECORDS]
    for kind, examples in loaded.items():
        assert [e.to_dict() for e in examples] == expected, kind
        assert all(e.fmt == "alpaca" for e in examples), kind
    assert [e.line for e in loaded["jsonl"]] == [1, 2, 3]
    assert [e.line for e in loaded["parquet"]] == [1, 2, 3]  # row numbers
    # JSON array elements are located by the line they start on.
    text = array.read_text().splitlines()
    for example in loaded["array"]:
        assert text[example.line - 1].strip() == "{"


@pytest.mark.unit
def test_blank_jsonl_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(TEXT) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert [e.line for e in load_examples(path)] == [1, 3]


@pytest.mark.unit
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + '{"instruction": "x", \n')
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert err.value.line == 3 and err.value.path == str(path)
    assert str(err.value).startswith(f"{path}:3: invalid JSON")


@pytest.mark.unit
def test_invalid_utf8_names_its_own_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    good = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(1, 40)).encode()
    path.write_bytes("\ufeff".encode() + good + b'{"text": "caf\xe9"}\n')  # latin-1 byte on line 40
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert err.value.line == 40 and "not valid UTF-8" in str(err.value)
    path.write_bytes("\ufeff".encode() + good)
    examples = load_examples(path)
    assert len(examples) == 39 and examples[0].text == "line 1"


@pytest.mark.unit
def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert err.value.line == 3 and str(path) in str(err.value)


@pytest.mark.unit
def test_json_object_must_hold_exactly_one_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": [TEXT], "test": [TEXT]}))
    assert len(load_examples(path)) == 1  # 'train' is a known list key
    path.write_text(json.dumps({"a": [TEXT], "b": [TEXT]}))
    with pytest.raises(DataError, match=r"exactly one list of examples .* found list keys \['a', 'b'\]"):
        load_examples(path)
    path.write_text('"just a string"')
    with pytest.raises(DataError, match="must be an array of examples, not str"):
        load_examples(path)


@pytest.mark.unit
def test_unknown_record_shape_names_the_line(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [{"prompt": "q", "completion": "a"}, TEXT])
    with pytest.raises(DataError) as err:
        load_examples(first)
    assert err.value.line == 1 and "unknown dataset format" in str(err.value) and str(first) in str(err.value)
    # Auto-detection fixes the format from the first record; a later record of another shape fails at its line.
    later = write_jsonl(tmp_path / "later.jsonl", [ALPACA, ALPACA, {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as err:
        load_examples(later)
    assert err.value.line == 3 and "instruction" in str(err.value) and str(later) in str(err.value)


@pytest.mark.unit
def test_explicit_format_and_unsupported_file_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [TEXT])
    with pytest.raises(DataError, match="missing required field 'instruction'"):
        load_examples(path, "alpaca")
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        load_examples(path, "csv")
    other = tmp_path / "d.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported dataset file type '.csv'"):
        load_examples(other)
    with pytest.raises(DataError, match="dataset has no examples"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", []))


# ----------------------------------------------------------------------------- split (pure)

def _convs(n: int) -> list[Conversation]:
    return [convert(spell(i), "messages", "d.jsonl", i + 1) for i in range(n)]


@pytest.mark.unit
def test_split_has_no_leakage_keeps_duplicates_together_and_is_deterministic():
    base = _convs(60)
    examples = base + [Conversation(c.messages, source="d.jsonl", line=100 + i, fmt="messages")
                       for i, c in enumerate(base[:20])]  # 20 exact duplicates at other lines
    assert duplicate_count(examples) == 20
    train, evals = split_by_hash(examples, 0.2, seed=7)
    assert len(train) + len(evals) == len(examples)
    train_h, eval_h = {e.content_hash() for e in train}, {e.content_hash() for e in evals}
    assert not train_h & eval_h, "an example is in both train and eval"
    assert len(eval_h) == 12  # round(0.2 x 60 distinct contents)
    again = split_by_hash(list(reversed(examples)), 0.2, seed=7)[1]
    assert {e.content_hash() for e in again} == eval_h, "the split depends on the input order"
    other = {e.content_hash() for e in split_by_hash(examples, 0.2, seed=8)[1]}
    assert other != eval_h, "the seed does not change the split"
    assert split_by_hash(examples, 0.0, seed=7) == (examples, [])
    with pytest.raises(ValueError, match="evalSplit"):
        split_by_hash(examples, 1.0, seed=7)


# ----------------------------------------------------------------------------- tokenizer-based (torch)

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kubetune_trainer import tiny

    out = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer(out, model_max_length=256)
    return transformers.AutoTokenizer.from_pretrained(str(out))


CHAT = convert(msgs(("system", "Be brief."), ("user", "Spell out: 3 1 4"), ("assistant", "three one four"),
                    ("user", "Again: 2"), ("assistant", "two")), "messages")


@pytest.mark.trainer
def test_completion_only_masks_prompt_tokens_on_the_real_chat_template(tokenizer):
    from kubetune_trainer.data import IGNORE_INDEX, encode

    enc = encode(CHAT, tokenizer, completion_only=True)
    # Independent oracle: transformers' assistant mask from the template's {% generation %} blocks.
    messages = [{"role": m.role, "content": m.content} for m in CHAT.messages]
    ref = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc.input_ids == list(ref["input_ids"])
    assert [label != IGNORE_INDEX for label in enc.labels] == [bool(m) for m in ref["assistant_masks"]]
    trained = [label for label in enc.labels if label != IGNORE_INDEX]
    assert all(label == tok for label, tok in zip(enc.labels, enc.input_ids) if label != IGNORE_INDEX)
    assert tokenizer.decode(trained) == "three one four</s>two</s>"
    prompt_text = tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
    assert "Spell out: 3 1 4" in prompt_text and "three" not in prompt_text

    full = encode(CHAT, tokenizer, completion_only=False)
    assert full.input_ids == enc.input_ids and full.labels == full.input_ids


@pytest.mark.trainer
def test_masking_with_the_default_template_for_base_tokenizers(tokenizer):
    from kubetune_trainer.data import IGNORE_INDEX, encode, ensure_chat_template

    base = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    base.chat_template = None
    assert ensure_chat_template(base) is True and ensure_chat_template(base) is False
    enc = encode(CHAT, base)
    text = base.decode(enc.input_ids)
    assert "### User:\nSpell out: 3 1 4" in text
    assert base.decode([label for label in enc.labels if label != IGNORE_INDEX]) == "three one four</s>two</s>"


@pytest.mark.trainer
def test_text_examples_train_every_token(tokenizer):
    from kubetune_trainer.data import encode

    enc = encode(convert(TEXT, "text"), tokenizer)
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.input_ids[-1] == tokenizer.eos_token_id
    assert enc.labels == enc.input_ids
    assert tokenizer.decode(enc.input_ids[1:-1]) == TEXT["text"]


def _prepare(path: Path, tokenizer, **training) -> object:
    from kubetune_trainer.data import build_datasets

    dataset = {"uri": str(path), "format": "auto", "evalUri": training.pop("evalUri", ""),
               "evalSplit": training.pop("evalSplit", 0.0)}
    plan_training = {"maxSeqLength": 64, "packing": False, "completionOnly": True, **training}
    return build_datasets(dataset, plan_training, tokenizer, seed=42)


@pytest.mark.trainer
def test_packing_fills_blocks_without_crossing_example_boundaries(tmp_path, tokenizer):
    from kubetune_trainer.data import IGNORE_INDEX, DataCollator
    from kubetune_trainer.data.packing import example_boundaries

    path = write_jsonl(tmp_path / "d.jsonl", [spell(i) for i in range(10, 70)])
    plain = _prepare(path, tokenizer, maxSeqLength=64)
    packed = _prepare(path, tokenizer, maxSeqLength=64, packing=True)
    rows = [plain.train[i] for i in range(len(plain.train))]
    blocks = [packed.train[i] for i in range(len(packed.train))]
    assert packed.report["packing"] and packed.report["packedTrainBlocks"] == len(blocks)
    assert len(blocks) < len(rows) / 2, "packing did not combine examples"

    position = 0
    for index, block in enumerate(blocks):
        assert len(block["input_ids"]) <= 64 and len(block["labels"]) == len(block["input_ids"])
        spans = example_boundaries(block["position_ids"])
        for start, end in spans:
            row = rows[position]
            position += 1
            # Each example is whole, in order, with positions restarting at 0.
            assert block["input_ids"][start:end] == row["input_ids"]
            assert block["position_ids"][start:end] == list(range(end - start))
            # No token is trained to predict across a boundary: the first label of every example is -100.
            assert block["labels"][start] == IGNORE_INDEX
            assert block["labels"][start + 1:end] == row["labels"][1:]
        if index + 1 < len(blocks):  # greedy: the next example did not fit in this block
            assert len(block["input_ids"]) + len(rows[position]["input_ids"]) > 64
    assert position == len(rows), "packing lost or duplicated examples"

    batch = DataCollator.for_tokenizer(tokenizer)([blocks[0], blocks[-1]])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    pad = batch["input_ids"].shape[1] - len(blocks[-1]["input_ids"])
    if pad:
        assert (batch["labels"][1, -pad:] == IGNORE_INDEX).all()
        assert batch["position_ids"][1, -pad:].tolist() == list(range(pad))


@pytest.mark.trainer
def test_packed_examples_do_not_attend_to_each_other(tmp_path, tokenizer):
    """A packed batch from the collator (position_ids, no attention_mask), through the model as the recipe prepares
    it (`methods.apply_method`), gives each example the logits it has alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import tiny
    from kubetune_trainer.data import DataCollator, encode
    from kubetune_trainer.data.packing import pack
    from kubetune_trainer.methods import apply_method
    from kubetune_trainer.plan import parse_plan

    from ._support import make_plan

    cfg = tiny.tiny_config("llama", len(tokenizer), 32, 2, 4, 2, None, 256, tokenizer.bos_token_id,
                           tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plan = parse_plan(make_plan(tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "out", "full", packing=True))
    model = apply_method(model, plan).eval()
    a = encode(convert(spell(314), "messages"), tokenizer)
    b = encode(convert(spell(27), "messages"), tokenizer)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in (a, b)]
    [block] = pack(rows, 128)
    batch = DataCollator.for_tokenizer(tokenizer)([block])
    n, m = len(a.input_ids), len(b.input_ids)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone_a = model(input_ids=torch.tensor([a.input_ids])).logits[0]
        alone_b = model(input_ids=torch.tensor([b.input_ids])).logits[0]
        # Sensitivity check: with an all-ones attention mask the second example does see the first.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
    torch.testing.assert_close(packed[:n], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[n:n + m], alone_b, atol=1e-5, rtol=1e-4)
    assert (leaky[n:n + m] - alone_b).abs().max() > 1e-3


@pytest.mark.trainer
def test_build_datasets_split_has_no_leakage_and_is_deterministic(tmp_path, tokenizer):
    records = [spell(i) for i in range(100, 160)] + [spell(i) for i in range(100, 115)]  # 15 duplicates
    path = write_jsonl(tmp_path / "d.jsonl", records)
    first = _prepare(path, tokenizer, evalSplit=0.25)
    second = _prepare(path, tokenizer, evalSplit=0.25)
    train = {tuple(first.train[i]["input_ids"]) for i in range(len(first.train))}
    evals = {tuple(first.eval[i]["input_ids"]) for i in range(len(first.eval))}
    assert not train & evals, "an example is in both train and eval"
    assert len(evals) == 15  # round(0.25 x 60 distinct)
    assert first.report["trainExamples"] + first.report["evalExamples"] == 75
    assert first.report["duplicates"] == 15
    assert list(first.eval["input_ids"]) == list(second.eval["input_ids"])
    assert list(first.train["input_ids"]) == list(second.train["input_ids"])

    eval_path = write_jsonl(tmp_path / "eval.jsonl", [spell(i) for i in range(100, 105)])
    separate = _prepare(path, tokenizer, evalUri=str(eval_path))
    assert separate.report["evalOverlapDropped"] == 10  # 5 contents, each twice in the train file
    assert separate.report["evalExamples"] == 5 and separate.report["trainExamples"] == 65
    sep_eval = {tuple(x) for x in separate.eval["input_ids"]}
    assert not {tuple(x) for x in separate.train["input_ids"]} & sep_eval


@pytest.mark.trainer
def test_report_counts_truncation_duplicates_and_empty_answers(tmp_path, tokenizer, caplog):
    long_answer = " ".join(["seven eight nine"] * 40)
    records = [spell(i) for i in range(200, 220)]
    records += [spell(200), spell(201)]                                   # lines 21, 22: duplicates
    records += [spell(321, answer="")]                                    # line 23: empty answer
    records += [spell(5, answer=long_answer)]                             # line 24: truncated
    records += [msgs(("user", "x " * 200), ("assistant", "late answer"))]  # line 25: answer cut off entirely
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.data"):
        prepared = _prepare(path, tokenizer, maxSeqLength=48)
    report = prepared.report
    assert report["examples"] == 25 and report["format"] == "messages"
    assert report["duplicates"] == 2
    assert report["emptyAnswers"] == 1 and report["emptyAnswerLocations"] == [f"{path}:23"]
    assert report["truncated"] == 2 and report["truncatedLocations"] == [f"{path}:24", f"{path}:25"]
    assert report["droppedNoTargets"] == 1
    assert report["trainExamples"] == 23  # 25 - empty answer - answer truncated away
    assert report["tokens"]["max"] > 48 and report["maxSeqLength"] == 48
    assert all(len(ids) <= 48 for ids in prepared.train["input_ids"])
    assert report["trainTargetTokens"] == sum(sum(1 for t in labels if t != -100) for labels in
                                              prepared.train["labels"])
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "truncated 2 of" in warnings and f"{path}:24" in warnings
    assert "empty assistant answer" in warnings and f"{path}:23" in warnings


@pytest.mark.trainer
def test_data_error_fails_the_run_with_reason_file_and_line(tmp_path, tokenizer, monkeypatch):
    """Contract §5: a data error is a permanent failure (exit 3) whose summary names the file and line."""
    from kubetune_trainer import cli

    from ._support import make_plan, read_summary, use_trainer_env, write_plan

    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(str(model_dir))  # the run fails before the model's weights are loaded
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))  # it is a model directory
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(spell(12)) + "\n" + json.dumps(spell(13)) + "\nnot json\n")
    plan_path = write_plan(tmp_path / "plan.json", make_plan(model_dir, data, tmp_path / "out"))
    use_trainer_env(monkeypatch, tmp_path, plan_path)
    assert cli.run_worker() == cli.PERMANENT_FAILURE_EXIT
    summary = read_summary(tmp_path)
    assert summary["status"] == "Failed" and summary["reason"] == "DataError"
    assert f"{data}:3:" in summary["message"] and "invalid JSON" in summary["message"]


@pytest.mark.trainer
def test_packed_dataset_trains_through_the_recipe(tmp_path, monkeypatch):
    """packing: true end to end: packed blocks (position_ids, no attention mask) train and evaluate on CPU."""
    pytest.importorskip("peft")
    from kubetune_trainer import cli

    from ._support import build_model, make_plan, read_summary, use_trainer_env, write_dataset, write_plan

    model_dir = build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "d.jsonl", n=60)
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=3, microBatchSize=2, packing=True, maxSeqLength=96)
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    assert cli.run_worker() == 0, read_summary(tmp_path)
    summary = read_summary(tmp_path)
    report = json.loads((out / "final" / "metrics.json").read_text())["data"]
    assert report["packing"] is True
    assert 0 < report["packedTrainBlocks"] < report["trainExamples"] / 2
    assert summary["evalLoss"] is not None and summary["trainLoss"] is not None
    # Each step is 2 blocks of up to 96 tokens: more tokens per step than 2 unpacked examples would give.
    assert summary["tokens"] > 3 * 2 * report["tokens"]["max"]
