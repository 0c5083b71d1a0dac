"""The analytic estimate (operator, torch-free) against the GPU-free trace of the trainer's real step.

    python bench/estimate_vs_trace.py [--cases ID,ID,...] [--layers N|full] [--out PATH]

For each configuration (model family x method x micro batch x sequence length x checkpointing x packing
x ZeRO stage x Liger) it

1. estimates the per-GPU tensor memory with the operator's estimator (`kubetune.sizing.estimate_memory`:
   `MemoryEstimate.tensors` without the communication buffers, which the trace does not model);
2. traces one process's training step with the trainer's own recipe on fake tensors
   (`kubetune_trainer.memtrace.trace_step`: two optimizer steps, forward, chunked loss, backward, optimizer
   step) and takes its peak of live tensor storage, plus the paged optimizer states bitsandbytes keeps
   outside the allocator (the estimator counts them as GPU memory: the sizer does not count on eviction).

Depth: every model keeps its real hidden size, heads, vocabulary and MLP width, with `--layers` decoder
layers (default 2, what CI traces in seconds); the estimate is computed for the same architecture, so the
comparison is exact at that depth. `--layers full` traces the real depth (about a minute per 8B case).

ZeRO cases: the trace is one process. The per-rank share of a data-parallel world of `ZERO_WORLD` GPUs is
derived from the trace's breakdown at its peak as DeepSpeed partitions it (stage 1: optimizer states / N,
stage 2: + gradients / N, stage 3: + weights / N) and compared with the estimate's per-rank tensors minus
its ZeRO-3 gather working set and communication buckets (DeepSpeed configuration constants, like NCCL's).

Target (issue 15): every estimate within +-5% of the traced figure and never below it by more than 2%.
Results: bench/results/estimate_vs_trace.json (or --out) and a printed table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "operator", REPO / "trainer_image"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RESULTS = REPO / "bench" / "results" / "estimate_vs_trace.json"
OVER_LIMIT = 0.05  # estimate / trace <= 1.05
UNDER_LIMIT = 0.02  # estimate / trace >= 0.98
ZERO_WORLD = 4
DEFAULT_LAYERS = 2
GiB = 1024 ** 3

# config.json architecture fields of public checkpoints (written here: no hub access).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False, "use_sliding_window": False},
    "mistral-7b-v0.3": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "vocab_size": 32768, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False},
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                     "rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
                     "sliding_window": None, "tie_word_embeddings": False},
    "phi-3-mini": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "sliding_window": None, "tie_word_embeddings": False, "pad_token_id": 32000},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "tie_word_embeddings": True, "head_dim": 64},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "tie_word_embeddings": True, "use_sliding_window": False},
}


@dataclass(frozen=True)
class Case:
    """One configuration compared: a model family and the plan fields that decide memory."""

    id: str
    family: str
    method: str
    micro_batch_size: int = 1
    seq_length: int = 2048
    gradient_checkpointing: bool = True
    packing: bool = False
    optimizer: str = "adamw"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    zero_stage: int = 0
    liger: bool = False
    lora_r: int = 16
    target_modules: tuple[str, ...] = ("all-linear",)
    activation_offloading: bool = False


def _cases() -> list[Case]:
    c = Case
    return [
        # Llama 3.1 8B: every method, batch/sequence/checkpointing/packing variations
        c("llama-full-b1-s2048", "llama-3.1-8b", "full"),
        c("llama-full-b2-s2048-pack", "llama-3.1-8b", "full", 2, 2048, packing=True),
        c("llama-full-b1-s4096-nogc", "llama-3.1-8b", "full", 1, 4096, gradient_checkpointing=False),
        c("llama-full-b1-s2048-8bit", "llama-3.1-8b", "full", optimizer="adamw_8bit"),
        c("llama-full-b1-s2048-paged8bit", "llama-3.1-8b", "full", optimizer="paged_adamw_8bit"),
        c("llama-full-b1-s2048-sgd", "llama-3.1-8b", "full", optimizer="sgd"),
        c("llama-full-b1-s2048-inbwd", "llama-3.1-8b", "full", max_grad_norm=0.0),
        c("llama-full-b1-s1024-gas2", "llama-3.1-8b", "full", 1, 1024, gradient_accumulation_steps=2),
        c("llama-lora-b2-s2048-pack", "llama-3.1-8b", "lora", 2, 2048, packing=True),
        c("llama-lora-b1-s8192", "llama-3.1-8b", "lora", 1, 8192),
        c("llama-lora-b4-s512-pad", "llama-3.1-8b", "lora", 4, 512),
        c("llama-lora-b1-s2048-nogc", "llama-3.1-8b", "lora", 1, 2048, gradient_checkpointing=False),
        c("llama-lora-b2-s2048-qvo-r8", "llama-3.1-8b", "lora", 2, 2048, packing=True, lora_r=8,
          target_modules=("q_proj", "v_proj", "o_proj")),
        c("llama-lora-b2-s2048-liger", "llama-3.1-8b", "lora", 2, 2048, packing=True, liger=True),
        c("llama-qlora-b2-s2048-pack", "llama-3.1-8b", "qlora", 2, 2048, packing=True),
        c("llama-qlora-b1-s4096-nogc", "llama-3.1-8b", "qlora", 1, 4096, gradient_checkpointing=False),
        c("llama-qlora-b2-s1024-pad", "llama-3.1-8b", "qlora", 2, 1024),
        c("llama-lora-b1-s2048-gas2", "llama-3.1-8b", "lora", 1, 2048, gradient_accumulation_steps=2),
        c("mistral-lora-b1-s2048-sgd", "mistral-7b-v0.3", "lora", 1, 2048, optimizer="sgd"),
        c("qwen2-qlora-b1-s2048-paged8bit", "qwen2.5-7b", "qlora", 1, 2048, optimizer="paged_adamw_8bit"),
        # ZeRO per-rank shares (4 ranks)
        c("llama-lora-b2-s2048-zero1", "llama-3.1-8b", "lora", 2, 2048, packing=True, zero_stage=1),
        c("llama-lora-b1-s4096-zero2", "llama-3.1-8b", "lora", 1, 4096, zero_stage=2),
        c("llama-lora-b1-s2048-zero3", "llama-3.1-8b", "lora", 1, 2048, zero_stage=3),
        c("llama-qlora-b1-s2048-zero2", "llama-3.1-8b", "qlora", 1, 2048, zero_stage=2),
        # Qwen2.5 7B (q/k/v bias, 152k vocabulary)
        c("qwen2-full-b1-s2048", "qwen2.5-7b", "full"),
        c("qwen2-lora-b2-s4096-pack", "qwen2.5-7b", "lora", 2, 4096, packing=True),
        c("qwen2-qlora-b1-s8192", "qwen2.5-7b", "qlora", 1, 8192),
        c("qwen2-lora-b3-s1024-nogc-pad", "qwen2.5-7b", "lora", 3, 1024, gradient_checkpointing=False),
        c("qwen2-lora-b1-s2048-liger", "qwen2.5-7b", "lora", 1, 2048, liger=True),
        # Mistral 7B v0.3 and Mixtral 8x7B (sparse MoE)
        c("mistral-full-b2-s1024-pack", "mistral-7b-v0.3", "full", 2, 1024, packing=True),
        c("mistral-lora-b1-s4096-nogc", "mistral-7b-v0.3", "lora", 1, 4096, gradient_checkpointing=False),
        c("mistral-qlora-b4-s2048-pack", "mistral-7b-v0.3", "qlora", 4, 2048, packing=True),
        c("mixtral-lora-b1-s2048", "mixtral-8x7b", "lora", 1, 2048, target_modules=("q_proj", "k_proj", "v_proj",
                                                                                   "o_proj")),
        c("mixtral-qlora-b1-s2048", "mixtral-8x7b", "qlora", 1, 2048, target_modules=("q_proj", "k_proj",
                                                                                     "v_proj", "o_proj")),
        # Phi-3 mini (fused qkv / gate_up, no GQA) and Llama 3.2 1B (tied embeddings)
        c("phi3-full-b1-s4096", "phi-3-mini", "full", 1, 4096),
        c("phi3-lora-b2-s2048-pad", "phi-3-mini", "lora", 2, 2048),
        c("phi3-qlora-b1-s4096-nogc", "phi-3-mini", "qlora", 1, 4096, gradient_checkpointing=False),
        c("llama1b-full-b4-s2048-pack", "llama-3.2-1b", "full", 4, 2048, packing=True),
        c("llama1b-lora-b1-s8192-nogc", "llama-3.2-1b", "lora", 1, 8192, gradient_checkpointing=False),
        # Qwen2.5 0.5B: tied embeddings where the 152k-row table is a third of the model
        c("qwen05b-full-b2-s2048", "qwen2.5-0.5b", "full", 2, 2048),
        c("qwen05b-lora-b4-s1024-pad", "qwen2.5-0.5b", "lora", 4, 1024),
        # activation offloading: what checkpointing keeps waits in host memory
        c("llama-lora-b2-s2048-pack-offload", "llama-3.1-8b", "lora", 2, 2048, packing=True,
          activation_offloading=True),
        c("llama-full-b1-s4096-offload", "llama-3.1-8b", "full", 1, 4096, activation_offloading=True),
        c("qwen2-qlora-b1-s8192-nogc-offload", "qwen2.5-7b", "qlora", 1, 8192, gradient_checkpointing=False,
          activation_offloading=True),
    ]


CASES = _cases()


def model_config(case: Case, layers: int | None) -> dict[str, Any]:
    """The case's config.json, with `layers` decoder layers (None: the real depth)."""
    cfg = dict(FAMILIES[case.family])
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


def estimate_bytes(case: Case, layers: int | None) -> tuple[int, dict[str, int]]:
    """(estimated per-GPU tensor bytes comparable with the trace, the estimate's breakdown)."""
    from kubetune.sizing import Parallelism, TrainingSetup, architecture_from_config, estimate_memory
    from kubetune.sizing.estimator import zero3_working_set_bytes
    from kubetune.sizing.training_setup import attention_kernel

    arch = architecture_from_config(model_config(case, layers), name=case.family)
    setup = TrainingSetup(method=case.method, lora_r=case.lora_r, lora_dropout=0.0,
                          target_modules=case.target_modules, optimizer=case.optimizer,
                          micro_batch_size=case.micro_batch_size, seq_length=case.seq_length,
                          packing=case.packing, gradient_checkpointing=case.gradient_checkpointing,
                          attention=attention_kernel("auto", case.packing, "bf16"),
                          gradient_accumulation_steps=case.gradient_accumulation_steps,
                          max_grad_norm=case.max_grad_norm, liger_kernels=case.liger,
                          activation_offloading=case.activation_offloading)
    par = Parallelism("deepspeed", case.zero_stage, world_size=ZERO_WORLD) if case.zero_stage else Parallelism()
    e = estimate_memory(arch, setup, par)
    # ZeRO: the per-rank share of the step; DeepSpeed's gather working set and buckets are configuration constants
    gathered = zero3_working_set_bytes(arch, setup) if case.zero_stage == 3 else 0
    return e.tensors - e.comm_buffers - gathered, e.breakdown()


def trace_bytes(case: Case, layers: int | None) -> tuple[int, dict[str, Any]]:
    """(traced peak bytes comparable with the estimate, trace facts) for one case."""
    from kubetune_trainer.memtrace import plan_settings, trace_step

    settings = plan_settings(case.method, micro_batch_size=case.micro_batch_size, seq_length=case.seq_length,
                             gradient_accumulation_steps=case.gradient_accumulation_steps, lora_r=case.lora_r,
                             target_modules=case.target_modules, optimizer=case.optimizer,
                             gradient_checkpointing=case.gradient_checkpointing, packing=case.packing,
                             liger_kernels=case.liger, max_grad_norm=case.max_grad_norm,
                             activation_offloading=case.activation_offloading)
    if case.zero_stage:  # traced as one process; the recipe's memory decisions follow DeepSpeed
        settings["distributed"] = {"strategy": "deepspeed", "zeroStage": case.zero_stage}
    report = trace_step(settings, model_config(case, layers), model_name=case.family)
    b = report.breakdown
    n = ZERO_WORLD
    z = case.zero_stage
    paged = report.paged_optimizer_bytes
    if z:
        share = (b.get("weights", 0) / (n if z >= 3 else 1) + b.get("gradients", 0) / (n if z >= 2 else 1)
                 + b.get("optimizerStates", 0) / n + b.get("activations", 0) + paged / n)
        value = int(share)
    else:
        value = report.peak_bytes + paged
    facts = {"peakBytes": report.peak_bytes, "pagedOptimizerBytes": paged, "breakdown": dict(b),
             "phase": report.peak_phase, "op": report.peak_op, "where": report.peak_where,
             "attention": report.attention, "seconds": report.seconds}
    return value, facts


@dataclass
class Row:
    """One compared configuration."""

    case: str
    trace_bytes: int
    estimate_bytes: int
    trace: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """estimate / trace."""
        return self.estimate_bytes / self.trace_bytes

    @property
    def ok(self) -> bool:
        """Within the target band."""
        return 1 - UNDER_LIMIT <= self.ratio <= 1 + OVER_LIMIT


def compare(cases: Iterable[Case], layers: int | None = DEFAULT_LAYERS, log=print) -> list[Row]:
    """Estimate and trace every case; one Row each."""
    rows = []
    for case in cases:
        traced, facts = trace_bytes(case, layers)
        estimated, breakdown = estimate_bytes(case, layers)
        row = Row(case.id, traced, estimated, facts, breakdown)
        rows.append(row)
        if log:
            log(f"{case.id:<34} {traced / GiB:8.2f} {estimated / GiB:8.2f} {row.ratio:7.3f} "
                f"{'ok' if row.ok else 'OUT'}  ({facts['seconds']:.0f} s)")
    return rows


def summary(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Min/max ratio per method."""
    by_method: dict[str, list[float]] = {}
    methods = {c.id: c.method for c in CASES}
    for r in rows:
        by_method.setdefault(methods.get(r.case, "?"), []).append(r.ratio)
    return {m: {"min": round(min(v), 4), "max": round(max(v), 4), "cases": len(v)} for m, v in by_method.items()}


def format_table(rows: list[Row]) -> str:
    """config, trace, estimate, ratio as text."""
    lines = [f"{'config':<34} {'trace':>8} {'estimate':>8} {'ratio':>7}   (GiB per GPU, tensors only)"]
    for r in rows:
        lines.append(f"{r.case:<34} {r.trace_bytes / GiB:8.2f} {r.estimate_bytes / GiB:8.2f} {r.ratio:7.3f}"
                     + ("" if r.ok else "  OUT OF BAND"))
    for method, s in summary(rows).items():
        lines.append(f"{method}: ratio {s['min']:.3f}-{s['max']:.3f} over {s['cases']} configurations")
    return "\n".join(lines)


def write_results(rows: list[Row], path: Path, layers: int | None, argv: list[str]) -> None:
    """The JSON results file."""
    import torch
    import transformers

    run = {
        "command": "python bench/estimate_vs_trace.py " + " ".join(argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "platform": platform.platform()},
        "layers": layers or "full", "zeroWorld": ZERO_WORLD,
        "band": {"maxOver": OVER_LIMIT, "maxUnder": UNDER_LIMIT}, "summary": summary(rows),
        "allWithinBand": all(r.ok for r in rows),
        "rows": [{"case": r.case, "traceBytes": r.trace_bytes, "estimateBytes": r.estimate_bytes,
                  "ratio": round(r.ratio, 4), "ok": r.ok, "trace": r.trace, "estimateBreakdown": r.estimate,
                  "settings": _settings(r.case)} for r in rows],
    }
    # one run per depth: the CI depth and the real depth live side by side
    data: dict[str, Any] = {"schema": 1, "runs": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("schema") == 1 and isinstance(old.get("runs"), dict):
                data = old
        except ValueError:
            pass
    data["runs"][f"layers={layers or 'full'}"] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _settings(case_id: str) -> dict[str, Any]:
    case = next(c for c in CASES if c.id == case_id)
    out = {k: v for k, v in case.__dict__.items() if k != "id"}
    out["target_modules"] = list(case.target_modules)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 1 when a configuration is outside the band."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="", help="comma-separated case ids (default: all)")
    p.add_argument("--layers", default=str(DEFAULT_LAYERS), help="decoder layers traced, or 'full'")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    wanted = [c for c in args.cases.split(",") if c]
    unknown = set(wanted) - {c.id for c in CASES}
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    cases = [c for c in CASES if not wanted or c.id in wanted]
    layers = None if args.layers == "full" else int(args.layers)
    started = time.perf_counter()
    rows = compare(cases, layers)
    print(format_table(rows))
    print(f"{len(rows)} configurations in {time.perf_counter() - started:.0f} s")
    write_results(rows, Path(args.out), layers, argv)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
