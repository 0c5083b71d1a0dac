"""Shared helpers for the trainer tests: a tiny learnable model, a toy dataset and plan builders."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def build_model(out: Path, hidden: int = 64, layers: int = 2, init_range: float = 0.3, seed: int = 0) -> Path:
    """A tiny llama with the local tokenizer. A larger init range than HF's 0.02 gives the frozen
    lm_head/final norm enough dynamic range that LoRA alone can fit the toy task."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import tiny

    tok = tiny.build_tokenizer(None, model_max_length=256)
    cfg = tiny.tiny_config("llama", len(tok), hidden, layers, 4, 2, None, 256,
                           tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    cfg.initializer_range = init_range
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def write_dataset(path: Path, n: int = 200, seed: int = 0, poison: bool = False) -> Path:
    """Spell-out task in `messages` format: 'Spell out: 3 1' → 'three one'."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            digits = [rng.randrange(10) for _ in range(rng.randint(2, 4))]
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": "Spell out: " + " ".join(map(str, digits))},
                {"role": "assistant", "content": " ".join(WORDS[d] for d in digits)},
            ]}) + "\n")
    return path


def make_plan(model_dir: Path, data: Path, out: Path, method: str = "lora", **training) -> dict:
    """A plan dict (contracts §2) for the toy task; `training` overrides training fields."""
    plan = {
        "version": 1,
        "job": {"name": "test", "namespace": "default", "uid": "0"},
        "model": {"uri": str(model_dir), "trustRemoteCode": False},
        "dataset": {"uri": str(data), "format": "auto", "evalUri": "", "evalSplit": 0.1},
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]} if method != "full" else None,
        "quantization": ({"bits": 4, "quantType": "nf4", "doubleQuant": True, "computeDtype": "float32"}
                         if method == "qlora" else None),
        "training": {
            "epochs": 0, "maxSteps": 60, "learningRate": 1e-2, "microBatchSize": 8, "gradientAccumulationSteps": 1,
            "maxSeqLength": 64, "packing": False, "warmupRatio": 0.05, "scheduler": "constant_with_warmup",
            "optimizer": "adamw", "weightDecay": 0.0, "maxGradNorm": 1.0, "gradientCheckpointing": False,
            "precision": "auto", "seed": 42, "completionOnly": True, "checkpointEverySteps": 1000,
            "evalEverySteps": 0, "earlyStopping": {"patience": 0, "threshold": 0.0},
        },
        "distributed": {"strategy": "none", "zeroStage": 0, "offloadOptimizer": False, "offloadParams": False,
                        "numNodes": 1, "procsPerNode": 1},
        "output": {"uri": str(out), "mergeAdapter": False},
    }
    if plan["lora"] is None:
        del plan["lora"]
    plan["training"].update(training)
    return plan


def write_plan(path: Path, plan: dict) -> Path:
    """Write a plan JSON file."""
    path.write_text(json.dumps(plan, indent=2))
    return path


def trainer_env(tmp: Path, plan_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a `kubetune-train` process (contracts §3) rooted in `tmp`."""
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBETUNE_METRICS_PORT"):
        env.pop(key, None)
    env.update({
        "KUBETUNE_PLAN": str(plan_path),
        "KUBETUNE_WORK_DIR": str(tmp / "work"),
        "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
        "KUBETUNE_PVC_ROOT": str(tmp / "pvc"),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO / "trainer_image") + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.update(extra)
    return env


def run_trainer(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m kubetune_trainer.cli ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "kubetune_trainer.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_summary(tmp: Path) -> dict:
    """The termination summary a run wrote."""
    return json.loads((tmp / "termination-log").read_text())


def losses(metrics: dict) -> list[float]:
    """Per-step train losses from final/metrics.json."""
    return [h["loss"] for h in metrics["history"]]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_trainer_env(monkeypatch, tmp: Path, plan_path: Path) -> dict[str, str]:
    """Set this process's environment as `trainer_env` describes (for running `cli.run_worker()` in-process)."""
    env = trainer_env(tmp, plan_path)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBETUNE_METRICS_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key in ("KUBETUNE_PLAN", "KUBETUNE_WORK_DIR", "KUBETUNE_TERMINATION_LOG", "KUBETUNE_PVC_ROOT",
                "DS_ACCELERATOR"):
        monkeypatch.setenv(key, env[key])
    return env
