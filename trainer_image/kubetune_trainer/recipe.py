"""The fine-tuning recipe: plan → (full | LoRA | QLoRA) training run → outputs in the §4 layout.

    recipe = FineTuneRecipe(plan, RunEnv.from_env())
    recipe.setup(); result = recipe.train(); recipe.export(); recipe.cleanup()

One class, four phases (setup → train → save_checkpoint → cleanup), a plain loop: every
optimizer step takes `gradientAccumulationSteps` micro-batches of `microBatchSize` examples
per process. The order of micro-batches is a pure function of (seed, epoch, world size), so
a restarted run resumes at the exact data position from the step number alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import NonFiniteLossError, PlanError
from kubetune_trainer.threads import cpu_threads
from kubetune_trainer.plan import Plan
from kubetune_trainer.preemption import GracefulStop
from kubetune_trainer.speedups import SpeedReport
from kubetune_trainer.storage import join_uri

log = logging.getLogger("kubetune_trainer")

HISTORY_LIMIT = 5000


@dataclass
class RunEnv:
    """Process placement and filesystem locations (docs/contracts.md §3 + torchrun's variables)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    work_dir: Path = Path("/var/lib/kubetune")
    metrics_port: int | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "RunEnv":
        """Read RANK/LOCAL_RANK/WORLD_SIZE (torchrun) and the KUBETUNE_* variables."""
        from kubetune_trainer.metrics_server import metrics_port_from_env

        e = os.environ if env is None else env
        return cls(
            rank=int(e.get("RANK", "0")),
            local_rank=int(e.get("LOCAL_RANK", "0")),
            world_size=int(e.get("WORLD_SIZE", "1")),
            node_rank=int(e.get("KUBETUNE_NODE_RANK", e.get("GROUP_RANK", "0")) or 0),
            work_dir=Path(e.get("KUBETUNE_WORK_DIR") or "/var/lib/kubetune"),
            metrics_port=metrics_port_from_env(dict(e)),
        )

    @property
    def is_main(self) -> bool:
        """Global rank 0 (node 0): writes outputs, summary, serves metrics."""
        return self.rank == 0


@dataclass
class TrainResult:
    """What the run achieved (feeds metrics.json and the termination summary)."""

    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens: int = 0
    runtime_seconds: float = 0.0
    tokens_per_second: float = 0.0
    # The training steps' own rate: tokens over the seconds spent inside optimizer steps after this attempt's
    # first (no warm-up step, evaluation or checkpoint saving), what a longer run of the same job sustains.
    steady_tokens_per_second: float = 0.0
    resumed_from_step: int = 0
    early_stopped: bool = False
    stop_message: str = ""
    checkpoint_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def perplexity(self) -> float | None:
        """exp(eval loss) (None without eval; capped to avoid overflow)."""
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 80.0))


def total_optimizer_steps(train_size: int, micro_batch: int, grad_accum: int, world: int,
                          epochs: float, max_steps: int) -> tuple[int, int]:
    """(total optimizer steps, micro-batches per epoch per process) for the plan's length."""
    per_rank = math.ceil(train_size / world)
    micro_per_epoch = max(1, math.ceil(per_rank / micro_batch))
    if max_steps > 0:
        return max_steps, micro_per_epoch
    return max(1, math.ceil(epochs * micro_per_epoch / grad_accum)), micro_per_epoch


def epoch_shard(train_size: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's example indices for `epoch`: a seeded permutation, padded (wrapped) to a multiple of
    the world size so every rank runs the same number of micro-batches."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(train_size, generator=gen).tolist()
    per_rank = math.ceil(train_size / world)
    order = (order * (1 + (per_rank * world) // max(1, train_size)))[: per_rank * world]
    return order[rank::world]


class FineTuneRecipe:
    """setup → train → save_checkpoint (periodic) → export → cleanup."""

    def __init__(self, plan: Plan, env: RunEnv, stop: GracefulStop | None = None) -> None:
        self.plan = plan
        self.env = env
        self.stop = stop if stop is not None else GracefulStop()
        self.t = plan.training
        self.result = TrainResult()
        self.metrics = None
        self.server = None
        self.engine = None
        self._dist = False
        self._shards: dict[int, list[int]] = {}
        self.data_report: dict[str, Any] = {}
        self.speed = SpeedReport(attention_requested=plan.training.attention_implementation)
        self.attn_implementation: str | None = None
        self.tracker = None  # kubetune_trainer.trackers.Trackers on rank 0 when the plan has tracking

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Distributed init, seeding, tokenizer + data, model + method, optimizer, engine, resume."""
        import torch

        from kubetune_trainer import storage
        from kubetune_trainer.metrics_server import MetricsServer, TrainingMetrics
        from kubetune_trainer.methods import resolve_precision

        self.started = time.time()
        self.env.work_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HF_HOME", str(self.env.work_dir / "hf"))
        if self.env.is_main:
            self.metrics = TrainingMetrics()
            self.server = MetricsServer(self.metrics, self.env.metrics_port)
            if self.server.port is not None:
                log.info("serving /metrics and /progress on port %d", self.server.port)
        self._set_phase("setup")
        cuda = torch.cuda.is_available()
        threads = cpu_threads(os.environ.get("KUBETUNE_CPUS"), self.plan.distributed.procs_per_node, os.cpu_count())
        if threads is not None and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda", self.env.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(self.t.precision, cuda, cuda and torch.cuda.is_bf16_supported())
        self._check_speed_features(cuda)
        self.strategy = self.plan.distributed.strategy
        if self.strategy == "none" and self.env.world_size > 1:
            raise PlanError(f"distributed.strategy: none, but {self.env.world_size} processes were launched")
        self._resolve_memory_features()
        self._init_distributed()
        self._seed(self.t.seed)

        self.output_dir = storage.output_dir(self.plan.output.uri)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.model_dir = storage.fetch_model(self.plan.model.uri)
        self._load_tokenizer()
        self._load_data()
        self._build_model_and_engine()
        self._resume()
        self._check_output()
        self._start_tracking()

    def _check_speed_features(self, cuda: bool) -> None:
        """Refuse speed features that cannot run here (InvalidPlan) before any data or model is loaded."""
        from kubetune_trainer.speedups import compiler_problem, package_available, resolve_attention

        from kubetune_trainer.packed_attention import cuda_capability, varlen_problem

        capability = cuda_capability() if cuda else None
        self.attn_implementation = resolve_attention(
            self.t.attention_implementation, cuda=cuda, precision=self.precision,
            flash_attn_installed=package_available("flash_attn"), packing=self.t.packing,
            varlen_problem=varlen_problem(cuda=cuda, precision=self.precision, capability=capability))
        problem = compiler_problem(cuda=cuda) if self.t.torch_compile else ""
        if problem:
            raise PlanError(f"training.torchCompile: {problem}; install one or turn torchCompile off")

    def _keep_attention_supported(self, model) -> None:
        """Back to SDPA where the model's attention cannot run as variable-length attention (soft-capping)."""
        from kubetune_trainer.packed_attention import ATTENTION, config_problem

        if getattr(model.config, "_attn_implementation", None) != ATTENTION:
            return
        problem = config_problem(model.config)
        if problem:
            log.info("attention: sdpa, not variable-length attention (%s)", problem)
            model.set_attn_implementation("sdpa")

    def _resolve_memory_features(self) -> None:
        """Weight dtype of a full fine-tune, optimizer-in-backward, activation offloading (InvalidPlan if not here)."""
        from kubetune_trainer.engine import in_backward_problem, resolve_optimizer_in_backward
        from kubetune_trainer.methods import resolve_full_weights

        self.full_weights = resolve_full_weights(self.t.master_weights, method=self.plan.method,
                                                 precision=self.precision, strategy=self.strategy)
        problem = in_backward_problem(strategy=self.strategy, grad_accum=self.t.gradient_accumulation_steps,
                                      max_grad_norm=self.t.max_grad_norm, precision=self.precision)
        self.optimizer_in_backward = resolve_optimizer_in_backward(self.t.optimizer_in_backward, problem)
        if self.t.activation_offloading and self.strategy == "deepspeed":
            raise PlanError("training.activationOffloading: not supported with distributed.strategy deepspeed; "
                            "use ddp or turn it off")
        self.speed.master_weights = "none" if self.full_weights == "bf16" else "fp32"
        self.speed.optimizer_in_backward = self.optimizer_in_backward
        self.speed.activation_offloading = self.t.activation_offloading
        self._resolve_tokenwise()
        self._resolve_embeddings_on_host()

    def _resolve_embeddings_on_host(self) -> None:
        """training.embeddingsOnHost: auto per kubetune_trainer.host_embeddings; InvalidPlan when true where it
        cannot run."""
        from kubetune_trainer.host_embeddings import embeddings_problem

        if self.t.embeddings_on_host is None:
            self.embeddings_on_host = not embeddings_problem(method=self.plan.method, strategy=self.strategy,
                                                             cuda=self.device.type == "cuda")
            return
        if self.t.embeddings_on_host:
            # asked for: it also runs on CPU (host and device are one memory there), so only the plan can refuse it
            problem = embeddings_problem(method=self.plan.method, strategy=self.strategy, cuda=True)
            if problem:
                raise PlanError(f"training.embeddingsOnHost: {problem}; leave it unset (auto) or false")
        self.embeddings_on_host = bool(self.t.embeddings_on_host)

    def _apply_embeddings_on_host(self, model) -> None:
        from kubetune_trainer.host_embeddings import model_problem, move_input_embeddings_to_host

        if not getattr(self, "embeddings_on_host", False):
            return
        problem = model_problem(model)
        if problem and self.t.embeddings_on_host:
            raise PlanError(f"training.embeddingsOnHost: {problem}; leave it unset (auto) or false")
        if problem:
            log.info("input embeddings stay on %s (%s)", self.device, problem)
            return
        move_input_embeddings_to_host(model, self.device, compiled=self.t.torch_compile)
        self.speed.embeddings_on_host = True

    def _resolve_tokenwise(self) -> None:
        """Token-wise recomputation of the decoder norms (always where it can run) and tiled MLPs
        (training.tiledMlp, auto per kubetune_trainer.tokenwise); InvalidPlan when tiledMlp is true where it cannot."""
        from kubetune_trainer.tokenwise import recompute_problem, tiled_mlp_problem

        problem = recompute_problem(strategy=self.strategy, torch_compile=self.t.torch_compile)
        self.recompute_norms = not problem
        if self.t.tiled_mlp is None:
            self.tiled_mlp = not tiled_mlp_problem(method=self.plan.method,
                                                   gradient_checkpointing=self.t.gradient_checkpointing,
                                                   strategy=self.strategy, torch_compile=self.t.torch_compile)
        elif self.t.tiled_mlp and problem:
            raise PlanError(f"training.tiledMlp: {problem}; leave it unset (auto) or false")
        else:
            self.tiled_mlp = bool(self.t.tiled_mlp)

    def _apply_tokenwise(self, model) -> None:
        from kubetune_trainer.tokenwise import apply_tokenwise

        tiled, norms = getattr(self, "tiled_mlp", False), getattr(self, "recompute_norms", False)
        norms = norms and not self.speed.liger_kernels  # Liger's RMSNorm already saves only its input
        if not (tiled or norms):
            return
        config = model.config
        width = int(getattr(config, "intermediate_size", 0) or 4 * int(getattr(config, "hidden_size", 1)))
        counts = apply_tokenwise(model, tiled_mlp=tiled, norms=norms, intermediate_size=width,
                                 element_bytes=4 if self.precision == "fp32" else 2)
        self.speed.tiled_mlp = counts["mlps"] > 0
        self.speed.recomputed_norms = counts["norms"] > 0

    def _init_distributed(self) -> None:
        import torch

        if self.strategy == "none":
            return
        if self.env.world_size == 1:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if self.strategy == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        elif not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=backend)
        self._dist = True

    def _seed(self, seed: int) -> None:
        import random

        import torch

        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % (2 ** 32))
        except ImportError:
            pass

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir),
                                                       trust_remote_code=self.plan.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from kubetune_trainer.data.chat_templates import apply_override

        apply_override(self.tokenizer, self.plan.dataset.chat_template)  # InvalidPlan before any data is read

    def _load_data(self) -> None:
        from kubetune_trainer.data import DataCollator, build_datasets

        self._set_phase("loading data")
        prepared = build_datasets(self.plan.dataset.to_json_dict(), self.t.to_json_dict(), self.tokenizer,
                                  self.t.seed)
        self.train_rows = prepared.train
        self.eval_rows = prepared.eval
        self.data_report = prepared.report
        self.collator = DataCollator.for_tokenizer(self.tokenizer)
        self.total_steps, self.micro_per_epoch = total_optimizer_steps(
            len(self.train_rows), self.t.micro_batch_size, self.t.gradient_accumulation_steps,
            self.env.world_size, self.t.epochs, self.t.max_steps)
        self.result.total_steps = self.total_steps

    def _build_model_and_engine(self) -> None:
        import torch

        from kubetune_trainer.engine import DeepSpeedEngine, NativeEngine
        from kubetune_trainer.loss import CausalLMLoss
        from kubetune_trainer.optim import optimizer_description
        from kubetune_trainer.methods import (apply_method, build_optimizer, build_scheduler, load_base_model,
                                              parameter_groups, share_adapter_inputs)
        from kubetune_trainer.speedups import apply_liger, compile_in_place

        self._set_phase("loading model")
        cuda = self.device.type == "cuda"
        try:
            model = load_base_model(str(self.model_dir), self.plan, self.precision, self.device,
                                    attn_implementation=self.attn_implementation, full_weights=self.full_weights)
        except (ValueError, KeyError) as exc:
            unsupported = unsupported_model_error(exc, self.plan.model.uri)
            if unsupported is None:
                raise
            raise unsupported from exc
        zero_stage = self.plan.distributed.zero_stage if self.strategy == "deepspeed" else 0
        apply_liger(model, enabled=self.t.liger_kernels, cuda=cuda, zero_stage=zero_stage, report=self.speed)
        model = apply_method(model, self.plan)
        share_adapter_inputs(model, self.precision)
        self._apply_tokenwise(model)
        self._apply_embeddings_on_host(model)
        self._keep_attention_supported(model)
        self.speed.attention_implementation = str(getattr(model.config, "_attn_implementation", ""))
        train_module = CausalLMLoss(model, liger=self.speed.liger_options.get("fused_linear_cross_entropy", False))
        self.speed.loss = train_module.kind
        if self.t.torch_compile:
            # After LoRA wrapping and gradient checkpointing, before DDP: the compiled graph covers the adapters.
            # With the chunked loss the model body is what runs (and is compiled); lm_head runs per loss chunk.
            compile_in_place(model if train_module.fallback else model.get_decoder(), cuda=cuda, report=self.speed)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("method %s: %d trainable of %d parameters; precision %s; strategy %s x%d; attention %s; "
                 "torch.compile %s; Liger %s", self.plan.method, n_train, n_all, self.precision, self.strategy,
                 self.env.world_size, self.speed.attention_implementation, self.speed.torch_compile,
                 self.speed.liger_kernels)
        groups = parameter_groups(model, self.t.weight_decay)
        ds = self.plan.distributed
        ds_cpu_adam = (self.strategy == "deepspeed" and ds.offload_optimizer and torch.cuda.is_available()
                       and self.t.optimizer == "adamw")
        optimizer = build_optimizer(groups, self.t, ds_cpu_adam=ds_cpu_adam,
                                    bf16_weights=self.full_weights == "bf16", in_backward=self.optimizer_in_backward)
        self.speed.optimizer = optimizer_description(optimizer)
        scheduler = build_scheduler(optimizer, self.t, self.total_steps)
        if self.strategy == "deepspeed":
            from kubetune_trainer.deepspeed_config import deepspeed_config

            config = deepspeed_config(self.t, ds, self.precision, world_size=self.env.world_size,
                                      pin_memory=torch.cuda.is_available())
            self.engine = DeepSpeedEngine(model, optimizer, scheduler, config=config, rank=self.env.rank,
                                          train_module=train_module)
        else:
            self.engine = NativeEngine(model, optimizer, scheduler, device=self.device, precision=self.precision,
                                       grad_accum=self.t.gradient_accumulation_steps,
                                       max_grad_norm=self.t.max_grad_norm, distributed=self._dist,
                                       rank=self.env.rank, train_module=train_module,
                                       optimizer_in_backward=self.optimizer_in_backward,
                                       activation_offloading=self.t.activation_offloading)
        self.step = 0
        self.divergence = None
        if self.t.divergence.action != "off":
            from kubetune_trainer.divergence import DivergenceDetector

            self.divergence = DivergenceDetector(self.t.divergence.factor, self.t.divergence.patience)
        self.best_eval: float | None = None
        self.bad_evals = 0

    def _resume(self) -> None:
        from kubetune_trainer import checkpoints

        if self.env.local_rank == 0:
            for path in checkpoints.remove_torn(self.ckpt_root):
                log.warning("removed incomplete checkpoint %s (a save that did not finish)", path)
        self._barrier()
        found = checkpoints.latest_checkpoint(self.ckpt_root)
        if found is None:
            return
        step, directory = found
        state = checkpoints.read_state(directory)
        if state.get("method") != self.plan.method:
            raise PlanError(f"method: checkpoint {directory} was written by method {state.get('method')}, "
                            f"the plan asks for {self.plan.method}; use a new output.uri")
        self._set_phase("resuming")
        self.engine.load(directory)
        rng_file = directory / f"rng-rank{self.env.rank}.pt"
        if rng_file.exists() and state.get("worldSize") == self.env.world_size:
            import torch

            checkpoints.set_rng_state(torch.load(rng_file, weights_only=False))
        self.step = step
        self.result.resumed_from_step = step
        self.result.checkpoint_step = step
        self.result.tokens = int(state.get("tokens", 0))
        self.result.train_loss = state.get("trainLoss")
        self.result.eval_loss = state.get("evalLoss")
        self.result.history = list(state.get("history", []))
        self.result.warnings = list(state.get("warnings", []))
        if self.divergence is not None:
            self.divergence.replay(self.result.history)
        self.result.eval_history = list(state.get("evalHistory", []))
        self.best_eval = state.get("bestEvalLoss")
        self.bad_evals = int(state.get("badEvals", 0))
        log.info("resumed from checkpoint step %d (%s)", step, directory)
        if self.metrics:
            self.metrics.update(checkpoint={"step": step, "uri": self._checkpoint_uri(step)})

    # ------------------------------------------------------------------ data stream
    def _shard(self, epoch: int) -> list[int]:
        if epoch not in self._shards:
            self._shards = {epoch: epoch_shard(len(self.train_rows), self.t.seed, epoch, self.env.rank,
                                               self.env.world_size)}
        return self._shards[epoch]

    def micro_batch(self, index: int) -> tuple[dict, int]:
        """Global micro-batch `index` for this rank: (collated batch on device, real token count)."""
        epoch, pos = divmod(index, self.micro_per_epoch)
        shard = self._shard(epoch)
        mbs = self.t.micro_batch_size
        ids = shard[pos * mbs:(pos + 1) * mbs] or shard[:mbs]
        rows = [self.train_rows[i] for i in ids]
        tokens = sum(len(r["input_ids"]) for r in rows)
        batch = self.collator(rows)
        return {k: v.to(self.device) for k, v in batch.items()}, tokens

    def epoch_at(self, step: int) -> float:
        """Fractional epoch after `step` optimizer steps."""
        return step * self.t.gradient_accumulation_steps / self.micro_per_epoch

    # ------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        """Run optimizer steps until the plan's length or early stopping; checkpoints and evals on schedule.

        A stop request (SIGTERM) ends the run at the next step boundary on every rank, after a checkpoint of
        that step (PreemptedError)."""
        with self.stop.deferred():
            return self._train()

    def _train(self) -> TrainResult:
        import torch

        t, res = self.t, self.result
        gas = t.gradient_accumulation_steps
        start_step, started = self.step, time.time()
        tokens_at_start = res.tokens
        log_every = self.t.log_every_steps or max(1, self.total_steps // 50)
        self._set_phase("training")
        self.engine.train(True)
        steady_tokens, steady_seconds = 0, 0.0
        while self.step < self.total_steps:
            step_started = time.time()
            loss_sum = torch.zeros(3, dtype=torch.float64)  # loss sum, micro count, tokens
            self._inject_faults()
            for micro in range(gas):
                batch, tokens = self.micro_batch(self.step * gas + micro)
                with self.engine.accumulating(boundary=micro == gas - 1):
                    loss = self.engine.forward(batch).loss
                    self.engine.backward(loss)
                loss_sum += torch.tensor([float(loss.detach().float()), 1.0, float(tokens)], dtype=torch.float64)
            # The stop flag travels with the loss: every rank learns of a stop request at the same step.
            reduced = self._all_reduce(torch.cat([loss_sum, torch.tensor([float(self.stop.requested)],
                                                                         dtype=torch.float64)]))
            loss_sum, stop_now = reduced[:3], bool(reduced[3] > 0)
            step_loss = float(loss_sum[0] / loss_sum[1])
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"training loss became {step_loss} at step {self.step + 1} (epoch {self.epoch_at(self.step):.2f}, "
                    f"learning rate {self.engine.current_lr():.3g}); lower training.learningRate, "
                    "keep maxGradNorm > 0 or use bf16 instead of fp16")
            lr = self.engine.current_lr()
            grad_norm = self.engine.step()
            self.step += 1
            res.tokens += int(loss_sum[2])
            if self.step > start_step + 1:  # the attempt's first step carries the warm-up
                steady_tokens += int(loss_sum[2])
                steady_seconds += time.time() - step_started
                res.steady_tokens_per_second = steady_tokens / max(steady_seconds, 1e-9)
            res.train_loss = step_loss
            if len(res.history) < HISTORY_LIMIT:
                res.history.append({"step": self.step, "loss": round(step_loss, 6), "lr": lr,
                                    "gradNorm": round(grad_norm, 4) if math.isfinite(grad_norm) else None})
            elapsed = max(1e-9, time.time() - started)
            tps = (res.tokens - tokens_at_start) / elapsed
            res.tokens_per_second = tps
            self._report_step(step_loss, lr, tps, start_step, started)
            if self.tracker is not None:
                self.tracker.log(self.step, {"train_loss": step_loss, "learning_rate": lr, "grad_norm": grad_norm,
                                             "tokens_per_second": tps, "epoch": self.epoch_at(self.step)})
            if self.env.is_main and (self.step % log_every == 0 or self.step == self.total_steps):
                log.info("step %d/%d epoch %.2f loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f", self.step,
                         self.total_steps, self.epoch_at(self.step), step_loss, lr, grad_norm, tps)
            self._watch_divergence(step_loss)
            if stop_now:
                self._stop_on_request()
            if self._eval_due() and self.eval_rows is not None:
                self.evaluate()
                if self._early_stop():
                    break
            if self._checkpoint_due() and self.step < self.total_steps:
                self.save_checkpoint()
        if self.eval_rows is not None and (not res.eval_history or res.eval_history[-1]["step"] != self.step):
            self.evaluate()
        res.step = self.step
        res.epoch = self.epoch_at(self.step)
        res.runtime_seconds = time.time() - self.started
        return res

    def _inject_faults(self) -> None:
        """plan.faults (tests only): fail the coming step the way a real fault would."""
        faults = self.plan.faults
        if faults is not None and faults.out_of_memory_at_step == self.step + 1:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory at step {self.step + 1} (injected by the plan's "
                                         "faults.outOfMemoryAtStep)")

    def _watch_divergence(self, loss: float) -> None:
        """Feed the divergence detector (training.divergence); stop with Diverged or warn once."""
        from kubetune_trainer.errors import DivergedError

        if self.divergence is None:
            return
        message = self.divergence.update(self.step, loss)
        if not message:
            return
        kept = self.result.checkpoint_step
        if self.t.divergence.action == "stop":
            where = f"checkpoint step-{kept} is kept" if kept else "no checkpoint was written yet"
            raise DivergedError(f"{message}; stopped ({where}); lower training.learningRate, raise warmup or set "
                                "training.divergence.action: warn to continue anyway")
        self.result.warnings.append(message)
        if self.env.is_main:
            log.warning("%s; continuing (training.divergence.action is warn)", message)

    def _stop_on_request(self) -> None:
        """Checkpoint this step (unless just done) and end the run as Preempted (all ranks together)."""
        from kubetune_trainer.errors import PreemptedError
        from kubetune_trainer.preemption import stop_message

        if self.result.checkpoint_step != self.step:
            self.save_checkpoint()
        self.result.step = self.step
        message = stop_message(self.step, self.step, self.stop.signum)
        if self.env.is_main:
            log.warning(message)
        raise PreemptedError(message)

    def _eval_due(self) -> bool:
        if self.t.eval_every_steps > 0:
            return self.step % self.t.eval_every_steps == 0
        return self._epoch_ended()

    def _epoch_ended(self) -> bool:
        """True when the last optimizer step crossed an epoch boundary."""
        gas = self.t.gradient_accumulation_steps
        return (self.step * gas) // self.micro_per_epoch > ((self.step - 1) * gas) // self.micro_per_epoch

    def _checkpoint_due(self) -> bool:
        """checkpointStrategy steps: every checkpointEverySteps steps; epoch: at every epoch boundary."""
        if self.t.checkpoint_strategy == "epoch":
            return self._epoch_ended()
        return self.step % self.t.checkpoint_every_steps == 0

    def _early_stop(self) -> bool:
        es = self.t.early_stopping
        loss = self.result.eval_loss
        if loss is None:
            return False
        if self.best_eval is None or loss < self.best_eval - es.threshold:
            self.best_eval, self.bad_evals = loss, 0
            return False
        self.bad_evals += 1
        if es.patience > 0 and self.bad_evals >= es.patience:
            self.result.early_stopped = True
            self.result.stop_message = (f"early stopping at step {self.step}: eval loss did not improve by more "
                                        f"than {es.threshold} on the best {self.best_eval:.4f} for {es.patience} "
                                        "evaluation(s)")
            log.info(self.result.stop_message)
            return True
        return False

    def evaluate(self) -> float:
        """Token-weighted eval loss over the eval set (sharded over ranks; every rank runs the same batches)."""
        import torch

        self._set_phase("evaluating")
        rows = self.eval_rows
        world, rank, mbs = self.env.world_size, self.env.rank, self.t.micro_batch_size
        mine = list(range(rank, len(rows), world))
        n_batches = math.ceil(math.ceil(len(rows) / world) / mbs)
        totals = torch.zeros(2, dtype=torch.float64)
        self.engine.train(False)
        with torch.no_grad():
            for b in range(n_batches):
                ids = mine[b * mbs:(b + 1) * mbs]
                weight = 1.0 if ids else 0.0
                batch = self.collator([rows[i] for i in (ids or [0])])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = self.engine.eval_forward(batch)  # summed over completion tokens, never full logits
                totals += weight * torch.tensor([float(out.loss_sum), float(out.tokens)], dtype=torch.float64)
        self.engine.train(True)
        totals = self._all_reduce(totals)
        value = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        self.result.eval_loss = value
        self.result.eval_history.append({"step": self.step, "loss": round(value, 6),
                                         "perplexity": round(math.exp(min(value, 80.0)), 4)})
        if self.env.is_main:
            log.info("eval step %d: loss %.4f perplexity %.3f", self.step, value, math.exp(min(value, 80.0)))
        if self.metrics:
            self.metrics.update(evalLoss=value)
        if self.tracker is not None:
            self.tracker.log(self.step, {"eval_loss": value, "eval_perplexity": math.exp(min(value, 80.0))})
        self._set_phase("training")
        return value

    def _all_reduce(self, tensor):
        import torch

        if not self._dist or self.env.world_size == 1:
            return tensor
        backend_device = self.device if torch.cuda.is_available() else torch.device("cpu")
        work = tensor.to(backend_device)
        torch.distributed.all_reduce(work)
        return work.cpu()

    def _barrier(self) -> None:
        import torch

        if self._dist and self.env.world_size > 1:
            torch.distributed.barrier()

    def _report_step(self, loss: float, lr: float, tps: float, start_step: int, started: float) -> None:
        if not self.metrics:
            return
        from kubetune_trainer.metrics_server import eta_seconds

        self.metrics.update(step=self.step, totalSteps=self.total_steps, epoch=round(self.epoch_at(self.step), 4),
                            trainLoss=loss, learningRate=lr, tokens=self.result.tokens,
                            tokensPerSecond=round(tps, 2),
                            etaSeconds=eta_seconds(started, self.step, start_step, self.total_steps))
        peak = _peak_gpu_memory()
        if peak:
            self.metrics.set_gpu_memory(peak)

    def _set_phase(self, phase: str) -> None:
        if self.metrics:
            self.metrics.update(phase=phase)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_uri(self, step: int) -> str:
        return join_uri(self.plan.output.uri, "checkpoints", f"step-{step}")

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N/` atomically (temp dir + rename) and keep the newest `keepCheckpoints`."""
        import torch

        from kubetune_trainer import checkpoints

        step = self.step
        self._set_phase("checkpointing")
        if self.env.local_rank == 0:
            checkpoints.prepare_temp(self.ckpt_root, step)
        self._barrier()
        tmp = checkpoints.temp_dir(self.ckpt_root, step)
        res = self.result
        failure: BaseException | None = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)  # nodes without a shared filesystem
            self.engine.save(tmp)
            torch.save(checkpoints.rng_state(), tmp / f"rng-rank{self.env.rank}.pt")
            if self.plan.faults is not None and self.plan.faults.kill_while_saving_step == step:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)  # tests only: the node dies with the weights half-published
        except Exception as exc:  # noqa: BLE001 - every rank learns of the failure below
            failure = exc
        self._check_saved(failure, tmp)
        try:
            if self.env.local_rank == 0:
                checkpoints.sync_tree(tmp)
            if self.env.is_main:
                checkpoints.write_state(tmp, {
                    "step": step, "epoch": self.epoch_at(step), "method": self.plan.method,
                    "strategy": self.strategy, "worldSize": self.env.world_size, "tokens": res.tokens,
                    "trainLoss": res.train_loss, "evalLoss": res.eval_loss, "bestEvalLoss": self.best_eval,
                    "badEvals": self.bad_evals, "history": res.history, "evalHistory": res.eval_history,
                    "warnings": res.warnings, "savedAt": time.time()})
        except Exception as exc:  # noqa: BLE001
            failure = exc
        self._check_saved(failure, tmp)
        if self.env.local_rank == 0:
            if not (tmp / checkpoints.STATE_FILE).exists():
                # Another node's filesystem: rank 0 wrote the state there; mark ours complete too.
                checkpoints.write_state(tmp, {"step": step, "method": self.plan.method,
                                              "worldSize": self.env.world_size, "tokens": res.tokens})
            final = checkpoints.publish(self.ckpt_root, step)
            from kubetune_trainer.diskspace import tree_bytes

            self.checkpoint_need_bytes = max(getattr(self, "checkpoint_need_bytes", 0), tree_bytes(final))
            checkpoints.prune(self.ckpt_root, self.t.keep_checkpoints)
        else:
            final = checkpoints.step_dir(self.ckpt_root, step)
        self._barrier()
        res.checkpoint_step = step
        if self.env.is_main:
            log.info("checkpoint saved: %s", final)
        if self.metrics:
            self.metrics.update(checkpoint={"step": step, "uri": self._checkpoint_uri(step)})
        self._set_phase("training")
        return final

    def _all_ok(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (one small all-reduce; a failure on one rank stops all of them)."""
        import torch

        flag = self._all_reduce(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64))
        return float(flag[0]) == 0.0

    def _check_saved(self, failure: BaseException | None, tmp: Path) -> None:
        """After a part of a checkpoint save: when any rank failed, remove the temp dir and raise on every rank
        (a full disk or a read-only volume in plain words)."""
        from kubetune_trainer import diskspace
        from kubetune_trainer.errors import KubetuneTrainerError

        if self._all_ok(failure is None):
            return
        if self.env.local_rank == 0:
            diskspace.remove_quietly(tmp)
        if failure is None:
            raise KubetuneTrainerError(f"saving checkpoint step-{self.step} failed on another rank; see its log")
        need = getattr(self, "checkpoint_need_bytes", 0)
        plain = diskspace.write_error(failure, self.output_dir, self.plan.output.uri, need)
        if plain is not None:
            raise plain from failure
        raise failure

    def _check_output(self) -> None:
        """Before training: the output is writable and has room for a checkpoint (every rank agrees)."""
        from kubetune_trainer import checkpoints, diskspace
        from kubetune_trainer.errors import KubetuneTrainerError

        need = diskspace.estimate_checkpoint_bytes(self.engine.raw_model, self.t.optimizer)
        latest = checkpoints.latest_checkpoint(self.ckpt_root)
        if latest is not None:
            need = max(need, diskspace.tree_bytes(latest[1]))  # measured beats estimated
        self.checkpoint_need_bytes = need
        problem: KubetuneTrainerError | None = None
        if self.env.local_rank == 0:
            try:
                diskspace.check_output(self.output_dir, self.plan.output.uri, need)
            except KubetuneTrainerError as exc:
                problem = exc
        if not self._all_ok(problem is None):
            raise problem or KubetuneTrainerError("the output check failed on another node; see its log")

    # ------------------------------------------------------------------ export
    def export(self) -> dict[str, str]:
        """Write final/adapter | final/model, final/merged (mergeAdapter), final/metrics.json; upload.

        Training is over: a stop request no longer interrupts (the export finishes within the grace period or
        the restarted run exports from the last checkpoint)."""
        with self.stop.deferred():
            return self._export()

    def _export(self) -> dict[str, str]:
        from kubetune_trainer import storage

        self._set_phase("exporting")
        final = self.output_dir / "final"
        uri = self.plan.output.uri
        arts: dict[str, str] = {}
        if self.plan.method == "full":
            state = self.engine.full_state_dict()  # collective under ZeRO-3
            if self.env.is_main:
                target = _fresh_dir(final / "model")
                self.engine.raw_model.save_pretrained(str(target), state_dict=state)
                self.tokenizer.save_pretrained(str(target))
            arts["model"] = join_uri(uri, "final", "model")
        else:
            state = self.engine.trainable_state_dict()  # collective under ZeRO-3
            if self.env.is_main:
                target = _fresh_dir(final / "adapter")
                self.engine.raw_model.save_pretrained(str(target), state_dict=state)
                self.tokenizer.save_pretrained(str(target))
            arts["adapter"] = join_uri(uri, "final", "adapter")
        self._barrier()
        self._release_model()
        if self.plan.output.merge_adapter and self.plan.method != "full":
            if self.env.is_main:
                self._set_phase("merging")
                merge_adapter(str(self.model_dir), str(final / "adapter"), str(_fresh_dir(final / "merged")),
                              self.plan, self.precision, self.device)
                self.tokenizer.save_pretrained(str(final / "merged"))
            arts["merged"] = join_uri(uri, "final", "merged")
        arts["metrics"] = join_uri(uri, "final", "metrics.json")
        self.result.artifacts = arts
        self.result.runtime_seconds = time.time() - self.started
        if self.env.is_main:
            (final / "metrics.json").write_text(json.dumps(self.final_metrics(), indent=2) + "\n")
            storage.upload_dir(self.output_dir, uri)
        self._barrier()
        self._set_phase("done")
        return arts

    def final_metrics(self) -> dict[str, Any]:
        """The content of final/metrics.json."""
        r = self.result
        first = r.history[0]["loss"] if r.history else None
        return {
            "version": 1, "method": self.plan.method, "precision": self.precision, "strategy": self.strategy,
            "zeroStage": self.plan.distributed.zero_stage, "worldSize": self.env.world_size,
            "step": r.step, "totalSteps": r.total_steps, "epoch": round(r.epoch, 4),
            "trainLoss": r.train_loss, "initialTrainLoss": first, "evalLoss": r.eval_loss,
            "perplexity": r.perplexity, "tokens": r.tokens, "runtimeSeconds": round(r.runtime_seconds, 3),
            "tokensPerSecond": round(r.tokens_per_second, 2),
            "steadyTokensPerSecond": round(r.steady_tokens_per_second, 2), "resumedFromStep": r.resumed_from_step,
            "earlyStopped": r.early_stopped, "stopMessage": r.stop_message, "warnings": list(r.warnings),
            "peakGpuMemoryBytes": _peak_gpu_memory(), "artifacts": r.artifacts,
            "history": r.history, "evalHistory": r.eval_history, "data": self.data_report,
            "speed": self.speed.to_json(),
            **({"tracking": self.tracker.report()} if self.tracker is not None else {}),
        }

    # ------------------------------------------------------------------ tracking
    def _start_tracking(self) -> None:
        """Open the MLflow and/or W&B run on rank 0: parameters, the resolved plan, job tags (plan `tracking`)."""
        from kubetune_trainer.trackers import Trackers

        if not self.env.is_main or self.plan.tracking is None:
            return
        flush_every = self.t.log_every_steps or max(1, self.total_steps // 50)
        self.tracker = Trackers.from_plan(self.plan.tracking, flush_every=flush_every,
                                          staging_dir=str(self.env.work_dir / "tracking"),
                                          output_uri=self.plan.output.uri)
        if self.tracker is None:
            return
        plan = self.plan.to_json_dict()
        job = plan.get("job") or {}
        self.tracker.start({k: v for k, v in plan.items() if k not in ("version", "job")}, plan, {
            "kubetune.job": f"{job.get('namespace', '')}/{job.get('name', '')}", "kubetune.uid": job.get("uid", ""),
            "kubetune.resumedFromStep": str(self.result.resumed_from_step)})
        self._note_tracking_warning()

    def _note_tracking_warning(self) -> None:
        for warning in self.tracker.warnings if self.tracker is not None else []:
            if warning not in self.result.warnings:
                self.result.warnings.append(warning)

    def finish_tracking(self, artifacts: dict[str, str], evaluation: dict[str, Any] | None = None) -> None:
        """Close the run: final metrics, the base-vs-tuned evaluation (when run), the output URIs as tags."""
        if self.tracker is None:
            return
        from kubetune_trainer.tracking import evaluation_metrics

        r = self.result
        final = {"final_train_loss": r.train_loss, "final_eval_loss": r.eval_loss, "perplexity": r.perplexity,
                 "tokens": r.tokens, "runtime_seconds": time.time() - self.started,
                 "mean_tokens_per_second": r.tokens_per_second, **evaluation_metrics(evaluation)}
        self.tracker.finish("FINISHED", final, {f"kubetune.artifact.{k}": v for k, v in artifacts.items()})
        self._note_tracking_warning()

    def _release_model(self) -> None:
        import gc

        import torch

        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Stop the metrics server and tear down the process group."""
        import torch

        if self.tracker is not None and self.tracker.active and not self.tracker.finished:
            try:
                self.tracker.finish("FAILED", {}, {})
            except Exception:  # noqa: BLE001 - a required tracker's error must not hide the run's own failure
                pass
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._dist and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            self._dist = False


_UNSUPPORTED_SIGNS = ("does not recognize this architecture", "unrecognized model", "unrecognized configuration class",
                      "model type")


def unsupported_model_error(exc: BaseException, uri: str) -> Exception | None:
    """An UnsupportedModelError for transformers' "unknown architecture" errors, else None."""
    from kubetune_trainer.errors import UnsupportedModelError

    text = str(exc)
    if not any(sign in text.lower() for sign in _UNSUPPORTED_SIGNS):
        return None
    return UnsupportedModelError(f"model {uri}: this trainer's transformers cannot load its architecture "
                                 f"({text.splitlines()[0][:300]}); use a supported model or a newer trainer image")


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str, plan: Plan, precision: str, device) -> None:
    """Merge the saved adapter into the base weights and save full weights (QLoRA: into the dequantized base)."""
    import torch
    from peft import PeftModel

    from kubetune_trainer.methods import load_base_model, torch_dtype

    if plan.method == "qlora":
        base = load_base_model(base_dir, plan, precision, device, quantize=True)
        base = base.dequantize()
        base.to(torch_dtype(plan.quantization.compute_dtype if precision != "fp32" else "float32"))
    else:
        base = load_base_model(base_dir, plan, precision, device, quantize=False)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    merged.save_pretrained(out_dir)
    del merged, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _peak_gpu_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
