"""The settings other trainers' configs carry, through the real recipe on CPU with a tiny model: warmupSteps shapes
the learning rate, logEverySteps the log, checkpointStrategy and keepCheckpoints the checkpoints on disk,
dataset.chatTemplate the rendered text (an invalid one is InvalidPlan before any data is read, naming the line), and
dataset.promptTemplate turns arbitrary records into masked prompt + trained completion."""

from __future__ import annotations

import json
import logging
import re

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubetune_trainer import checkpoints, cli  # noqa: E402
from kubetune_trainer.data import chat_templates  # noqa: E402
from kubetune_trainer.data.pipeline import load_examples  # noqa: E402
from kubetune_trainer.data.templating import IGNORE_INDEX, encode  # noqa: E402
from kubetune_trainer.errors import DataError  # noqa: E402
from kubetune_trainer.plan import parse_plan  # noqa: E402
from kubetune_trainer.recipe import FineTuneRecipe, RunEnv  # noqa: E402

from ._support import (WORDS, build_model, make_plan, read_summary, use_trainer_env, write_dataset,  # noqa: E402
                       write_plan)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl", n=48)


def train(tmp_path, monkeypatch, plan: dict) -> tuple[FineTuneRecipe, dict]:
    """setup → train → export in this process; returns the recipe and final/metrics.json."""
    plan_path = write_plan(tmp_path / "plan.json", plan)
    use_trainer_env(monkeypatch, tmp_path, plan_path)
    recipe = FineTuneRecipe(parse_plan(plan), RunEnv.from_env())
    try:
        recipe.setup()
        recipe.train()
        recipe.export()
    finally:
        recipe.cleanup()
    return recipe, json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())


def _steps_on_disk(out) -> list[int]:
    return [step for step, _ in checkpoints.complete_checkpoints(out / "checkpoints")]


def test_warmup_steps_logging_interval_and_checkpoint_retention(assets, tmp_path, monkeypatch, caplog):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=12, scheduler="linear",
                     warmupSteps=5, logEverySteps=4, checkpointEverySteps=3, keepCheckpoints=1)
    del plan["training"]["warmupRatio"]
    with caplog.at_level(logging.INFO, logger="kubetune_trainer"):
        _, metrics = train(tmp_path, monkeypatch, plan)
    lrs = [h["lr"] for h in metrics["history"]]
    peak = plan["training"]["learningRate"]
    # linear warmup over exactly 5 steps: lr before step k+1 is k/5 of the peak, then linear decay to 0 at step 12
    assert lrs[:6] == pytest.approx([peak * k / 5 for k in range(6)])
    assert lrs[6] == pytest.approx(peak * 6 / 7) and lrs[-1] < lrs[6]
    logged = [int(m.group(1)) for m in re.finditer(r"step (\d+)/12 ", caplog.text)]
    assert logged == [4, 8, 12], caplog.text
    # checkpoints at steps 3, 6, 9 (none at the last step: the final export follows); keepCheckpoints 1 leaves 9
    assert _steps_on_disk(tmp_path / "out") == [9]


def test_epoch_checkpoints_and_keep_every_checkpoint(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=0, epochs=3, checkpointStrategy="epoch",
                     checkpointEverySteps=1, keepCheckpoints=0)
    recipe, metrics = train(tmp_path, monkeypatch, plan)
    per_epoch = recipe.micro_per_epoch // plan["training"]["gradientAccumulationSteps"]
    assert metrics["totalSteps"] == 3 * per_epoch
    # one checkpoint at the end of each epoch but the last (checkpointEverySteps 1 is not used), all kept
    assert _steps_on_disk(tmp_path / "out") == [per_epoch, 2 * per_epoch]


def test_prune_never_deletes_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tmp = checkpoints.prepare_temp(root, step)
        checkpoints.write_state(tmp, {"step": step})
        checkpoints.publish(root, step)
    checkpoints.prepare_temp(root, 8)  # a save in progress: not complete, so step 6 is what a restart needs
    assert [p.name for p in checkpoints.prune(root, 1)] == ["step-2", "step-4"]
    assert _steps_on_disk(tmp_path) == [6] and (root / ".tmp-step-8").is_dir()
    assert checkpoints.prune(root, 0) == [] and _steps_on_disk(tmp_path) == [6]


def test_a_named_chat_template_is_what_the_data_and_the_exported_tokenizer_use(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["dataset"]["chatTemplate"] = "chatml"
    recipe, metrics = train(tmp_path, monkeypatch, plan)
    assert metrics["data"]["chatTemplate"] == "chatml" and metrics["data"]["chatTemplateAdded"] is False
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "final" / "adapter"))
    assert exported.chat_template == chat_templates.NAMED_TEMPLATES["chatml"]
    rendered = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", sorted(chat_templates.NAMED_TEMPLATES))
def test_every_named_template_masks_the_prompt(assets, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets[0]))
    chat_templates.apply_override(tok, name)
    (conv,) = load_examples(assets[1])[:1]
    enc = encode(conv, tok, completion_only=True)
    trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
    assert conv.assistant_answers()[0] in trained and "Spell out" not in trained


def test_an_invalid_inline_template_fails_before_training_with_the_line(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["dataset"]["chatTemplate"] = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    code = cli.run_worker()
    summary = read_summary(tmp_path)
    assert code == 3 and summary["reason"] == "InvalidPlan", summary
    assert "dataset.chatTemplate" in summary["message"] and "line 2" in summary["message"]
    assert "TemplateSyntaxError" in summary["message"]
    assert not (tmp_path / "out" / "final").exists()


def _qa_dataset(path, n: int = 48):
    rows = []
    for i in range(n):
        digits = [(i * 7 + k) % 10 for k in range(2 + i % 3)]
        rows.append({"question": " ".join(map(str, digits)), "answer": " ".join(WORDS[d] for d in digits), "id": i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_template_masks_the_prompt_and_trains(assets, tmp_path, monkeypatch):
    model_dir, _ = assets
    data = _qa_dataset(tmp_path / "qa.jsonl")
    template = {"prompt": "Spell out #{id}: {question}\nAnswer: ", "completion": "{answer}"}
    (first,) = load_examples(data, "auto", template)[:1]
    assert first.text == "Spell out #0: 0 1\nAnswer: zero one"
    assert first.prompt_chars == len("Spell out #0: 0 1\nAnswer: ")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = encode(first, tok, completion_only=True)
    trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX],
                         skip_special_tokens=True)
    assert trained.strip() == "zero one"
    everything = encode(first, tok, completion_only=False)
    assert IGNORE_INDEX not in everything.labels

    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=30)
    plan["dataset"]["promptTemplate"] = template
    _, metrics = train(tmp_path, monkeypatch, plan)
    assert metrics["data"]["format"] == "promptTemplate" and metrics["data"]["chatTemplateAdded"] is False
    assert metrics["data"]["trainTargetTokens"] < metrics["data"]["trainTokens"]  # the prompts are masked
    assert metrics["trainLoss"] < metrics["initialTrainLoss"]


def test_prompt_template_names_the_missing_field_and_line(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1", "answer": "one"}) + "\n" + json.dumps({"question": "2"}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(data, "auto", {"prompt": "{question} = ", "completion": "{answer}"})
    assert "missing field 'answer'" in str(err.value) and ":2" in str(err.value)
