"""VRAM estimator accuracy: the sizer's per-GPU estimate against measured peak CUDA memory of real training.

    python bench/vram_accuracy.py [--dry-run] [--configs ID,ID,...] [--steps N] [--out PATH]

For each configuration (catalog architecture x method x sequence length x micro batch x gradient
checkpointing) the benchmark

1. builds the FineTuneJob spec the way a user would write it, parses it into the operator's typed spec
   (`kubetune.api.parse_spec`, which fills the defaults) and estimates the per-GPU memory exactly as the operator's
   sizer does (`setup_from_spec` + `estimate_memory` on the catalog architecture, single GPU);
2. renders the training plan with the operator's own `kubetune.builders.build_plan` (strategy none,
   one GPU) and validates it with the trainer's `parse_plan`;
3. trains a few optimizer steps with the trainer's `FineTuneRecipe` (load_base_model, apply_method,
   NativeEngine, the data pipeline: what `kubetune-train run` executes) on a model with random weights
   built from the catalog's config with transformers `from_config` (no hub), in its own subprocess
   (fresh CUDA context, clean peak statistics);
4. records `torch.cuda.max_memory_reserved()` / `max_memory_allocated()` over the whole run (setup and
   training) and the memory the process holds outside PyTorch's allocator (CUDA context, cuBLAS/cuDNN
   workspaces: device memory used by the process - memory reserved, via nvidia-smi before and after),
   and compares them with the estimate's `reserved`, `tensors` and `total`.

Target: every estimate within +-10% of the measurement and never under it by more than 5%, i.e.
-5% <= (estimate - measured) / measured <= +10%. `reserved` and `total` are graded (the sizer packs GPUs
by `total`); `tensors` vs allocated is reported for diagnosis.

Every sequence is exactly `maxSeqLength` tokens (plain-text examples longer than that, truncated; no
padding), which is the sequence length the estimator assumes. Without CUDA the benchmark refuses to run
(exit 2, nothing written); `--dry-run` builds the configurations, plans and estimates on any machine
and checks the estimator's parameter count against the model transformers builds (on the meta device).

Results: bench/results/vram_accuracy-<device-name-slug>.json (or --out) and a printed table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SCHEMA_VERSION = 1
NO_CUDA_MESSAGE = ("vram_accuracy: no CUDA GPU is available (torch.cuda.is_available() is False); this benchmark "
                   "measures real GPU memory and writes no results without one. Use --dry-run to print the "
                   "configurations and estimates.")
NO_CUDA_EXIT = 2
UNDER_LIMIT_PCT = -5.0  # an estimate may be at most 5% below the measurement
OVER_LIMIT_PCT = 10.0  # and at most 10% above it
GRADED = ("reserved", "total")
DEFAULT_STEPS = 3
GRAD_ACCUM = 2
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "the", "quick",
         "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "model", "task", "answer")

for _src in (REPO / "operator", REPO / "trainer_image"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration: catalog model, method and the training settings that cost memory."""

    id: str
    model: str  # sizing catalog name
    method: str  # full | lora | qlora
    seq_length: int
    micro_batch_size: int
    gradient_checkpointing: bool


def _cfg(model: str, method: str, seq: int, mbs: int, gc: bool) -> BenchConfig:
    return BenchConfig(f"{model}-{method}-s{seq}-b{mbs}-{'gc' if gc else 'nogc'}", model, method, seq, mbs, gc)


# Sized to fit an 80 GB H100 with room to spare (the largest estimate is ~60 GiB).
CONFIGS: tuple[BenchConfig, ...] = (
    _cfg("qwen2.5-0.5b", "full", 1024, 2, False),
    _cfg("qwen2.5-0.5b", "lora", 2048, 4, True),
    _cfg("qwen2.5-0.5b", "qlora", 2048, 2, True),
    _cfg("llama-3.2-1b", "full", 2048, 1, True),
    _cfg("llama-3.2-1b", "lora", 1024, 4, False),
    _cfg("llama-3.2-1b", "qlora", 4096, 1, True),
    _cfg("qwen2.5-1.5b", "lora", 4096, 2, True),
    _cfg("qwen2.5-1.5b", "qlora", 1024, 4, False),
    _cfg("llama-3.2-3b", "lora", 2048, 2, True),
    _cfg("llama-3.2-3b", "qlora", 2048, 4, True),
    _cfg("llama-3.2-3b", "full", 1024, 1, True),
)
CONFIGS_BY_ID = {c.id: c for c in CONFIGS}


# ----------------------------------------------------------------------------- pure helpers
def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def error_pct(estimate: int, measured: int) -> float:
    """(estimate - measured) / measured in percent."""
    if measured <= 0:
        raise ValueError(f"measured bytes must be positive, got {measured}")
    return (estimate - measured) / measured * 100.0


def within_target(err_pct: float) -> bool:
    """True when an estimate error is inside the accuracy target (-5% .. +10%)."""
    return UNDER_LIMIT_PCT <= err_pct <= OVER_LIMIT_PCT


def select_configs(ids: str | None) -> list[BenchConfig]:
    """The configurations named in a comma-separated list of ids or shell patterns (all when None/empty)."""
    if not ids:
        return list(CONFIGS)
    chosen: list[BenchConfig] = []
    for raw in ids.split(","):
        key = raw.strip()
        matches = [c for c in CONFIGS if fnmatch.fnmatchcase(c.id, key)]
        if not matches:
            raise SystemExit(f"vram_accuracy: unknown configuration {key!r}; known: {', '.join(CONFIGS_BY_ID)}")
        chosen.extend(c for c in matches if c not in chosen)
    return chosen


def bench_spec(cfg: BenchConfig, model_uri: str, data_uri: str, output_uri: str, steps: int) -> Any:
    """The typed FineTuneJob spec for a configuration (operator defaults for everything not set here)."""
    from kubetune.api import parse_spec

    # qlora needs its quantization block (the CRD requires it, with bits: 4); the rest of it is defaulted
    quantization = {"quantization": {"bits": 4}} if cfg.method == "qlora" else {}
    return parse_spec({
        "model": {"uri": model_uri},
        "dataset": {"uri": data_uri, "format": "text", "evalSplit": 0.0},
        "method": cfg.method,
        **quantization,
        "training": {"maxSteps": steps, "microBatchSize": cfg.micro_batch_size,
                     "gradientAccumulationSteps": GRAD_ACCUM, "maxSeqLength": cfg.seq_length,
                     "gradientCheckpointing": cfg.gradient_checkpointing, "precision": "bf16",
                     "learningRate": "1e-5", "checkpointEverySteps": 1_000_000},
        "resources": {"gpusPerPod": 1, "pods": 1},
        "output": {"uri": output_uri},
    })


def estimate_for(cfg: BenchConfig, spec: Any):
    """The operator's single-GPU estimate for the configuration (catalog architecture, bf16-capable GPU)."""
    from kubetune.sizing import Parallelism, estimate_memory, lookup_catalog, setup_from_spec

    arch = lookup_catalog(cfg.model)
    if arch is None:
        raise SystemExit(f"vram_accuracy: {cfg.model} is not in the sizing catalog")
    return estimate_memory(arch, setup_from_spec(spec, bf16_capable=True), Parallelism())


def plan_for(spec: Any) -> dict[str, Any]:
    """The plan JSON the operator renders for the spec on one GPU (strategy none), validated by the trainer."""
    from kubetune.builders import JobRef, build_plan
    from kubetune.sizing.layout import Layout
    from kubetune_trainer.plan import parse_plan

    plan = build_plan(JobRef("vram-accuracy", "bench", "0"), spec,
                      Layout(gpu_type="bench", gpus_per_pod=1, pods=1, strategy="none"))
    parse_plan(plan)
    return plan


def hf_config_dict(model: str, vocab_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json fields of a catalog model (the catalog's own config), with the tokenizer's special ids."""
    from kubetune.sizing import lookup_catalog

    arch = lookup_catalog(model)
    if arch is None:
        raise SystemExit(f"vram_accuracy: {model} is not in the sizing catalog")
    cfg = dict(arch.config)
    cfg.update(vocab_ids or {})
    return cfg


def hf_config(model: str, vocab_ids: dict[str, int] | None = None):
    """transformers config of a catalog model."""
    from transformers import AutoConfig

    cfg = hf_config_dict(model, vocab_ids)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def meta_param_count(model: str) -> int:
    """Parameters of the model transformers builds from the catalog config (on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf_config(model), dtype=torch.bfloat16)
    return sum(p.numel() for p in m.parameters())


def row_verdict(estimate: dict[str, int], measured: dict[str, int | None]) -> dict[str, Any]:
    """Errors (%) of each estimate against its measurement and the pass/fail of the graded ones."""
    out: dict[str, Any] = {"errorPct": {}, "withinTarget": {}}
    for key in ("tensors", "reserved", "total"):
        m = measured.get(key)
        if m:
            err = error_pct(estimate[key], int(m))
            out["errorPct"][key] = round(err, 2)
            out["withinTarget"][key] = within_target(err)
    graded = [out["withinTarget"].get(k) for k in GRADED]
    out["pass"] = all(v is True for v in graded)
    return out


# ----------------------------------------------------------------------------- assets
def write_text_dataset(path: Path, examples: int, seq_length: int, seed: int = 0) -> Path:
    """Distinct plain-text examples, each longer than `seq_length` tokens (so every row is truncated to it)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(examples):
            words = [f"{i}"] + [rng.choice(WORDS) for _ in range(2 * seq_length + 16)]
            fh.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def build_random_model(model: str, out: Path, device: str = "cuda", max_length: int = 32768) -> Path:
    """A catalog architecture with random weights (transformers init, bf16) and the local tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import tiny

    tok = tiny.build_tokenizer(None, model_max_length=max_length)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(hf_config(model, ids), dtype=torch.bfloat16)
    m.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "kubetune-vram-bench.json").write_text(json.dumps(
        {"model": model, "parameters": sum(p.numel() for p in m.parameters())}) + "\n")
    return out


# ----------------------------------------------------------------------------- GPU side (subprocesses)
def nvidia_smi_used_bytes(index: int = 0) -> int | None:
    """Device memory in use on GPU `index` according to nvidia-smi (None when it cannot be read)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[index].strip() if os.environ.get(
        "CUDA_VISIBLE_DEVICES") else str(index)
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", visible],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(float(out.strip().splitlines()[0])) * 1024 ** 2
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def probe() -> dict[str, Any]:
    """CUDA availability, device name and library versions (run in a subprocess: no context in the parent)."""
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"cuda": bool(torch.cuda.is_available()), "versions": {}}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed"):
        try:
            info["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info["versions"][pkg] = None
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(deviceName=torch.cuda.get_device_name(0), deviceMemoryBytes=int(props.total_memory),
                    cudaVersion=torch.version.cuda, deviceCount=torch.cuda.device_count(),
                    bf16=bool(torch.cuda.is_bf16_supported()))
    return info


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run the trainer's recipe on one configuration and return the measured memory (child process)."""
    baseline = nvidia_smi_used_bytes(0)  # before this process creates its CUDA context
    import math

    import torch

    from kubetune_trainer.plan import parse_plan
    from kubetune_trainer.recipe import FineTuneRecipe, RunEnv

    plan = parse_plan(job["plan"])
    recipe = FineTuneRecipe(plan, RunEnv(work_dir=Path(job["workDir"]), metrics_port=None))
    t0 = time.time()
    recipe.setup()
    torch.cuda.synchronize()
    setup = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
             "seconds": round(time.time() - t0, 2)}
    torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    result = recipe.train()
    torch.cuda.synchronize()
    train = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
             "seconds": round(time.time() - t1, 2)}
    free, total = torch.cuda.mem_get_info()
    after = nvidia_smi_used_bytes(0)
    reserved_now = torch.cuda.memory_reserved()
    outside = None
    if baseline is not None and after is not None:
        outside = max(0, after - baseline - reserved_now)
    n_train = sum(p.numel() for p in recipe.engine.raw_model.parameters() if p.requires_grad)
    losses = [h["loss"] for h in result.history]
    t = plan.training
    out = {
        "peakAllocatedBytes": max(setup["allocated"], train["allocated"]),
        "peakReservedBytes": max(setup["reserved"], train["reserved"]),
        "setup": setup, "training": train,
        "outsideAllocatorBytes": outside,
        "deviceUsedBaselineBytes": baseline, "deviceUsedAfterBytes": after,
        "memGetInfoUsedBytes": int(total - free),
        "trainableParams": int(n_train),
        "steps": result.step, "tokens": result.tokens,
        "expectedTokens": t.max_steps * t.gradient_accumulation_steps * t.micro_batch_size * t.max_seq_length,
        "losses": losses, "lossesFinite": all(math.isfinite(x) for x in losses),
        "precision": recipe.precision,
        "attnImplementation": getattr(recipe.engine.raw_model.config, "_attn_implementation", None),
    }
    recipe.cleanup()
    return out


def _child_main(argv: Sequence[str]) -> int:
    """Hidden entry points for the subprocesses: --_probe, --_build MODEL DIR, --_measure JOB.json OUT.json."""
    if argv[0] == "--_probe":
        print(json.dumps(probe()))
        return 0
    if argv[0] == "--_build":
        build_random_model(argv[1], Path(argv[2]))
        return 0
    if argv[0] == "--_measure":
        job = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(measure(job), indent=2))
        return 0
    raise SystemExit(f"unknown internal command {argv[0]}")


def _run_child(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBETUNE_METRICS_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image"),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_probe() -> dict[str, Any]:
    """CUDA availability and versions from a fresh subprocess."""
    proc = _run_child(["--_probe"], timeout=300, env=_child_env())
    if proc.returncode != 0:
        raise SystemExit(f"vram_accuracy: the CUDA probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- orchestration
def dry_run_rows(configs: list[BenchConfig], steps: int) -> list[dict[str, Any]]:
    """Configurations, validated plans and estimates (no GPU needed)."""
    from kubetune.sizing import lookup_catalog

    counts: dict[str, tuple[int, int]] = {}
    rows = []
    for cfg in configs:
        spec = bench_spec(cfg, f"/models/{cfg.model}", "/data/train.jsonl", "/out", steps)
        est = estimate_for(cfg, spec)
        plan_for(spec)
        if cfg.model not in counts:
            counts[cfg.model] = (lookup_catalog(cfg.model).total_params(), meta_param_count(cfg.model))
        rows.append({"config": asdict(cfg), "estimate": est.breakdown() | {"tensors": est.tensors,
                                                                           "reserved": est.reserved},
                     "totalParams": est.total_params, "trainableParams": est.trainable_params,
                     "builtParams": counts[cfg.model][1]})
    return rows


def measure_rows(configs: list[BenchConfig], steps: int, workdir: Path, timeout: float,
                 model_cache: Path) -> list[dict[str, Any]]:
    """Build each needed model once, then measure every configuration in its own subprocess."""
    env = _child_env()
    rows: list[dict[str, Any]] = []
    built: dict[str, Path] = {}
    for cfg in configs:
        row: dict[str, Any] = {"config": asdict(cfg)}
        rows.append(row)
        model_dir = model_cache / cfg.model
        if cfg.model not in built:
            if not (model_dir / "kubetune-vram-bench.json").is_file():
                shutil.rmtree(model_dir, ignore_errors=True)
                t0 = time.time()
                proc = _run_child(["--_build", cfg.model, str(model_dir)], timeout=timeout, env=env)
                if proc.returncode != 0:
                    row.update(status="error", error=f"building {cfg.model} failed: {proc.stderr[-2000:]}")
                    print(f"[{cfg.id}] model build failed", file=sys.stderr)
                    continue
                print(f"[{cfg.model}] random-weight model built in {time.time() - t0:.0f}s", file=sys.stderr)
            built[cfg.model] = model_dir
        run_dir = workdir / cfg.id
        run_dir.mkdir(parents=True, exist_ok=True)
        n_examples = steps * GRAD_ACCUM * cfg.micro_batch_size + 2
        data = write_text_dataset(run_dir / "train.jsonl", n_examples, cfg.seq_length)
        spec = bench_spec(cfg, str(model_dir), str(data), str(run_dir / "out"), steps)
        est = estimate_for(cfg, spec)
        plan = plan_for(spec)
        row["estimate"] = est.breakdown() | {"tensors": est.tensors, "reserved": est.reserved}
        row["estimatedTrainableParams"] = est.trainable_params
        job = {"plan": plan, "workDir": str(run_dir / "work")}
        (run_dir / "job.json").write_text(json.dumps(job))
        t0 = time.time()
        try:
            proc = _run_child(["--_measure", str(run_dir / "job.json"), str(run_dir / "measured.json")],
                              timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            row.update(status="error", error=f"timed out after {timeout:.0f}s")
            continue
        row["wallSeconds"] = round(time.time() - t0, 1)
        if proc.returncode != 0:
            tail = proc.stderr[-3000:]
            row.update(status="oom" if "OutOfMemoryError" in tail else "error", error=tail)
            print(f"[{cfg.id}] failed (exit {proc.returncode})", file=sys.stderr)
            continue
        m = json.loads((run_dir / "measured.json").read_text())
        row["measured"] = m
        measured = {"tensors": m["peakAllocatedBytes"], "reserved": m["peakReservedBytes"],
                    "total": (m["peakReservedBytes"] + m["outsideAllocatorBytes"]
                              if m["outsideAllocatorBytes"] is not None else None)}
        row["measuredTotalBytes"] = measured["total"]
        row.update(row_verdict(row["estimate"], measured))
        problems = []
        if m["tokens"] != m["expectedTokens"]:
            problems.append(f"trained {m['tokens']} tokens, expected {m['expectedTokens']} (rows not full length)")
        if not m["lossesFinite"]:
            problems.append("non-finite loss")
        if m["trainableParams"] != est.trainable_params:
            problems.append(f"trainable parameters {m['trainableParams']} != estimated {est.trainable_params}")
        if measured["total"] is None:
            problems.append("nvidia-smi unavailable: total (with CUDA context) not measured")
        row["problems"] = problems
        row["status"] = "ok"
        if any(not p.startswith("nvidia-smi") for p in problems):
            row["pass"] = False
        print(f"[{cfg.id}] {format_row(row)}", file=sys.stderr)
    return rows


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024 ** 3:7.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+6.1f}%"


def format_row(row: dict[str, Any]) -> str:
    """One table line of a measured row."""
    if row.get("status") != "ok":
        return f"{row['config']['id'] if 'id' in row['config'] else ''} {row.get('status', 'error').upper()}"
    est, m, err = row["estimate"], row["measured"], row["errorPct"]
    return (f"alloc {_gib(m['peakAllocatedBytes'])} est {_gib(est['tensors'])} {_pct(err.get('tensors'))} | "
            f"reserved {_gib(m['peakReservedBytes'])} est {_gib(est['reserved'])} {_pct(err.get('reserved'))} | "
            f"total {_gib(row['measuredTotalBytes'])} est {_gib(est['total'])} {_pct(err.get('total'))} | "
            f"{'PASS' if row['pass'] else 'FAIL'}")


def print_table(rows: list[dict[str, Any]], measured: bool) -> None:
    """The human-readable table (GiB)."""
    head = f"{'configuration':42s} {'params':>7s} "
    if not measured:
        print(head + f"{'weights':>8s} {'grads':>8s} {'optim':>8s} {'acts':>8s} {'logits':>8s} {'frag':>8s} "
              f"{'reserved':>9s} {'total':>8s}  (estimate, GiB)")
        for r in rows:
            e = r["estimate"]
            print(f"{r['config']['id']:42s} {r['totalParams'] / 1e9:6.2f}B "
                  f"{_gib(e['weights'] + e['masterWeights'])} {_gib(e['gradients'])} {_gib(e['optimizerStates'])} "
                  f"{_gib(e['activations'])} {_gib(e['logits'])} {_gib(e['fragmentation'])}  {_gib(e['reserved'])} "
                  f"{_gib(e['total'])}")
        return
    print(f"{'configuration':42s} measured vs estimate (GiB, error %)")
    for r in rows:
        print(f"{r['config']['id']:42s} {format_row(r)}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--_"):
        return _child_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the configurations and estimates (and check the parameter counts); no GPU")
    parser.add_argument("--configs", default="",
                        help="comma-separated configuration ids or patterns, e.g. 'qwen*' (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the configuration ids and exit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the rows as JSON instead of a table")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per configuration")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    parser.add_argument("--model-cache", default="", help="keep the random-weight models here (default: temp)")
    parser.add_argument("--out", default="", help="results JSON (default bench/results/vram_accuracy-<gpu>.json)")
    args = parser.parse_args(argv)
    configs = select_configs(args.configs)
    if args.list:
        print("\n".join(c.id for c in configs))
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the optimizer states exist from the first step on)")
    if args.dry_run:
        rows = dry_run_rows(configs, args.steps)
        bad = [r["config"]["id"] for r in rows if r["builtParams"] != r["totalParams"]]
        if args.json:
            print(json.dumps({"dryRun": True, "stepsPerConfig": args.steps, "rows": rows}, indent=2))
        else:
            print_table(rows, measured=False)
            print(f"{len(rows)} configurations; methods {sorted({r['config']['method'] for r in rows})}; "
                  f"models {sorted({r['config']['model'] for r in rows})}; parameter counts "
                  f"{'differ' if bad else 'match'} the models transformers builds; dry run, nothing trained or written")
        if bad:
            print(f"parameter count of the built model differs from the estimator's for: {', '.join(bad)}",
                  file=sys.stderr)
            return 1
        return 0

    info = run_probe()
    if not info["cuda"]:
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return NO_CUDA_EXIT
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vram-accuracy-") as tmp:
        cache = Path(args.model_cache) if args.model_cache else Path(tmp) / "models"
        cache.mkdir(parents=True, exist_ok=True)
        rows = measure_rows(configs, args.steps, Path(tmp) / "runs", args.timeout, cache)
    print_table(rows, measured=True)
    passed = sum(1 for r in rows if r.get("pass"))
    out = Path(args.out) if args.out else RESULTS_DIR / f"vram_accuracy-{device_slug(info['deviceName'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schemaVersion": SCHEMA_VERSION,
        "benchmark": "vram_accuracy",
        "command": " ".join([Path(sys.executable).name, "bench/vram_accuracy.py", *argv]),
        "createdAt": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wallSeconds": round(time.time() - started, 1),
        "device": {k: info.get(k) for k in ("deviceName", "deviceMemoryBytes", "cudaVersion", "deviceCount", "bf16")},
        "versions": info["versions"] | {"python": platform.python_version()},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "target": {"underLimitPct": UNDER_LIMIT_PCT, "overLimitPct": OVER_LIMIT_PCT, "graded": list(GRADED),
                   "errorDefinition": "(estimate - measured) / measured * 100"},
        "stepsPerConfig": args.steps, "gradientAccumulationSteps": GRAD_ACCUM,
        "summary": {"configs": len(rows), "passed": passed,
                    "failed": len(rows) - passed},
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{passed}/{len(rows)} configurations within the target; results: {out}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
