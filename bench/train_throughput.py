"""Training throughput: the kubetune trainer against a plain Hugging Face baseline, side by side in one run.

    python bench/train_throughput.py [--quick] [--device cpu|cuda] [--model tiny|<config.json>]
                                     [--method lora|full|qlora] [--steps N] [--rows NAME,...]
                                     [--lock-file PATH] [--out PATH]

Both sides train the same model (a seeded random-weight tiny llama, or any config.json with random
weights), on the same JSONL chat data (a spell-out task with lengths spread up to the maximum sequence
length), with the same method (peft LoRA r/alpha/dropout on all linear layers, full, or 4-bit QLoRA),
max sequence length, micro batch, gradient accumulation, steps, learning rate, scheduler, optimizer,
precision and completion-only loss:

- kubetune: `kubetune_trainer.recipe.FineTuneRecipe` on a contracts §2 plan (what `kubetune-train run`
  executes), unchanged; the benchmark only wraps its micro-batch fetch and optimizer step to read
  token counts and timestamps;
- baseline: a plain `transformers.Trainer` on a peft model, data tokenized with the tokenizer's own
  `apply_chat_template(..., return_assistant_tokens_mask=True)`, padded by `DataCollatorForSeq2Seq`
  (or `DataCollatorWithFlattening`, HF's padding-free batching, for the packing row).

Each side runs in its own fresh subprocess, one after the other, so memory is per side: peak RSS is
the child's VmHWM (whole process: imports, model, data, training); on CUDA also
`torch.cuda.max_memory_allocated`. Throughput counts the same tokens on both sides, the non-padding
tokens fed to the model, and times only optimizer steps: from the end of warm-up step W to the end
of the last step (wall clock after each optimizer step, CUDA synchronised), so imports, model load,
data preparation and the first W steps are excluded (setup time is reported separately).

Extra rows show the speed features the plan exposes, each measured on both sides in the same run with the
baseline's own way of doing the same: training.packing (baseline: DataCollatorWithFlattening),
training.gradientCheckpointing, training.attentionImplementation eager against the default sdpa (baseline:
from_pretrained(attn_implementation="eager")), training.torchCompile (baseline: TrainingArguments
torch_compile; not in --quick: compiling takes minutes on CPU, inside the warm-up steps), and on CUDA only
training.ligerKernels (baseline: TrainingArguments use_liger_kernel) and training.precision fp32 vs bf16.
What each side actually ran with is recorded per side (attnImplementation, torchCompile, ligerKernels).
On CUDA, MFU is computed against the GPU's dense bf16 peak from a small table (see `PEAK_BF16_TFLOPS`).

Results: bench/results/train_throughput-<device>-<method>.json (or --out) and a printed table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
TRAINER_SRC = REPO / "trainer_image"
SCHEMA_VERSION = 1
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, no sparsity), matched in this order
# against torch.cuda.get_device_name() upper-cased.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (reported as "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# Model presets for --model tiny: (hidden, layers, heads, kv_heads, maxSeqLength, microBatch, steps).
TINY_PRESETS = {
    "quick": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "max_seq": 128, "micro_batch": 8,
              "steps": 12, "warmup_steps": 2, "examples": 300},
    "full": {"hidden": 512, "layers": 6, "heads": 8, "kv_heads": 4, "max_seq": 256, "micro_batch": 8,
             "steps": 40, "warmup_steps": 5, "examples": 1200},
}


# ----------------------------------------------------------------------------- pure helpers
def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) for a CUDA device name, None when the GPU is not in the table."""
    name = device_name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def training_flops(method: str, matmul_params: int, trainable_params: int, tokens: int, layers: int,
                   attn_width: int, sum_sq_lengths: int) -> float:
    """Model FLOPs of training on `tokens` (no recomputation counted; attention as in PaLM, non-causal).

    full: 6·N per token (forward 2N, backward 4N). lora/qlora: the frozen weights need the forward (2N)
    and the activation gradients (2N) but no weight gradients, the adapters all three (6·N_trainable).
    Attention score/value matmuls: 12·layers·width·L per token of an example of length L (forward 4,
    backward 8; needed by every method), i.e. 12·layers·width·ΣL² over the examples.
    """
    if method == "full":
        dense = 6.0 * matmul_params * tokens
    elif method in ("lora", "qlora"):
        dense = 4.0 * matmul_params * tokens + 6.0 * trainable_params * tokens
    else:
        raise ValueError(f"unknown method {method!r}")
    return dense + 12.0 * layers * attn_width * sum_sq_lengths


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation (0..1) of `flops` done in `seconds` against a peak in TFLOP/s."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def windowed_rate(step_times: Sequence[float], step_tokens: Sequence[int], warmup: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) over steps warmup+1..N: from the end of step `warmup` to the end of the last."""
    if len(step_times) != len(step_tokens):
        raise ValueError("one timestamp and one token count per step are needed")
    if len(step_times) <= warmup:
        raise ValueError(f"need more than {warmup} steps to measure past the warm-up, got {len(step_times)}")
    if warmup == 0:
        raise ValueError("warmup must be at least 1 (the window starts at the end of a step)")
    seconds = step_times[-1] - step_times[warmup - 1]
    tokens = int(sum(step_tokens[warmup:]))
    return (tokens / seconds if seconds > 0 else 0.0), tokens, seconds


def median_step_rate(step_times: Sequence[float], step_tokens: Sequence[int], warmup: int) -> float:
    """Median over steps warmup+1..N of each step's tokens / duration: robust to other processes' bursts."""
    rates = [tok / (b - a) for a, b, tok in zip(step_times[warmup - 1:], step_times[warmup:], step_tokens[warmup:])
             if b > a]
    return statistics.median(rates) if rates else 0.0


def example_lengths(input_ids_len: int, position_ids: Sequence[int] | None) -> list[int]:
    """Lengths of the examples in one row: the position-id restarts of a packed row, else the row itself."""
    if position_ids is None:
        return [input_ids_len] if input_ids_len else []
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    ends = starts[1:] + [len(position_ids)]
    return [e - s for s, e in zip(starts, ends)]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, None when either is missing or b is 0."""
    if a is None or b in (None, 0):
        return None
    return round(a / b, 4)


def write_dataset(path: Path, n: int, max_digits: int, seed: int = 0) -> Path:
    """Spell-out chat examples ('Spell out: 3 1' → 'three one') with 2..max_digits digits (varied lengths)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            digits = [rng.randrange(10) for _ in range(rng.randint(2, max(2, max_digits)))]
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": "Spell out: " + " ".join(map(str, digits))},
                {"role": "assistant", "content": " ".join(WORDS[d] for d in digits)},
            ]}) + "\n")
    return path


# ----------------------------------------------------------------------------- measurement in a child
def _proc_status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StepClock:
    """Timestamps and non-padding token counts per optimizer step, plus Σ example length² for FLOPs."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.sq_lengths: list[int] = []
        self.positions: list[int] = []
        self._tokens = self._sq = self._positions = 0

    def add_batch(self, tokens: int, lengths: Sequence[int], positions: int) -> None:
        """Count one micro-batch fed to the model (positions = input_ids.numel(), padding included)."""
        self._tokens += int(tokens)
        self._sq += int(sum(n * n for n in lengths))
        self._positions += int(positions)

    def step_done(self) -> None:
        """Record the end of an optimizer step."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.tokens.append(self._tokens)
        self.sq_lengths.append(self._sq)
        self.positions.append(self._positions)
        self._tokens = self._sq = self._positions = 0


def _logical_numel(param) -> int:
    """Elements of a parameter as the model sees it (bitsandbytes 4-bit weights store two per byte)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        count = 1
        for dim in shape:
            count *= int(dim)
        return count
    return int(param.numel())


def _model_numbers(model) -> dict[str, Any]:
    """Parameter counts (base matmul params exclude the input embedding; LoRA params excluded) and shape."""
    cfg = model.config
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(model.named_parameters())
    lora = sum(p.numel() for n, p in params if "lora_" in n)
    total = sum(_logical_numel(p) for _, p in params) - lora
    embed = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    heads = int(getattr(cfg, "num_attention_heads"))
    head_dim = int(getattr(cfg, "head_dim", 0) or cfg.hidden_size // heads)
    return {"parameters": int(total), "matmulParameters": int(total if tied else total - embed),
            "trainableParameters": int(sum(p.numel() for _, p in params if p.requires_grad)),
            "layers": int(cfg.num_hidden_layers), "attentionWidth": heads * head_dim,
            "attnImplementation": str(getattr(cfg, "_attn_implementation", None)),
            "gradientCheckpointingActive": bool(getattr(base, "is_gradient_checkpointing", False))}


def _finish(clock: StepClock, spec: dict, extra: dict, training_peak: int | None, losses: list[float]) -> dict:
    tps, tokens, seconds = windowed_rate(clock.times, clock.tokens, spec["warmup_steps"])
    median = median_step_rate(clock.times, clock.tokens, spec["warmup_steps"])
    out = {"tokensPerSecond": round(tps, 3), "medianStepTokensPerSecond": round(median, 3),
           "timedTokens": tokens, "timedSeconds": round(seconds, 4),
           "timedSteps": len(clock.times) - spec["warmup_steps"], "steps": len(clock.times),
           "totalTokens": int(sum(clock.tokens)),
           "timedSumSquaredLengths": int(sum(clock.sq_lengths[spec["warmup_steps"]:])),
           "paddingFraction": round(1 - tokens / max(1, sum(clock.positions[spec["warmup_steps"]:])), 4),
           "stepSeconds": [round(b - a, 5) for a, b in zip(clock.times, clock.times[1:])],
           "peakRssBytes": _proc_status_bytes("VmHWM"), "trainingPeakRssBytes": training_peak,
           "firstLoss": losses[0] if losses else None, "lastLoss": losses[-1] if losses else None}
    if clock.cuda:
        import torch

        out["peakCudaAllocatedBytes"] = int(torch.cuda.max_memory_allocated())
        out["peakCudaReservedBytes"] = int(torch.cuda.max_memory_reserved())
    out.update(extra)
    return out


def run_kubetune_child(spec: dict) -> dict:
    """Train with FineTuneRecipe on the spec's plan; return measurements."""
    import torch

    import datasets  # noqa: F401 - imported before the clock like the baseline's; the recipe imports lazily
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from kubetune_trainer.plan import parse_plan
    from kubetune_trainer.recipe import FineTuneRecipe, RunEnv

    imported = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    plan = parse_plan(spec["plan"])
    recipe = FineTuneRecipe(plan, RunEnv(work_dir=Path(spec["work_dir"])))
    recipe.setup()
    cuda = recipe.device.type == "cuda"
    clock = StepClock(cuda)
    losses: list[float] = []
    fetch, collate, step = recipe.micro_batch, recipe.collator, recipe.engine.step
    last_lengths: list[int] = []

    def counting_collator(features):
        last_lengths[:] = [n for f in features for n in example_lengths(len(f["input_ids"]), f.get("position_ids"))]
        return collate(features)

    def counting_fetch(index: int):
        batch, tokens = fetch(index)
        clock.add_batch(tokens, last_lengths, batch["input_ids"].numel())
        return batch, tokens

    def timed_step() -> float:
        norm = step()
        clock.step_done()
        return norm

    recipe.collator = counting_collator
    recipe.micro_batch = counting_fetch
    recipe.engine.step = timed_step
    numbers = _model_numbers(recipe.engine.raw_model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    setup_done = time.perf_counter()
    reset = _reset_peak_rss()
    result = recipe.train()
    training_peak = _proc_status_bytes("VmHWM") if reset else None
    losses = [h["loss"] for h in result.history]
    extra = {"side": "kubetune", "precision": recipe.precision, "setupSeconds": round(setup_done - imported, 3),
             "trainerReportedTokensPerSecond": round(result.tokens_per_second, 3), **numbers,
             "torchCompile": recipe.speed.torch_compile, "ligerKernels": recipe.speed.liger_kernels,
             "ligerSkippedReason": recipe.speed.liger_skipped_reason}
    out = _finish(clock, spec, extra, training_peak, losses)
    recipe.cleanup()
    return out


def _encode_baseline(rows: list[dict], tokenizer, max_len: int, completion_only: bool) -> list[dict]:
    """Tokenize chat rows with the tokenizer's chat template; labels only on assistant tokens when asked."""
    out = []
    for row in rows:
        enc = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=completion_only)
        ids = list(enc["input_ids"])
        if completion_only:
            labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
        else:
            labels = list(ids)
        ids, labels = ids[:max_len], labels[:max_len]
        if all(label == -100 for label in labels[1:]):
            continue
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


def run_baseline_child(spec: dict) -> dict:
    """Train with a plain transformers Trainer (+ peft) on the same data and settings; return measurements."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)

    imported = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    plan, t = spec["plan"], spec["plan"]["training"]
    method, model_dir = plan["method"], plan["model"]["uri"]
    cuda = spec["device"] == "cuda"
    precision = spec["precision"]
    torch.manual_seed(t["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(plan["dataset"]["uri"]).read_text().splitlines() if line.strip()]
    train = Dataset.from_list(_encode_baseline(rows, tokenizer, t["maxSeqLength"], t["completionOnly"]))

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    kwargs: dict[str, Any] = {}
    attention = t.get("attentionImplementation", "auto")
    compile_model, liger = bool(t.get("torchCompile", False)), bool(t.get("ligerKernels", False))
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        q = plan["quantization"]
        cdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[q["computeDtype"]]
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["quantType"], bnb_4bit_use_double_quant=q["doubleQuant"],
            bnb_4bit_compute_dtype=cdt), "dtype": cdt, "device_map": {"": 0 if cuda else "cpu"}}
    elif method == "lora":
        kwargs = {"dtype": dtype}
    else:
        kwargs = {"dtype": torch.float32}
    if attention != "auto":
        kwargs["attn_implementation"] = attention
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora" and cuda:
        model.to("cuda")
    model.config.use_cache = False
    gc = bool(t["gradientCheckpointing"])
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = plan["lora"]
        targets = "all-linear" if lora["targetModules"] == ["all-linear"] else lora["targetModules"]
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))

    clock = StepClock(cuda)
    losses: list[float] = []
    gas = t["gradientAccumulationSteps"]

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):  # noqa: D102
            if "attention_mask" in inputs:
                lengths = inputs["attention_mask"].sum(dim=1).tolist()
                clock.add_batch(sum(lengths), lengths, inputs["input_ids"].numel())
            else:  # padding-free: one flattened row, examples delimited by position-id restarts
                pos = inputs["position_ids"].reshape(-1).tolist()
                clock.add_batch(len(pos), example_lengths(len(pos), pos), len(pos))
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            loss = result[0] if return_outputs else result
            # With num_items_in_batch the micro-batch loss is already a share of the step's loss.
            losses.append(float(loss.detach().float()) * (1 if kw.get("num_items_in_batch") is not None else 1 / gas))
            return result

    class StepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: D102
            clock.step_done()

    warmup = 0 if t["scheduler"] == "constant" else int(round(t["warmupRatio"] * t["maxSteps"]))
    args = TrainingArguments(
        output_dir=str(Path(spec["work_dir"]) / "hf-out"), per_device_train_batch_size=t["microBatchSize"],
        gradient_accumulation_steps=t["gradientAccumulationSteps"], max_steps=t["maxSteps"],
        learning_rate=t["learningRate"], lr_scheduler_type=t["scheduler"], warmup_steps=warmup,
        weight_decay=t["weightDecay"], max_grad_norm=t["maxGradNorm"], optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=t["seed"],
        bf16=precision == "bf16", fp16=precision == "fp16", gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=cuda, remove_unused_columns=False,
        label_names=["labels"], use_cpu=not cuda, torch_compile=compile_model, use_liger_kernel=liger)
    if t["packing"]:
        collator = DataCollatorWithFlattening(return_position_ids=True)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = CountingTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                              callbacks=[StepCallback()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    setup_done = time.perf_counter()
    reset = _reset_peak_rss()
    trainer.train()
    training_peak = _proc_status_bytes("VmHWM") if reset else None
    numbers = _model_numbers(model)  # after train(): the Trainer enables gradient checkpointing itself
    step_losses = [sum(losses[i:i + gas]) for i in range(0, len(losses), gas)]
    extra = {"side": "baseline", "precision": precision, "setupSeconds": round(setup_done - imported, 3),
             "collator": type(collator).__name__, **numbers, "torchCompile": bool(args.torch_compile),
             "ligerKernels": bool(args.use_liger_kernel)}
    return _finish(clock, spec, extra, training_peak, step_losses)


def child_main(side: str, spec_path: str) -> int:
    """Entry point of a measurement subprocess: run one side, write its JSON next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    runner = run_kubetune_child if side == "kubetune" else run_baseline_child
    result = runner(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- orchestration
def machine_info(device: str) -> dict[str, Any]:
    """CPU model/cores (and GPU name/memory on CUDA), library versions, load average."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpuCount": os.cpu_count(), "cpuAffinity": len(os.sched_getaffinity(0)),
                            "loadAverage": [round(x, 2) for x in os.getloadavg()]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpuModel"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import transformers

    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": torch.cuda.get_device_name(0), "memoryBytes": int(props.total_memory),
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                       "cudaVersion": torch.version.cuda,
                       "peakBf16Tflops": peak_bf16_tflops(torch.cuda.get_device_name(0))}
    return info


def build_model(work: Path, model_arg: str, preset: dict) -> tuple[Path, dict]:
    """The model directory both sides load: the tiny preset, or random weights for a config.json."""
    sys.path.insert(0, str(TRAINER_SRC))
    from kubetune_trainer import tiny

    out = work / "model"
    if model_arg == "tiny":
        tiny.build_tiny_model(out, "llama", preset["hidden"], preset["layers"], preset["heads"], preset["kv_heads"],
                              max_positions=max(2048, preset["max_seq"]))
        return out, {"source": "tiny", "hidden": preset["hidden"], "layers": preset["layers"],
                     "heads": preset["heads"], "kvHeads": preset["kv_heads"]}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = Path(model_arg)
    if not config_path.is_file():
        raise SystemExit(f"--model: {model_arg} is neither 'tiny' nor a config.json file")
    raw = json.loads(config_path.read_text())
    if "model_type" not in raw:
        raise SystemExit(f"--model: {model_arg} has no model_type")
    tok = tiny.build_tokenizer(None, model_max_length=max(2048, preset["max_seq"]))
    if int(raw.get("vocab_size", 0)) < len(tok):
        raise SystemExit(f"--model: vocab_size {raw.get('vocab_size')} is smaller than the local tokenizer "
                         f"({len(tok)} tokens)")
    raw.update({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, {"source": str(config_path), "modelType": raw["model_type"], "hidden": raw.get("hidden_size"),
                 "layers": raw.get("num_hidden_layers")}


def make_plan(model_dir: Path, data: Path, out: Path, method: str, preset: dict, steps: int,
              precision: str, **training: Any) -> dict:
    """The contracts §2 plan both sides follow (no eval, no checkpoints inside the timed window)."""
    plan: dict[str, Any] = {
        "version": 1, "job": {"name": "bench", "namespace": "bench", "uid": "0"},
        "model": {"uri": str(model_dir), "trustRemoteCode": False},
        "dataset": {"uri": str(data), "format": "messages", "evalUri": "", "evalSplit": 0.0},
        "method": method,
        "training": {
            "epochs": 0, "maxSteps": steps, "learningRate": 2e-4, "microBatchSize": preset["micro_batch"],
            "gradientAccumulationSteps": 2, "maxSeqLength": preset["max_seq"], "packing": False,
            "warmupRatio": 0.1, "scheduler": "cosine", "optimizer": "adamw", "weightDecay": 0.0,
            "maxGradNorm": 1.0, "gradientCheckpointing": False, "precision": precision, "seed": 42,
            "completionOnly": True, "checkpointEverySteps": 1_000_000, "evalEverySteps": 0,
            "earlyStopping": {"patience": 0, "threshold": 0.0}},
        "distributed": {"strategy": "none", "zeroStage": 0, "offloadOptimizer": False, "offloadParams": False,
                        "numNodes": 1, "procsPerNode": 1},
        "output": {"uri": str(out), "mergeAdapter": False},
    }
    if method in ("lora", "qlora"):
        plan["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
    if method == "qlora":
        plan["quantization"] = {"bits": 4, "quantType": "nf4", "doubleQuant": True,
                                "computeDtype": "bfloat16" if precision == "bf16" else "float32"}
    plan["training"].update(training)
    return plan


def scenarios(device: str, quick: bool = False) -> list[tuple[str, str, dict]]:
    """(row name, what it shows, training overrides) for the default row and each speed feature."""
    rows = [("default", "padded batches, no gradient checkpointing", {}),
            ("packing", "training.packing: kubetune packs examples into maxSeqLength blocks; the baseline uses "
                        "DataCollatorWithFlattening (padding-free)", {"packing": True}),
            ("gradient_checkpointing", "training.gradientCheckpointing: recompute activations in backward",
             {"gradientCheckpointing": True}),
            ("eager", "training.attentionImplementation eager (plain matmul + softmax attention) instead of the "
                      "default sdpa (torch scaled_dot_product_attention); baseline: attn_implementation='eager'",
             {"attentionImplementation": "eager"})]
    if not quick:  # compilation takes minutes on CPU (inside the warm-up steps, outside the timed window)
        rows.append(("torch_compile", "training.torchCompile: torch.compile (inductor) of the LoRA-wrapped model; "
                                      "baseline: TrainingArguments(torch_compile=True)", {"torchCompile": True}))
    if device == "cuda":
        rows.append(("liger", "training.ligerKernels: Liger fused RMSNorm/RoPE/SwiGLU/linear+cross-entropy; "
                              "baseline: TrainingArguments(use_liger_kernel=True)", {"ligerKernels": True}))
        rows.append(("fp32", "training.precision fp32 instead of the default bf16", {"precision": "fp32"}))
    return rows


def select_rows(rows: list[tuple[str, str, dict]], wanted: str) -> list[tuple[str, str, dict]]:
    """The rows named in a comma-separated list (empty = all); 'default' is always run first (the reference)."""
    if not wanted:
        return rows
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    known = {name for name, _, _ in rows}
    unknown = sorted(names - known)
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(unknown)}; this device has {', '.join(sorted(known))}")
    return [row for row in rows if row[0] == "default" or row[0] in names]


def _locked(lock_file: Path | None):
    """An exclusive flock on `lock_file` for the duration (a no-op without one)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def hold():
        if lock_file is None:
            yield
            return
        with open(lock_file, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return hold()


def run_side(side: str, spec: dict, work: Path, timeout: float, lock_file: Path | None = None) -> dict:
    """Run one side in a fresh subprocess and return its measurements (raises with its stderr on failure).

    With `lock_file`, the subprocess runs under an exclusive flock on it (shared benchmark machines)."""
    spec_path = work / f"spec-{side}-{spec['row']}.json"
    spec["result_path"] = str(work / f"result-{side}-{spec['row']}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBETUNE_METRICS_PORT"):
        env.pop(key, None)
    env.update({"PYTHONPATH": str(TRAINER_SRC) + os.pathsep + env.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
                "KUBETUNE_WORK_DIR": spec["work_dir"], "KUBETUNE_PVC_ROOT": str(work / "pvc"),
                "KUBETUNE_TERMINATION_LOG": str(work / f"termination-{side}-{spec['row']}"),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                "DS_ACCELERATOR": "cuda" if spec["device"] == "cuda" else "cpu"})
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:  # one GPU per side: with several visible, transformers.Trainer would wrap the model in DataParallel
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    with _locked(lock_file):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, spec_path], env=env,
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run for row {spec['row']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(Path(spec["result_path"]).read_text())
    result["processWallSeconds"] = round(wall, 3)
    return result


def add_mfu(side: dict, method: str, peak: float | None) -> None:
    """Attach achieved model TFLOP/s and MFU (None without a known GPU peak, e.g. on CPU)."""
    flops = training_flops(method, side["matmulParameters"], side["trainableParameters"], side["timedTokens"],
                           side["layers"], side["attentionWidth"], side["timedSumSquaredLengths"])
    side["modelTflopsPerSecond"] = round(flops / side["timedSeconds"] / 1e12, 6) if side["timedSeconds"] > 0 else None
    value = mfu(flops, side["timedSeconds"], peak)
    side["mfu"] = None if value is None else round(value, 5)


def compare(kt: dict, hf: dict, cuda: bool) -> dict:
    """kubetune / baseline ratios for one row."""
    mem_key = "peakCudaAllocatedBytes" if cuda else "peakRssBytes"
    return {"tokensPerSecond": ratio(kt["tokensPerSecond"], hf["tokensPerSecond"]),
            "medianStepTokensPerSecond": ratio(kt["medianStepTokensPerSecond"],
                                               hf["medianStepTokensPerSecond"]),
            "peakMemory": ratio(kt.get(mem_key), hf.get(mem_key)), "peakMemoryMetric": mem_key,
            "trainingPeakRss": ratio(kt.get("trainingPeakRssBytes"), hf.get("trainingPeakRssBytes"))}


def _fmt_bytes(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f}MiB"


def print_table(report: dict) -> None:
    """Human-readable summary of a report."""
    cuda = report["config"]["device"] == "cuda"
    mem = "cuda peak" if cuda else "peak RSS"
    head = (f"{'row':<24}{'kubetune tok/s':>16}{'baseline tok/s':>16}{'ratio':>8}{'median':>8}  "
            f"{'kt ' + mem:>14}{'hf ' + mem:>14}{'ratio':>8}{'kt pad':>8}{'hf pad':>8}"
            f"{'kt setup':>10}{'hf setup':>10}")
    if cuda:
        head += f"{'kt MFU':>8}{'hf MFU':>8}"
    print(head)
    for row in report["rows"]:
        kt, hf, r = row["kubetune"], row["baseline"], row["ratio"]
        mkey = r["peakMemoryMetric"]
        line = (f"{row['name']:<24}{kt['tokensPerSecond']:>16.1f}{hf['tokensPerSecond']:>16.1f}"
                f"{r['tokensPerSecond']:>8.3f}{r['medianStepTokensPerSecond']:>8.3f}  "
                f"{_fmt_bytes(kt.get(mkey)):>14}{_fmt_bytes(hf.get(mkey)):>14}"
                f"{(r['peakMemory'] or 0):>8.3f}{kt['paddingFraction']:>8.2f}{hf['paddingFraction']:>8.2f}"
                f"{kt['setupSeconds']:>9.1f}s{hf['setupSeconds']:>9.1f}s")
        if cuda:
            line += "".join(f"{'-' if s.get('mfu') is None else format(s['mfu'], '.1%'):>8}" for s in (kt, hf))
        print(line)
    print("feature effect (tokens/s relative to the default row, same side):")
    for name, eff in report["featureEffects"].items():
        print(f"  {name:<22} kubetune x{eff['kubetune']}  baseline x{eff['baseline']}")


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build model + data, run every row on both sides, assemble the report."""
    preset = dict(TINY_PRESETS["quick" if args.quick else "full"])
    steps = args.steps or preset["steps"]
    warmup = min(preset["warmup_steps"], max(1, steps // 3))
    if steps <= warmup:
        raise SystemExit(f"--steps must be more than the {warmup} warm-up steps")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
    threads = args.threads or (1 if args.device == "cpu" else 4)
    precision = "bf16" if args.device == "cuda" else "fp32"
    info = machine_info(args.device)
    peak = info.get("gpu", {}).get("peakBf16Tflops")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        model_dir, model_info = build_model(work, args.model, preset)
        data = write_dataset(work / "train.jsonl", preset["examples"], max_digits=max(3, preset["max_seq"] // 4))
        rows = []
        for name, meaning, overrides in select_rows(scenarios(args.device, args.quick and not args.rows), args.rows):
            row_precision = overrides.get("precision", precision)
            sides = {}
            order = ("kubetune", "baseline") if len(rows) % 2 == 0 else ("baseline", "kubetune")
            for side in order:
                wdir = work / f"work-{side}-{name}"
                plan = make_plan(model_dir, data, work / f"out-{side}-{name}", args.method, preset, steps,
                                 row_precision, **{k: v for k, v in overrides.items() if k != "precision"})
                spec = {"row": name, "plan": plan, "device": args.device, "precision": row_precision,
                        "threads": threads, "warmup_steps": warmup, "work_dir": str(wdir)}
                now = dt.datetime.now(dt.timezone.utc)
                print(f"[{now:%H:%M:%S}] {name}: {side} ...", file=sys.stderr, flush=True)
                sides[side] = run_side(side, spec, work, args.timeout, args.lock_file)
                add_mfu(sides[side], args.method, peak)  # achieved model FLOP/s everywhere; MFU needs a known GPU
            rows.append({"name": name, "meaning": meaning, "overrides": overrides, "kubetune": sides["kubetune"],
                         "baseline": sides["baseline"],
                         "ratio": compare(sides["kubetune"], sides["baseline"], args.device == "cuda")})
    default = rows[0]
    effects = {row["name"]: {side: ratio(row[side]["tokensPerSecond"], default[side]["tokensPerSecond"])
                             for side in ("kubetune", "baseline")} for row in rows[1:]}
    info["loadAverageAfter"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "schemaVersion": SCHEMA_VERSION, "benchmark": "train_throughput",
        "createdAt": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/train_throughput.py", *args.argv]),
        "config": {"device": args.device, "method": args.method, "quick": args.quick, "model": model_info,
                   "steps": steps, "warmupSteps": warmup, "threads": threads, "precision": precision,
                   "microBatchSize": preset["micro_batch"], "gradientAccumulationSteps": 2,
                   "maxSeqLength": preset["max_seq"], "examples": preset["examples"]},
        "measured": ("tokens/s = non-padding tokens fed to the model in optimizer steps warmupSteps+1..steps divided "
                     "by the wall time from the end of step warmupSteps to the end of the last step; each side in "
                     "its own fresh subprocess; peakRssBytes = the child's VmHWM (whole process), "
                     "trainingPeakRssBytes = VmHWM reset just before training (null where the kernel refuses); "
                     "CUDA: torch.cuda.max_memory_allocated during training"),
        "mfuMethod": ("modelTflopsPerSecond on every device, mfu on CUDA only: model FLOPs (full 6N, LoRA/QLoRA "
                      "4N + 6N_trainable per token, N = matmul parameters without the input embedding, plus "
                      "attention 12*layers*width*sum(L^2), no recomputation) / timed seconds / the GPU's dense "
                      "bf16 peak"),
        "featureRowsLeftOut": {name: why for name, why in (
            ("torch_compile", "not in --quick: compilation takes minutes on CPU" if args.quick else ""),
            ("liger", "CUDA only (Triton kernels)" if args.device != "cuda" else ""),
            ("fp32", "CUDA only (fp32 is already the CPU default)" if args.device != "cuda" else ""))
            if why and name not in {row["name"] for row in rows}},
        "machine": info, "rows": rows, "featureEffects": effects,
    }


def default_out(device: str, method: str) -> Path:
    """bench/results/train_throughput-<device>-<method>.json"""
    return RESULTS_DIR / f"train_throughput-{device}-{method}.json"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small preset for CI (minutes on 2 CPU cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="tiny", help="'tiny' or a config.json path (random weights)")
    parser.add_argument("--method", choices=("lora", "full", "qlora"), default="lora")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per side (default 1 on cpu: stable on shared cores; 4 on cuda)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per side")
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default: all for the device; "
                        "'default' always runs, as the reference)")
    parser.add_argument("--lock-file", type=Path, default=None,
                        help="hold an exclusive flock on this file while each side trains (shared machines)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/...)")
    args = parser.parse_args(argv)
    args.argv = argv
    report = run_benchmark(args)
    out = args.out or default_out(args.device, args.method)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
