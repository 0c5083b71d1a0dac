"""`kubetune convert`: golden files (tests/data/convert/<case>/input.{yaml,json} [+ args.yaml] -> expected.yaml)
written from the documented options of Axolotl, TRL and LLaMA-Factory; every output is a valid spec, and every
setting without an equivalent is listed by name with its reason."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from kubetune.api import parse_spec
from kubetune.convert import ConvertError, Options, convert, convert_file
from kubetune.convert.cli import main as convert_main

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "convert"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def _options(case_dir: Path) -> Options:
    args = yaml.safe_load((case_dir / "args.yaml").read_text()) if (case_dir / "args.yaml").exists() else {}
    return Options(**{"name": case_dir.name, **args})


def _input(case_dir: Path) -> Path:
    (found,) = [p for p in case_dir.iterdir() if p.stem == "input"]
    return found


def converted(case: str):
    case_dir = DATA / case
    return convert_file(_input(case_dir), _options(case_dir))


def test_there_are_cases_for_every_source_format():
    assert {c.split("-")[0] for c in CASES} == {"axolotl", "trl", "llamafactory"}
    assert any(_input(DATA / c).suffix == ".json" for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_conversion_matches_golden(case):
    text = converted(case).render()
    expected = DATA / case / "expected.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        expected.write_text(text)
    assert expected.exists(), f"{expected} missing: run with KUBETUNE_UPDATE_GOLDEN=1 to create it"
    assert text == expected.read_text(), f"conversion of {case} changed; rerun with KUBETUNE_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("case", CASES)
def test_every_converted_job_is_a_valid_spec(case):
    manifest = yaml.safe_load((DATA / case / "expected.yaml").read_text())
    assert manifest["kind"] == "FineTuneJob" and len(manifest["metadata"]["name"]) <= 52
    spec = parse_spec(manifest["spec"])
    assert spec.dump()["training"]["optimizer"] in ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


# Keys whose removal changes nothing because they say what the FineTuneJob does anyway (key: why).
AGREEING = {
    "plugins": "the Liger plugin; each liger_* flag also turns ligerKernels on",
    "liger_rms_norm": "any one Liger flag turns ligerKernels on", "liger_glu_activation": "same",
    "liger_fused_linear_cross_entropy": "same",
    "load_in_4bit": "adapter: qlora already means a 4-bit base",
    "finetuning_type": "lora is LLaMA-Factory's default and the converter's",
    "eval_strategy": "steps: evaluation every eval_steps, as evalEverySteps says",
    "dataset_name": "replaced by --dataset-uri (the case's args.yaml)",
    "num_train_epochs": "1 epoch is the FineTuneJob default",
    "lora_task_type": "CAUSAL_LM is what adapters are trained for",
}


@pytest.mark.parametrize("case", CASES)
def test_every_setting_is_expressed_or_listed(case):
    """Each non-null top-level input key either changed the spec or is listed with a reason: converting the config
    without that key gives another spec or another list of dropped settings (or the key agrees with the default)."""
    case_dir = DATA / case
    from kubetune.convert import load

    config = {k: v for k, v in load(_input(case_dir).read_text(), _input(case_dir).name).items() if v is not None}
    full = convert(config, _options(case_dir))
    silent = []
    for key in config:
        rest = {k: v for k, v in config.items() if k != key}
        try:
            without = convert(rest, _options(case_dir))
        except ConvertError:
            continue  # a required setting
        if without.manifest() == full.manifest() and without.dropped == full.dropped and config[key] not in (
                False, "none", "auto") and key not in ("do_train", "stage", *AGREEING):
            silent.append(key)
    assert not silent, f"{case}: settings neither expressed nor listed: {silent}"


def test_unknown_axolotl_keys_are_reported_by_name():
    draft = converted("axolotl-chatml-lora")
    unknown = [d for d in draft.dropped if d.reason.startswith("unknown Axolotl key")]
    assert [d.key for d in unknown] == ["lora_droput"]
    assert "lora_droput: 0.1 -- unknown Axolotl key" in draft.render()


def test_aliases_become_canonical_names():
    jobs = {case: yaml.safe_load((DATA / case / "expected.yaml").read_text())["spec"]["training"] for case in CASES}
    assert jobs["axolotl-chatml-lora"]["optimizer"] == "adamw_8bit"       # adamw_bnb_8bit
    assert jobs["trl-sft-lora-json"]["optimizer"] == "adamw"              # adamw_torch_fused
    assert jobs["axolotl-custom-prompt"]["optimizer"] == "adamw"          # adamw_torch_fused
    assert jobs["trl-qlora-yaml"]["optimizer"] == "paged_adamw_8bit"


def test_a_local_model_path_needs_a_uri():
    with pytest.raises(ConvertError, match="--model-uri"):
        convert({"base_model": "/models/llama", "datasets": [{"path": "org/data", "type": "alpaca"}]})
    draft = convert({"base_model": "/models/llama", "datasets": [{"path": "org/data", "type": "alpaca"}]},
                    Options(model_uri="pvc://models/llama"))
    assert draft.manifest()["spec"]["model"]["uri"] == "pvc://models/llama"


def test_local_data_and_dataset_names_need_a_uri():
    with pytest.raises(ConvertError, match="--dataset-uri"):
        convert({"base_model": "org/m", "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}]})
    with pytest.raises(ConvertError, match="dataset_info.json"):
        convert({"model_name_or_path": "org/m", "stage": "sft", "dataset": "alpaca_en_demo"})


def test_what_cannot_be_a_finetunejob_is_refused():
    with pytest.raises(ConvertError, match="stage 'dpo'"):
        convert({"model_name_or_path": "org/m", "stage": "dpo"}, Options(dataset_uri="pvc://d/x.jsonl"))
    with pytest.raises(ConvertError, match="freeze"):
        convert({"model_name_or_path": "org/m", "finetuning_type": "freeze"}, Options(dataset_uri="pvc://d/x.jsonl"))
    with pytest.raises(ConvertError, match="cannot tell"):
        convert({"epochs": 3})


def test_the_command(tmp_path, capsys):
    case_dir = DATA / "trl-qlora-yaml"
    out = tmp_path / "job.yaml"
    args = [str(_input(case_dir)), "--name", "llama31-qlora", "--dataset-uri", "pvc://data/llama31/train.jsonl"]
    assert convert_main(args + ["-o", str(out)]) == 0
    assert out.read_text() == (case_dir / "expected.yaml").read_text()
    assert "not expressed: logging_stratgy" in capsys.readouterr().err
    assert convert_main(args + ["-o", str(out), "--strict"]) == 1
    assert convert_main([str(_input(case_dir))]) == 2  # a local dataset path without --dataset-uri
    assert "--dataset-uri" in capsys.readouterr().err
    assert convert_main([str(_input(DATA / "trl-sft-lora-json")), "--from", "trl"]) == 0
    assert "kind: FineTuneJob" in capsys.readouterr().out


def test_the_readme_example_is_what_the_command_prints():
    """README "Coming from Axolotl, TRL or Unsloth": the config shown, converted with the command shown, gives the
    FineTuneJob shown."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Coming from Axolotl, TRL or Unsloth", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(yaml|sh)\n(.*?)```", section, re.S)
    (source, command, shown) = [text for _, text in blocks[:3]]
    assert [kind for kind, _ in blocks[:3]] == ["yaml", "sh", "yaml"]
    name = re.search(r"--name (\S+)", command).group(1)
    assert convert(yaml.safe_load(source), Options(name=name)).render() == shown
    parse_spec(yaml.safe_load(shown)["spec"])
