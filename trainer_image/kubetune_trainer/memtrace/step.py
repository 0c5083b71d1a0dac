"""Trace the memory of the trainer's real training step on fake tensors: `trace_step(plan, config)`.

The recipe's own code runs: `FineTuneRecipe._build_model_and_engine` (model load as `methods.load_base_model`
does, with the config standing in for the checkpoint; `apply_method`; the optimizer, scheduler and engine) and
`FineTuneRecipe.train` (micro-batches with gradient accumulation, forward, loss, backward, clipping, optimizer
step), for two optimizer steps so that the second one runs with optimizer states alive. Everything happens
under `FakeTensorMode` on CPU (autocast works there, so dtypes are those of a GPU run) with a `StorageCounter`
on top, so no memory is allocated and the full-size model traces in seconds to a minute.

What differs from running on CPU, and is made to match CUDA instead: the attention kernel (see
`attention.py`), foreach optimizers (`cuda_defaults.py`), bitsandbytes 4-bit weights and the dequantize
temporaries of its CUDA training path (`quantized.py`), paged optimizer states (reported apart). The batch is
real (a few kilobytes of token ids), so transformers makes the same mask decisions as on a GPU; scalar reads
of fake values (the loss for logging, the gradient norm) return 0.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from kubetune_trainer.host_embeddings import host_parameter_count, host_table_bytes
from kubetune_trainer.memtrace.attention import KernelLog, cuda_attention
from kubetune_trainer.memtrace.build import BuildLog, TraceError, config_loader, resolve_config
from kubetune_trainer.memtrace.counter import StorageCounter
from kubetune_trainer.memtrace.cuda_defaults import cuda_optimizer_defaults, paged_optimizer_states
from kubetune_trainer.memtrace.fake_support import FakeExecutor, swappable_fake_tensors
from kubetune_trainer.memtrace.quantized import isolated_qmaps
from kubetune_trainer.memtrace.report import TraceReport

OPTIMIZER_STEPS = 2  # the second step is the first one with optimizer states alive during forward/backward
MAX_MICRO_STEPS = 2  # later micro-steps repeat the second (gradients alive + one micro-batch of activations)
TRACE_URI = "trace://not-read"
# FineTuneRecipe.setup() steps that only derive settings from the plan (run before the build, if present)
SETUP_DECISIONS = ("_resolve_memory_features",)


def plan_settings(method: str = "lora", *, micro_batch_size: int = 1, seq_length: int = 2048,
                  gradient_accumulation_steps: int = 1, lora_r: int = 16, lora_alpha: float | None = None,
                  target_modules: tuple[str, ...] | list[str] = ("all-linear",), optimizer: str = "adamw",
                  precision: str = "bf16", gradient_checkpointing: bool = True, packing: bool = False,
                  attention: str = "auto", liger_kernels: bool = False, bits: int = 4, quant_type: str = "nf4",
                  double_quant: bool = True, compute_dtype: str = "bfloat16", max_grad_norm: float = 1.0,
                  trust_remote_code: bool = False, activation_offloading: bool = False,
                  embeddings_on_host: bool | None = None) -> dict[str, Any]:
    """A trainer plan dict (docs/contracts.md §2) with the fields that decide memory; the rest placeholders."""
    plan: dict[str, Any] = {
        "version": 1,
        "model": {"uri": TRACE_URI, "trustRemoteCode": trust_remote_code},
        "dataset": {"uri": TRACE_URI},
        "method": method,
        "training": {"maxSteps": OPTIMIZER_STEPS, "microBatchSize": micro_batch_size,
                     "gradientAccumulationSteps": gradient_accumulation_steps, "maxSeqLength": seq_length,
                     "packing": packing, "optimizer": optimizer, "precision": precision,
                     "gradientCheckpointing": gradient_checkpointing, "attentionImplementation": attention,
                     "ligerKernels": liger_kernels, "maxGradNorm": max_grad_norm,
                     "activationOffloading": activation_offloading},
        "output": {"uri": TRACE_URI},
    }
    if embeddings_on_host is not None:  # absent: auto, as the operator leaves it
        plan["training"]["embeddingsOnHost"] = embeddings_on_host
    if method != "full":
        plan["lora"] = {"r": lora_r, "alpha": float(lora_alpha if lora_alpha is not None else 2 * lora_r),
                        "dropout": 0.0, "targetModules": list(target_modules)}
    if method == "qlora":
        plan["quantization"] = {"bits": bits, "quantType": quant_type, "doubleQuant": double_quant,
                                "computeDtype": compute_dtype}
    return plan


def trace_plan(settings: Any):
    """The plan to trace: `settings` (a Plan or plan dict) on one process, for two optimizer steps of at most
    two micro-batches, without checkpoints, evaluation or torch.compile.

    Returns (plan, notes, the gradient accumulation steps the settings ask for)."""
    from kubetune_trainer.plan import Plan, TrainingPlan, parse_plan

    data = settings.to_json_dict() if isinstance(settings, Plan) else dict(settings)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    training = data["training"] = dict(data.get("training") or {})
    notes: list[str] = []
    gas = int(training.get("gradientAccumulationSteps",
                           TrainingPlan.model_fields["gradient_accumulation_steps"].default))
    training.update(epochs=0, maxSteps=OPTIMIZER_STEPS, gradientAccumulationSteps=min(gas, MAX_MICRO_STEPS),
                    checkpointEverySteps=1_000_000, evalEverySteps=0,
                    earlyStopping={"patience": 0, "threshold": 0.0})
    if gas > MAX_MICRO_STEPS:
        notes.append(f"{MAX_MICRO_STEPS} of {gas} micro-batches per optimizer step traced (later ones repeat the "
                     "second: gradients alive plus one micro-batch of activations)")
    if training.pop("torchCompile", False):
        notes.append("torch.compile is not traced (eager step traced)")
    distributed = dict(data.get("distributed") or {})
    if distributed.get("strategy", "none") != "none":
        notes.append(f"traced as one process; {distributed['strategy']} partitioning and communication buffers "
                     "are not part of the trace")
    data["distributed"] = {"strategy": "none"}
    data.setdefault("dataset", {"uri": TRACE_URI})
    data.setdefault("output", {"uri": TRACE_URI})
    data["output"] = {"uri": data["output"].get("uri") or TRACE_URI}
    return parse_plan(data), notes, gas


def _requested_strategy(settings: Any) -> str:
    """distributed.strategy of the settings (a Plan or plan dict), 'none' when absent."""
    from kubetune_trainer.plan import Plan

    data = settings.to_json_dict() if isinstance(settings, Plan) else dict(settings)
    return str((data.get("distributed") or {}).get("strategy", "none"))


def _batch_rows(plan, vocab_size: int) -> tuple[list[dict], bool]:
    """Token rows for one micro-batch, as the data pipeline hands them to the collator; (rows, padded)."""
    t = plan.training
    seq, mbs = t.max_seq_length, t.micro_batch_size
    rows = []
    padded = False
    for i in range(mbs):
        length = seq
        if not t.packing and mbs > 1 and i == mbs - 1:
            length = max(2, seq - seq // 8)  # unpacked batches are padded to their longest row
            padded = True
        ids = [(7 * j + i) % vocab_size for j in range(length)]
        row = {"input_ids": ids, "labels": list(ids)}
        if t.packing:
            piece = max(1, seq // 4)  # four examples per packed block
            row["position_ids"] = [j % piece for j in range(length)]
            row["attention_mask"] = [1] * length
        rows.append(row)
    return rows, padded


def _optimizers(engine) -> list:
    """The optimizers an engine holds (its `optimizer`, or any attribute holding optimizers)."""
    found = []
    for value in vars(engine).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found += [item for item in items if isinstance(item, torch.optim.Optimizer)]
    return found


def _optimizer_tensors(optimizers) -> list[torch.Tensor]:
    """Tensors optimizers hold: per-parameter state and tensor-valued hyperparameters (not the parameters)."""
    out = []
    for opt in optimizers:
        for state in opt.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
        for group in opt.param_groups:
            out += [v for k, v in group.items() if k != "params" and isinstance(v, torch.Tensor)]
    return out


def _model_state(model) -> list[torch.Tensor]:
    """The model's parameters and buffers, plus the quantization state of bitsandbytes 4-bit weights."""
    from kubetune_trainer.memtrace.quantized import quant_state_tensors

    out = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            out += [t for _, t in quant_state_tensors(state)]
    return out


class _StepProbe:
    """Labels the phase of the step for the counter and the storages that become gradients / optimizer states."""

    def __init__(self, counter: StorageCounter, engine, grad_accum: int) -> None:
        self.counter = counter
        self.engine = engine
        self.grad_accum = grad_accum
        self.forwards = 0
        self.steps = 0
        self.params = [p for p in engine.raw_model.parameters() if p.requires_grad]
        self._handles: list[Any] = []

    def _where(self) -> str:
        step, micro = divmod(self.forwards - 1, self.grad_accum)
        return f"step {step + 1} micro-batch {micro + 1}"

    def install(self, module_names: dict[int, str]) -> None:
        """Wrap the engine's forward/backward/step and hook gradients and module entry/exit."""
        engine, counter = self.engine, self.counter
        forward, backward, step = engine.forward, engine.backward, engine.step
        stack: list[str] = []  # modules being run; a checkpoint's recompute may stop without leaving them

        def phase(name: str) -> None:
            stack.clear()
            counter.where = ""
            counter.phase = name

        def traced_forward(batch):
            self.forwards += 1
            phase(f"{self._where()}: forward")
            out = forward(batch)
            phase(f"{self._where()}: loss")
            return out

        def traced_backward(loss):
            phase(f"{self._where()}: backward")
            backward(loss)
            counter.label((p.grad for p in self.params), "gradients")
            phase(f"{self._where()}: after backward")

        def traced_step():
            self.steps += 1
            counter.label((p.grad for p in self.params), "gradients")
            before = set(counter.live_entries())
            phase(f"step {self.steps}: optimizer step")
            result = step()
            counter.label_live("optimizerStates", lambda e: e not in before and e.category == "activations")
            counter.label(_optimizer_tensors(_optimizers(engine)), "optimizerStates")
            phase(f"step {self.steps}: after optimizer step")
            return result

        engine.forward, engine.backward, engine.step = traced_forward, traced_backward, traced_step
        def accumulated(param) -> None:
            counter.label([param.grad], "gradients")

        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(accumulated))

        def enter(module, _args):
            stack.append(module_names.get(id(module), type(module).__name__))
            counter.where = stack[-1]

        def leave(module, _args, _out):
            if stack:
                stack.pop()
            counter.where = stack[-1] if stack else ""

        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles.append(register_module_forward_pre_hook(enter))
        self._handles.append(register_module_forward_hook(leave))

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# Trainer modules the recipe imports while it builds the model and engine
TRAINER_MODULES = ("engine", "loss", "methods", "optim", "recipe", "speedups")


def _import_before_faking(config, uses_bitsandbytes: bool) -> None:
    """Import what the build would import lazily, before the fake mode is on: module-level tensors created
    at import time must be real, or they would stay fake in those modules after the trace."""
    import importlib
    import importlib.util

    import peft.tuners  # noqa: F401 - every tuner module
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(config)]  # imports the architecture's modeling module
    for name in TRAINER_MODULES:
        if importlib.util.find_spec(f"kubetune_trainer.{name}") is not None:
            importlib.import_module(f"kubetune_trainer.{name}")
    if uses_bitsandbytes:
        import bitsandbytes  # noqa: F401


def _base_param_count(model) -> int:
    total = host_parameter_count(model)  # a table moved to host memory is no longer a model parameter
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def _module_names(model) -> dict[int, str]:
    prefix = "base_model.model."
    return {id(m): (name[len(prefix):] if name.startswith(prefix) else name) or type(m).__name__
            for name, m in model.named_modules()}


@contextlib.contextmanager
def offload_transfers(counter: StorageCounter):
    """Activation offloading's copies as a GPU run makes them: the copy out is host memory (counted apart from
    the device peak), the copy back in backward a new device tensor. On CPU, `.to("cpu")` would return the
    same tensor, so both are allocations here."""
    from kubetune_trainer import offload

    def host_copy(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
        with counter.host_allocations():
            return torch.empty(tensor.size(), dtype=tensor.dtype, device=tensor.device)

    def device_copy(host: torch.Tensor, device: torch.device, pin_memory: bool) -> torch.Tensor:
        return torch.empty(host.size(), dtype=host.dtype, device=host.device)

    saved = offload.host_copy, offload.device_copy
    offload.host_copy, offload.device_copy = host_copy, device_copy
    try:
        yield
    finally:
        offload.host_copy, offload.device_copy = saved


def _recipe_for_trace(plan, precision: str, attn: str | None, strategy: str = "none"):
    """A FineTuneRecipe set up as setup() would on one GPU, minus distributed init, tokenizer, data and resume.

    `strategy` is the one the settings ask for: the recipe's memory decisions follow it (e.g. no token-wise
    recomputation under DeepSpeed), then the step runs as one process."""
    from kubetune_trainer.recipe import FineTuneRecipe, RunEnv

    recipe = FineTuneRecipe(plan, RunEnv(work_dir=Path(TRACE_URI)))
    recipe.precision = precision
    recipe.attn_implementation = attn
    recipe.strategy = strategy
    recipe.model_dir = Path(TRACE_URI)  # never read: the config loader stands in for from_pretrained
    recipe.total_steps = OPTIMIZER_STEPS
    recipe.device = torch.device("cuda")  # the decisions a GPU run makes (no CUDA call is made)
    for name in SETUP_DECISIONS:
        decide = getattr(recipe, name, None)
        if callable(decide):
            decide()
    recipe.device = torch.device("cpu")
    recipe.strategy = "none"
    return recipe


def _build(recipe, plan, model_type: str) -> None:
    """The recipe's own model + engine build; any failure becomes a TraceError naming the model."""
    try:
        recipe._build_model_and_engine()
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the step that failed
        raise TraceError(f"the trace could not build the {plan.method} model for model_type {model_type!r}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _run_steps(recipe, counter: StorageCounter, rows: list[dict]) -> None:
    """FineTuneRecipe.train() for the traced steps, fed with real token batches built by the trainer's collator."""
    from torch.utils._python_dispatch import _disable_current_modes

    from kubetune_trainer.data import DataCollator

    collator = DataCollator(pad_token_id=0)
    tokens = sum(len(r["input_ids"]) for r in rows)

    def micro_batch(index: int):
        with _disable_current_modes():
            batch = collator(rows)
        for tensor in batch.values():
            counter.track(tensor, "batch")
        return batch, tokens

    recipe.micro_batch = micro_batch
    recipe.micro_per_epoch = 10 ** 9  # no epoch boundary, so no evaluation
    recipe.train_rows = rows
    recipe.eval_rows = None
    recipe.started = time.time()
    probe = _StepProbe(counter, recipe.engine, recipe.t.gradient_accumulation_steps)
    probe.install(_module_names(recipe.engine.raw_model))
    try:
        recipe.train()
    except Exception as exc:  # noqa: BLE001 - name the phase that failed
        raise TraceError(f"the traced training step failed at {counter.phase}: {type(exc).__name__}: {exc}") from exc
    finally:
        probe.remove()


def trace_step(settings: Any, config: Any, *, model_name: str = "") -> TraceReport:
    """Trace one process's GPU memory for the plan's training step on the architecture in `config` (a
    config.json dict or transformers config). `settings` is a trainer Plan or plan dict (see `plan_settings`).

    Raises UnsupportedModel (a TraceError) when the architecture cannot be built, naming what is missing, and
    TraceError when the traced step fails. Not thread-safe: it patches library functions while it runs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    from kubetune_trainer.methods import resolve_precision
    from kubetune_trainer.packed_attention import varlen_problem
    from kubetune_trainer.speedups import resolve_attention

    started = time.perf_counter()
    requested_strategy = _requested_strategy(settings)
    plan, notes, requested_gas = trace_plan(settings)
    cfg = resolve_config(config, trust_remote_code=plan.model.trust_remote_code)
    t = plan.training
    precision = resolve_precision(t.precision, True, True)  # what a bf16-capable GPU resolves
    attn = resolve_attention(t.attention_implementation, cuda=True, precision=precision, flash_attn_installed=True,
                             packing=t.packing, varlen_problem=varlen_problem(cuda=True, precision=precision))
    force_flash = attn == "flash_attention_2"
    if force_flash:
        attn = "sdpa"  # flash-attn cannot run on CPU: SDPA with the flash kernel keeps the same tensors
        notes.append("flash_attention_2 traced as SDPA's flash kernel (same saved tensors)")
    if t.liger_kernels:
        notes.append("Liger kernels are Triton GPU kernels: the trace runs the plain PyTorch path")
    rows, padded = _batch_rows(plan, int(getattr(cfg, "vocab_size", 0) or 32000))

    uses_bnb = plan.method == "qlora" or t.optimizer not in ("adamw", "sgd")
    executor = FakeExecutor(bitsandbytes_4bit=plan.method == "qlora")
    counter = StorageCounter(run_op=executor)
    executor.counter = counter
    kernels, build_log = KernelLog(), BuildLog()
    _import_before_faking(cfg, uses_bnb)
    with contextlib.ExitStack() as stack:
        if uses_bnb:
            stack.enter_context(isolated_qmaps())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(swappable_fake_tensors())
        stack.enter_context(counter)
        stack.enter_context(config_loader(cfg, build_log, without_modes=_disable_current_modes))
        stack.enter_context(cuda_attention(kernels, force_flash=force_flash))
        stack.enter_context(cuda_optimizer_defaults())
        stack.enter_context(paged_optimizer_states(counter.paged_allocations))
        stack.enter_context(offload_transfers(counter))

        counter.phase = "model build"
        recipe = _recipe_for_trace(plan, precision, attn, requested_strategy)
        _build(recipe, plan, cfg.model_type)
        model = recipe.engine.raw_model
        gc.collect()
        counter.label(_model_state(model), "weights")
        counter.label(_optimizer_tensors(_optimizers(recipe.engine)), "optimizerStates")
        weights_bytes = counter.live_breakdown()["weights"]
        counter.phase = "before the first step"
        counter.reset_peak()
        _run_steps(recipe, counter, rows)

        breakdown = counter.peak_breakdown()
        total_params = _base_param_count(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        largest = [{"category": c, "op": op, "bytes": n} for c, op, n in counter.peak_largest(5)]
        paged = max(counter.peak_paged_bytes, counter.paged_bytes)
        host_weights = host_table_bytes(model)
        host = counter.max_host_bytes - host_weights
        del recipe, model
    notes += build_log.notes
    if executor.scalar_reads:
        notes.append(f"{executor.scalar_reads} scalar read(s) of fake values returned 0 (logged loss and gradient "
                     "norm, code-book values)")
    if sum(breakdown.values()) != counter.peak_bytes:
        notes.append(f"breakdown sums to {sum(breakdown.values())} bytes, not the peak {counter.peak_bytes}")
    moment = counter.peak_moment
    return TraceReport(
        model=model_name or str(getattr(cfg, "name_or_path", "") or cfg.model_type),
        model_type=cfg.model_type, method=plan.method, precision=precision,
        micro_batch_size=t.micro_batch_size, seq_length=t.max_seq_length,
        gradient_accumulation_steps=requested_gas,
        micro_steps_traced=t.gradient_accumulation_steps, optimizer_steps_traced=OPTIMIZER_STEPS,
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing, padded_batch=padded,
        optimizer=t.optimizer, attention=kernels.summary(), total_params=total_params, trainable_params=trainable,
        weights_bytes=weights_bytes, peak_bytes=counter.peak_bytes, breakdown=breakdown,
        paged_optimizer_bytes=paged, host_activation_bytes=host, host_weight_bytes=host_weights,
        peak_phase=moment.phase, peak_op=moment.op, peak_where=moment.where,
        largest_at_peak=largest, ops=counter.ops, seconds=round(time.perf_counter() - started, 2), notes=notes)
