"""`kubetune estimate` end to end through the dispatcher (no cluster)."""

from __future__ import annotations

import json
import textwrap

import pytest

from kubetune.cli import main as kubetune_main

pytestmark = pytest.mark.unit

JOB = textwrap.dedent("""
    apiVersion: kubetune.io/v1alpha1
    kind: FineTuneJob
    metadata: {name: q70}
    spec:
      model: {uri: hf://meta-llama/Llama-3.1-70B-Instruct}
      dataset: {uri: pvc://data/train.jsonl}
      method: qlora
      quantization: {bits: 4}
      output: {uri: pvc://outputs/q70}
""")


def test_breakdown_for_catalog_model(capsys):
    assert kubetune_main(["estimate", "hf://meta-llama/Llama-3.1-8B", "--method", "full", "--gpus", "8",
                          "--strategy", "zero3"]) == 0
    out = capsys.readouterr().out
    for term in ("weights", "fp32 master weights", "optimizer states", "activations", "logits", "CUDA context",
                 "total per GPU", "ZeRO-3 over 8 GPUs"):
        assert term in out


def test_json_output_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}))
    assert kubetune_main(["estimate", "--config", str(cfg), "--method", "lora", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["breakdownBytes"]["total"] == sum(v for k, v in data["breakdownBytes"].items() if k != "total")


def test_table(capsys):
    assert kubetune_main(["estimate", "--table"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["model", "full", "lora", "qlora"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:4]] for line in lines[1:]}
    assert {"llama-3.1-8b", "llama-3.1-70b"} <= set(rows)
    for full, lora, qlora in rows.values():
        assert full > lora > qlora


def test_manifest_against_gpu_shorthand(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(JOB)
    assert kubetune_main(["estimate", "-f", str(f), "--gpu", "NVIDIA-L4:1x4", "--gpu", "H100-80GB:8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = data["jobs"][0]["plan"]
    assert plan["fits"] and plan["gpuType"] == "H100-80GB" and plan["totalGpus"] == 1
    # nothing fits on L4s only: exit code 1 and a suggestion
    assert kubetune_main(["estimate", "-f", str(f), "--gpu", "NVIDIA-L4:1"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "suggestion:" in out


def test_manifest_against_fleet_file(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(JOB)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(textwrap.dedent("""
        apiVersion: v1
        kind: List
        items:
          - apiVersion: v1
            kind: Node
            metadata:
              name: a100-0
              labels: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB, nvidia.com/gpu.memory: "81920"}
            status: {allocatable: {nvidia.com/gpu: "8", memory: 1000Gi}}
    """))
    assert kubetune_main(["estimate", "-f", str(f), "--fleet", str(fleet)]) == 0
    assert "NVIDIA-A100-SXM4-80GB" in capsys.readouterr().out


def test_errors_are_plain(capsys):
    assert kubetune_main(["estimate", "hf://acme/unknown"]) == 2
    assert "not in the sizing catalog" in capsys.readouterr().err
