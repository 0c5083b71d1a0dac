"""On a CUDA GPU: measured peak memory and tokens/s of the kubetune trainer and of the plain transformers + peft
step, beside the GPU-free trace (bench/memory.py) and the analytic estimate (`kubetune estimate`) of the same
configuration.

    ~/.cache/kubetune/venv/bin/python bench/memory_gpu.py --dry-run          # any machine: plans, estimates, traces
    python bench/memory_gpu.py --configs 'qwen2.5-0.5b-*'                    # on the GPU (scripts/gpu-checks.sh memory)
    python bench/memory_gpu.py --list

Per configuration (a catalog model with random weights built from its config, the local tiny tokenizer; micro
batch 2, unpacked rows of exactly maxSeqLength tokens, one micro-batch per step, gradient checkpointing):

- **estimate**: the operator's single-GPU estimate (`kubetune.sizing.estimate_memory`) of the FineTuneJob spec.
- **trace**: `kubetune_trainer.memtrace` of the trainer's step on the plan the operator renders for that spec,
  and bench/memory.py's trace of the plain step (CPU, fake tensors).
- **measured** (CUDA only, each side in its own process: fresh CUDA context and peak statistics):
  `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` over setup and training and tokens/s over all
  steps (step 1 included, on both sides) of (a) `FineTuneRecipe` on that plan (bench/vram_accuracy.py's
  measurement) and (b) bench/memory_baseline.py on the same model, batch shape and steps.

Without CUDA it exits 2 with a message and writes nothing (use --dry-run). Writes
bench/results/memory_gpu-<gpu>.json (or --out): every measured figure comes from the run that wrote the file.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "operator", REPO / "trainer_image", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import memory as mem  # noqa: E402  (bench/memory.py)

GiB = 1024 ** 3
SCHEMA_VERSION = 1
DEFAULT_STEPS = 6
NO_CUDA_EXIT = 2
NO_CUDA_MESSAGE = ("memory_gpu: no CUDA GPU is available (torch.cuda.is_available() is False); this benchmark "
                   "measures GPU memory and speed and writes nothing without one. Use --dry-run for the plans, "
                   "estimates and traces, or bench/memory.py for the GPU-free comparison.")


def _case(model: str, method: str, seq: int) -> mem.Case:
    return mem.Case(id=f"{model}-{method}-mbs2-seq{seq}", model=model, method=method, micro_batch_size=2,
                    seq_length=seq, packing=False, optimizer="paged_adamw_8bit" if method == "full" else "adamw")


CONFIGS = [_case(m, method, 2048) for m in ("qwen2.5-0.5b", "qwen2.5-1.5b") for method in ("lora", "qlora", "full")]
# Qwen2.5 0.5B/1.5B tie their input embeddings to lm_head; Phi-3 mini does not, so its LoRA/QLoRA runs keep the
# table in host memory (training.embeddingsOnHost auto), measured beside the same LoRA run with it on the GPU.
PHI3_TARGETS = ("qkv_proj", "o_proj")  # Phi-3 fuses q, k and v
CONFIGS += [replace(_case("phi-3-mini-4k", method, 2048), target_modules=PHI3_TARGETS) for method in ("lora", "qlora")]
CONFIGS += [replace(_case("phi-3-mini-4k", "lora", 2048), id="phi-3-mini-4k-lora-mbs2-seq2048-embeddings-on-gpu",
                    target_modules=PHI3_TARGETS, embeddings_on_host=False)]
CONFIGS_BY_ID = {c.id: c for c in CONFIGS}


def select(patterns: str | None) -> list[mem.Case]:
    """Configurations by id or shell pattern (comma-separated); all by default."""
    if not patterns:
        return list(CONFIGS)
    chosen = []
    for pat in patterns.split(","):
        hits = [c for c in CONFIGS if fnmatch.fnmatch(c.id, pat.strip())]
        if not hits:
            raise SystemExit(f"memory_gpu: no configuration matches {pat!r}; known: {sorted(CONFIGS_BY_ID)}")
        chosen += [c for c in hits if c not in chosen]
    return chosen


def spec_for(case: mem.Case, model_uri: str, data_uri: str, output_uri: str, steps: int):
    """The FineTuneJob spec of a configuration (operator defaults for the rest)."""
    from kubetune.api import parse_spec

    extra: dict[str, Any] = {}
    if case.method != "full":
        extra["lora"] = {"r": case.lora_r, "alpha": 2.0 * case.lora_r, "dropout": 0.0,
                         "targetModules": list(case.target_modules)}
    if case.method == "qlora":
        extra["quantization"] = {"bits": 4}
    return parse_spec({
        "model": {"uri": model_uri}, "dataset": {"uri": data_uri, "format": "text", "evalSplit": 0.0},
        "method": case.method, **extra,
        "training": {"maxSteps": steps, "microBatchSize": case.micro_batch_size, "gradientAccumulationSteps": 1,
                     "maxSeqLength": case.seq_length, "packing": case.packing,
                     "gradientCheckpointing": case.gradient_checkpointing, "precision": "bf16",
                     "optimizer": case.optimizer, "learningRate": "1e-5", "checkpointEverySteps": 1_000_000},
        "resources": {"gpusPerPod": 1, "pods": 1},
        "output": {"uri": output_uri},
    })


def estimate(case: mem.Case, spec) -> dict[str, int]:
    """The analytic single-GPU estimate (bf16-capable GPU): tensors, reserved, total (with CUDA context)."""
    from kubetune.sizing import Parallelism, estimate_memory, lookup_catalog, setup_from_spec

    setup = replace(setup_from_spec(spec, bf16_capable=True), embeddings_on_host=case.embeddings_on_host)
    e = estimate_memory(lookup_catalog(case.model), setup, Parallelism())
    return {"tensors": int(e.tensors), "reserved": int(e.reserved), "total": int(e.total),
            "trainableParams": int(e.trainable_params)}


def traces(case: mem.Case, plan: dict[str, Any]) -> dict[str, Any]:
    """Traced peaks (CPU, fake tensors) of the trainer on `plan` and of the plain step."""
    from kubetune_trainer.memtrace import trace_step

    config = mem.model_config(case.model)
    report = trace_step(plan, config, model_name=case.model)
    base = mem.trace_baseline(case, config)
    return {"kubetune": {"peakBytes": report.peak_bytes, "pagedOptimizerBytes": report.paged_optimizer_bytes,
                         "attention": report.attention, "trainableParams": report.trainable_params},
            "baseline": {"peakBytes": base["peakBytes"], "pagedOptimizerBytes": base["pagedOptimizerBytes"],
                         "attention": base["attention"], "trainableParams": base["trainableParams"]}}


def pct(value: int | None, reference: int | None) -> float | None:
    """(value - reference) / reference in %, rounded."""
    if not value or not reference:
        return None
    return round(100.0 * (value - reference) / reference, 2)


# ----------------------------------------------------------------------------- GPU side (subprocesses)
def measure_baseline(job: dict[str, Any]) -> dict[str, Any]:
    """The plain step on the GPU: peak memory and tokens/s (child process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memory_baseline import baseline_step, build_baseline

    case = mem.Case(**{**job["case"], "target_modules": tuple(job["case"]["target_modules"])})
    settings = case.baseline()
    torch.manual_seed(0)
    t0 = time.time()
    model, optimizer = build_baseline(settings, lambda **kw: AutoModelForCausalLM.from_pretrained(
        job["modelDir"], device_map={"": 0}, **kw))
    torch.cuda.synchronize()
    setup = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
             "seconds": round(time.time() - t0, 2)}
    vocab = int(model.config.vocab_size) if hasattr(model, "config") else 32000
    ids = torch.randint(0, vocab, (case.micro_batch_size, case.seq_length), device="cuda")
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    torch.cuda.reset_peak_memory_stats()
    losses = []
    t1 = time.time()
    for _ in range(job["steps"]):
        losses.append(baseline_step(model, optimizer, [batch], device_type="cuda",
                                    max_grad_norm=settings.max_grad_norm))
    torch.cuda.synchronize()
    seconds = time.time() - t1
    tokens = job["steps"] * case.micro_batch_size * case.seq_length
    return {"peakAllocatedBytes": max(setup["allocated"], torch.cuda.max_memory_allocated()),
            "peakReservedBytes": max(setup["reserved"], torch.cuda.max_memory_reserved()),
            "setup": setup, "trainingSeconds": round(seconds, 3), "tokens": tokens,
            "tokensPerSecond": round(tokens / seconds, 1), "losses": losses,
            "lossesFinite": all(math.isfinite(x) for x in losses),
            "trainableParams": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure_kubetune(job: dict[str, Any]) -> dict[str, Any]:
    """The trainer's recipe on the plan (bench/vram_accuracy.py's measurement) plus tokens/s (child process)."""
    import vram_accuracy

    out = vram_accuracy.measure(job)
    seconds = out["training"]["seconds"]
    out["tokensPerSecond"] = round(out["tokens"] / seconds, 1) if seconds else None
    return out


def _child_main(argv: Sequence[str]) -> int:
    """Hidden entry points: --_kubetune JOB OUT, --_baseline JOB OUT, --_build MODEL DIR."""
    if argv[0] == "--_build":
        import vram_accuracy

        vram_accuracy.build_random_model(argv[1], Path(argv[2]))
        return 0
    job = json.loads(Path(argv[1]).read_text())
    run = {"--_kubetune": measure_kubetune, "--_baseline": measure_baseline}[argv[0]]
    Path(argv[2]).write_text(json.dumps(run(job), indent=1))
    return 0


def _child(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    import vram_accuracy

    env = vram_accuracy._child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _measure_side(side: str, job: dict[str, Any], run_dir: Path, timeout: float) -> dict[str, Any]:
    job_file, out_file = run_dir / f"{side}-job.json", run_dir / f"{side}-measured.json"
    job_file.write_text(json.dumps(job))
    try:
        proc = _child([f"--_{side}", str(job_file), str(out_file)], timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        return {"status": "oom" if "OutOfMemoryError" in tail else "error", "error": tail}
    return {"status": "ok", **json.loads(out_file.read_text())}


def run_config(case: mem.Case, steps: int, workdir: Path, model_cache: Path, timeout: float,
               on_gpu: bool) -> dict[str, Any]:
    """Estimate, traces and (on a GPU) both measurements of one configuration."""
    from vram_accuracy import plan_for, write_text_dataset

    run_dir = workdir / case.id
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = model_cache / case.model
    data = write_text_dataset(run_dir / "train.jsonl", steps * case.micro_batch_size + 2, case.seq_length)
    spec = spec_for(case, str(model_dir), str(data), str(run_dir / "out"), steps)
    plan = plan_for(spec)
    if case.embeddings_on_host is not None:  # a trainer plan field the operator leaves unset (auto)
        plan["training"]["embeddingsOnHost"] = case.embeddings_on_host
    row: dict[str, Any] = {"id": case.id, "case": mem._case_json(case), "steps": steps,
                           "estimate": estimate(case, spec)}
    t0 = time.time()
    row["trace"] = traces(case, plan)
    row["traceSeconds"] = round(time.time() - t0, 1)
    if not on_gpu:
        return row
    if not (model_dir / "kubetune-vram-bench.json").is_file():
        shutil.rmtree(model_dir, ignore_errors=True)
        proc = _child(["--_build", case.model, str(model_dir)], timeout)
        if proc.returncode != 0:
            row["error"] = f"building {case.model} failed: {proc.stderr[-2000:]}"
            return row
    measured = {
        "kubetune": _measure_side("kubetune", {"plan": plan, "workDir": str(run_dir / "work")}, run_dir, timeout),
        "baseline": _measure_side("baseline", {"case": asdict(case), "modelDir": str(model_dir), "steps": steps},
                                  run_dir, timeout),
    }
    row["measured"] = measured
    errors: dict[str, Any] = {}
    for side in ("kubetune", "baseline"):
        m = measured[side]
        if m.get("status") != "ok":
            continue
        errors[side] = {"traceVsAllocatedPct": pct(row["trace"][side]["peakBytes"], m["peakAllocatedBytes"])}
    k = measured["kubetune"]
    if k.get("status") == "ok":
        est = row["estimate"]
        errors["kubetune"].update(estimateTensorsVsAllocatedPct=pct(est["tensors"], k["peakAllocatedBytes"]),
                                  estimateReservedVsReservedPct=pct(est["reserved"], k["peakReservedBytes"]))
    b = measured["baseline"]
    if k.get("status") == "ok" and b.get("status") == "ok":
        row["measuredRatio"] = {
            "allocated": round(k["peakAllocatedBytes"] / b["peakAllocatedBytes"], 4),
            "reserved": round(k["peakReservedBytes"] / b["peakReservedBytes"], 4),
            "tokensPerSecond": (round(k["tokensPerSecond"] / b["tokensPerSecond"], 3)
                                if k.get("tokensPerSecond") and b.get("tokensPerSecond") else None)}
    row["errors"] = errors
    return row


def _g(x: int | None) -> str:
    return "-" if not x else f"{x / GiB:6.2f}"


def format_row(row: dict[str, Any]) -> str:
    """One line: estimate, traces and measurements (GiB), tokens/s."""
    t, e = row["trace"], row["estimate"]
    m = row.get("measured") or {}
    k, b = m.get("kubetune") or {}, m.get("baseline") or {}
    return (f"{row['id']:<30} est {_g(e['tensors'])} | trace ours {_g(t['kubetune']['peakBytes'])} "
            f"base {_g(t['baseline']['peakBytes'])} | alloc ours {_g(k.get('peakAllocatedBytes'))} "
            f"base {_g(b.get('peakAllocatedBytes'))} | reserved ours {_g(k.get('peakReservedBytes'))} "
            f"base {_g(b.get('peakReservedBytes'))} | tok/s ours {k.get('tokensPerSecond', '-')} "
            f"base {b.get('tokensPerSecond', '-')}")


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        return _child_main(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: estimates and traces only (writes nothing "
                                                           "unless --out is given)")
    p.add_argument("--list", action="store_true", help="print the configuration ids")
    p.add_argument("--configs", default=None, help="ids or shell patterns, comma-separated (default all)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess")
    p.add_argument("--model-cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CONFIGS_BY_ID))
        return 0
    configs = select(args.configs)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.dry_run:
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return NO_CUDA_EXIT
    if args.dry_run:
        on_gpu = False
    import vram_accuracy

    gpu = torch.cuda.get_device_name(0) if on_gpu else None
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kubetune-memory-gpu-") as tmp:
        cache = args.model_cache or Path(tmp) / "models"
        rows = []
        for case in configs:
            row = run_config(case, args.steps, Path(tmp), cache, args.timeout, on_gpu)
            rows.append(row)
            print(format_row(row), flush=True)
    result = {"schemaVersion": SCHEMA_VERSION, "gpu": gpu, "dryRun": not on_gpu,
              "command": " ".join(["bench/memory_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows,
              "seconds": round(time.time() - started, 1)}
    out = args.out
    if out is None and on_gpu:
        out = REPO / "bench" / "results" / f"memory_gpu-{vram_accuracy.device_slug(gpu)}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
