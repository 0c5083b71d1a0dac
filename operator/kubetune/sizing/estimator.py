"""Per-GPU memory estimate of one training step: weights, gradients, optimizer, activations, logits, overhead.

Every term is a closed-form function of the architecture and the training setup; the
formulas and the reasoning behind each are written out in docs/sizing.md. All results are
bytes *per GPU* (per data-parallel rank), at the peak of a training step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .architecture import Architecture
from .params import resolve_lora_targets, trainable_params

GiB = 1024**3
MiB = 1024**2

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32")
ATTENTIONS = ("sdpa", "flash", "eager")

# Runtime constants (see docs/sizing.md "Runtime overhead").
CUDA_CONTEXT_BYTES = 768 * MiB  # CUDA context + cuBLAS/cuDNN handles and workspaces, outside PyTorch's allocator
NCCL_BYTES = 512 * MiB  # NCCL communicator buffers (channels x peers x 4 MiB), only with >1 GPU
# Caching-allocator blocks reserved but not in use: transient tensors (activations, logits) are
# allocated and freed every step in many sizes and fragment the pool; long-lived tensors
# (weights, gradients, optimizer states) are a few large blocks allocated once.
FRAGMENTATION_TRANSIENT = 0.15
FRAGMENTATION_PERSISTENT = 0.02
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
DQ_BLOCK = 256  # double quantization: one fp32 constant per 256 absmax values
QLORA_UNQUANTIZED_BYTES = 2  # QLoRA: parameters left unquantized stay in the bf16 compute dtype (no k-bit upcast)
ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 (autocast_adapter_dtype=True)
LOSS_CHUNK_LOGIT_BYTES = 64 * MiB  # the trainer's loss: fp32 logits of at most 64 MiB per chunk
LOSS_MIN_CHUNK_TOKENS = 64
STOCHASTIC_ROUNDING_SLICE = 1 << 24  # elements per fp32 update slice around bitsandbytes (kubetune_trainer.optim)
NORM_SLICE = 1 << 24  # elements per fp32 slice of the gradient norm (kubetune_trainer.engine.squared_norm)


@dataclass(frozen=True)
class TrainingSetup:
    """What is trained and how: the parts of spec.method/lora/quantization/training that cost memory."""

    method: str = "lora"
    lora_r: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    quant_bits: int = 4  # QLoRA base weights: 4 (NF4/FP4) or 8 (LLM.int8)
    quant_double: bool = True  # QLoRA double quantization of the absmax constants
    precision: str = "bf16"  # compute dtype: bf16 | fp16 | fp32
    optimizer: str = "adamw"
    micro_batch_size: int = 1
    seq_length: int = 2048
    packing: bool = False
    gradient_checkpointing: bool = True
    attention: str = "sdpa"  # sdpa | flash | eager
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    master_weights: str = "auto"  # full fine-tuning: auto | fp32 | none (training.masterWeights)
    optimizer_in_backward: bool | None = None  # None = auto (training.optimizerInBackward)
    activation_offloading: bool = False
    liger_kernels: bool = False
    embeddings_on_host: bool | None = None  # None = auto (training.embeddingsOnHost, trainer plan only)

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.method, METHODS, "method"), (self.optimizer, OPTIMIZERS, "optimizer"),
                                     (self.precision, PRECISIONS, "precision"), (self.attention, ATTENTIONS, "attention")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
        if self.quant_bits not in (4, 8):
            raise ValueError("quantization bits must be 4 or 8")
        if self.micro_batch_size < 1 or self.seq_length < 1:
            raise ValueError("micro batch size and sequence length must be >= 1")

    @property
    def tokens(self) -> int:
        """Tokens in one micro batch (the activation and logits memory scale with this)."""
        return self.micro_batch_size * self.seq_length

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of weights/activations in the compute dtype."""
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Parallelism:
    """How the job is spread: strategy, ZeRO stage, offload and the data-parallel world size."""

    strategy: str = "none"  # none | ddp | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in ("none", "ddp", "deepspeed"):
            raise ValueError(f"unknown strategy {self.strategy!r}")
        if self.strategy == "deepspeed" and self.zero_stage not in (1, 2, 3):
            raise ValueError("deepspeed needs zero_stage 1, 2 or 3")
        if self.offload_params and not (self.strategy == "deepspeed" and self.zero_stage == 3):
            raise ValueError("offloading parameters needs ZeRO stage 3")
        if self.offload_optimizer and self.strategy != "deepspeed":
            raise ValueError("offloading the optimizer needs deepspeed")

    @property
    def zero(self) -> int:
        """Effective ZeRO stage (0 without deepspeed)."""
        return self.zero_stage if self.strategy == "deepspeed" else 0

    def describe(self) -> str:
        """Short human description, e.g. 'ZeRO-3 + offload optimizer over 8 GPUs'."""
        if self.strategy == "deepspeed":
            text = f"ZeRO-{self.zero_stage}"
            offl = [w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
            if offl:
                text += " + CPU offload of " + " and ".join(offl)
        else:
            text = "DDP" if self.strategy == "ddp" else "single GPU"
        return text + (f" over {self.world_size} GPUs" if self.world_size > 1 else "")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per GPU of one training step, term by term (see docs/sizing.md).

    Weights, master weights and optimizer states live through the whole step; gradients, activations (with
    the step's temporaries) and logits (the loss buffers) are those alive at the step's peak moment, named
    in `notes`.
    """

    weights: int
    master_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    comm_buffers: int
    cuda_context: int
    fragmentation: int
    total_params: int
    trainable_params: int
    host_offload: int = 0  # CPU RAM per rank for offloaded optimizer/params, activations and input embeddings
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tensors(self) -> int:
        """Bytes of live tensors at the peak (what torch.cuda.max_memory_allocated measures)."""
        return (self.weights + self.master_weights + self.gradients + self.optimizer_states
                + self.activations + self.logits + self.comm_buffers)

    @property
    def reserved(self) -> int:
        """Tensors plus allocator fragmentation (what torch.cuda.max_memory_reserved measures)."""
        return self.tensors + self.fragmentation

    @property
    def overhead(self) -> int:
        """Runtime overhead: CUDA context, NCCL/ZeRO/DDP buffers and fragmentation."""
        return self.cuda_context + self.comm_buffers + self.fragmentation

    @property
    def total(self) -> int:
        """Everything the GPU must hold: reserved memory plus the CUDA context."""
        return self.reserved + self.cuda_context

    def breakdown(self) -> dict[str, int]:
        """camelCase term -> bytes, including the total."""
        return {
            "weights": self.weights, "masterWeights": self.master_weights, "gradients": self.gradients,
            "optimizerStates": self.optimizer_states, "activations": self.activations, "logits": self.logits,
            "commBuffers": self.comm_buffers, "cudaContext": self.cuda_context,
            "fragmentation": self.fragmentation, "total": self.total,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (snake_case) for JSON output."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        out["total"] = self.total
        return out


# ---------------------------------------------------------------------------------------------
# Terms. Each function returns bytes for one data-parallel rank before ZeRO partitioning unless
# it says otherwise; `estimate_memory` applies the partitioning.
# ---------------------------------------------------------------------------------------------

def quantized_bytes_per_param(bits: int, double_quant: bool) -> float:
    """Storage of one quantized base weight: 4-bit (NF4/FP4, see nf4_bytes_per_param) or 8-bit
    (LLM.int8: 1 byte plus an fp32 scale per output row, counted as 1 byte)."""
    return nf4_bytes_per_param(double_quant) if bits == 4 else 1.0


def nf4_bytes_per_param(double_quant: bool) -> float:
    """Storage of one 4-bit weight: 0.5 byte + its share of the block constants.

    Without double quantization each block of 64 weights has an fp32 absmax (4/64 B/param);
    with it the absmax is stored in 8 bit (1/64) plus one fp32 constant per 256 blocks.
    """
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DQ_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


def full_weights_dtype(setup: TrainingSetup, strategy: str = "none") -> str:
    """Dtype of a full fine-tune's trainable weights, as the trainer resolves training.masterWeights.

    `auto`: bf16 weights and gradients without an fp32 master copy when the run computes in bf16 outside
    DeepSpeed (the update is Kahan-compensated or stochastically rounded: kubetune_trainer.optim); fp32
    weights with autocast otherwise. DeepSpeed keeps bf16/fp16 module weights and its own fp32 master
    partition ("deepspeed").
    """
    if strategy == "deepspeed":
        return "deepspeed"
    if setup.precision == "fp32":
        return "fp32"
    if setup.master_weights == "none" or (setup.master_weights == "auto" and setup.precision == "bf16"):
        return "bf16"
    return "fp32"


def optimizer_in_backward(setup: TrainingSetup, strategy: str = "none") -> bool:
    """Whether the trainer fuses the optimizer step into backward (training.optimizerInBackward; auto =
    one process, no gradient accumulation, no clipping, not fp16)."""
    possible = (strategy == "none" and setup.gradient_accumulation_steps == 1 and setup.max_grad_norm <= 0
                and setup.precision != "fp16")
    return possible if setup.optimizer_in_backward is None else bool(setup.optimizer_in_backward) and possible


def weight_bytes(arch: Architecture, setup: TrainingSetup, n_trainable: int, strategy: str = "none") -> int:
    """Model weights on the GPU (unpartitioned).

    full: bf16 (2 B) without a master copy, fp32 (4 B) with masterWeights fp32 or fp16 loss scaling, and
    the compute dtype under DeepSpeed (whose fp32 master partition is a separate term). lora: frozen base
    in the compute dtype plus fp32 adapters. qlora: decoder linears in NF4 (see nf4_bytes_per_param) or
    int8, fp32 adapters, and embeddings, lm_head, norms and biases in the compute dtype (the trainer does
    not upcast them: tests/trainer/test_qlora_dtypes.py).
    """
    p = arch.total_params()
    b = setup.compute_bytes
    if setup.method == "full":
        dtype = full_weights_dtype(setup, strategy)
        return p * (4 if dtype == "fp32" else b)
    adapters = n_trainable * ADAPTER_BYTES
    if setup.method == "lora":
        return p * b + adapters - host_embedding_bytes(arch, setup, strategy)
    q = arch.quantizable_params()
    return int(q * quantized_bytes_per_param(setup.quant_bits, setup.quant_double)) + (p - q) * QLORA_UNQUANTIZED_BYTES \
        + adapters - host_embedding_bytes(arch, setup, strategy)


def embeddings_on_host(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> bool:
    """Whether the input-embedding table lives in host memory (training.embeddingsOnHost auto,
    kubetune_trainer.host_embeddings): LoRA/QLoRA (the table is frozen), not tied to lm_head, outside DeepSpeed;
    `setup.embeddings_on_host` False keeps it on the GPU."""
    possible = setup.method != "full" and not arch.tie_word_embeddings and strategy != "deepspeed"
    return possible and setup.embeddings_on_host is not False


def host_embedding_bytes(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> int:
    """Bytes of the input-embedding table kept in host memory instead of on the GPU (0 when it stays there).
    It is in the compute dtype (QLoRA does not quantize or upcast it)."""
    if not embeddings_on_host(arch, setup, strategy):
        return 0
    dtype_bytes = QLORA_UNQUANTIZED_BYTES if setup.method == "qlora" else setup.compute_bytes
    return arch.embedding_params() * dtype_bytes


def master_weight_bytes(setup: TrainingSetup, n_trainable: int, strategy: str = "none") -> int:
    """fp32 master copy of the trainable weights: only DeepSpeed's bf16/fp16 mode keeps one (4 B/param).

    The native trainer either trains bf16 weights directly (no copy) or keeps the weights themselves in
    fp32 (counted as weights); LoRA adapters are fp32 already.
    """
    if setup.method != "full" or setup.precision == "fp32":
        return 0
    return n_trainable * 4 if full_weights_dtype(setup, strategy) == "deepspeed" else 0


def gradient_bytes(setup: TrainingSetup, n_trainable: int, strategy: str = "none") -> int:
    """Gradients of the trainable parameters, in the dtype of those parameters.

    full: the weight dtype (bf16 2 B, fp32 4 B; DeepSpeed: the compute dtype). lora/qlora: fp32 adapters
    -> 4 B. They live from backward to the optimizer step and across gradient-accumulation micro steps.
    """
    if setup.method != "full":
        return n_trainable * ADAPTER_BYTES
    return n_trainable * (4 if full_weights_dtype(setup, strategy) == "fp32" else setup.compute_bytes)


# 8-bit optimizer states: two uint8 states plus one fp32 absmax per 256-value block each (bitsandbytes'
# blockwise 8-bit optimizers)
BNB_8BIT_BYTES = 2.0 + 8 / 256


def optimizer_state_bytes(setup: TrainingSetup, n_trainable: int, strategy: str = "none") -> int:
    """Optimizer states per trainable parameter.

    bf16 full fine-tuning (no master copy): torch-optimi's Kahan-summed AdamW keeps exp_avg, exp_avg_sq
    and the compensation buffer in bf16 (6 B); its SGD the momentum and the compensation (4 B).
    fp32 parameters (LoRA adapters, fp32 full weights, DeepSpeed's master partition): torch AdamW 8 B,
    SGD with momentum 0.9 4 B. bitsandbytes 8-bit AdamW (paged or not): two uint8 states and their
    block absmax (BNB_8BIT_BYTES); paged 32-bit AdamW: 8 B. Paged states can be evicted to host RAM under
    pressure, but the sizer does not count on it.
    """
    bf16_full = setup.method == "full" and full_weights_dtype(setup, strategy) == "bf16"
    if setup.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        per = BNB_8BIT_BYTES
    elif setup.optimizer == "paged_adamw_32bit":
        per = 8.0
    elif setup.optimizer == "sgd":
        per = 2 * setup.compute_bytes if bf16_full else 4.0
    else:
        per = 3 * setup.compute_bytes if bf16_full else 8.0
    return int(n_trainable * per)


def step_temporary_bytes(arch: Architecture, setup: TrainingSetup, n_trainable: int, strategy: str = "none",
                         one_tensor: bool = False) -> int:
    """Temporaries of the optimizer step, on top of weights, gradients and states.

    bf16 full fine-tuning: optimi's foreach AdamW holds one bf16 temporary the size of the largest
    parameter (2 B x largest); around bitsandbytes each parameter is updated in fp32 and stochastically
    rounded back, a slice of at most 16M elements at a time (fp32 copies of the weight and gradient slice,
    the random bits, their sum and the masked result: 20 B x slice).
    fp32 weights: torch's foreach AdamW allocates an fp32 temporary for every parameter at once (4 B x n).
    LoRA adapters are small; their foreach temporary (4 B x n) is counted the same way. `one_tensor`: the
    step of the largest tensor alone (optimizer in backward).
    """
    if setup.optimizer == "sgd" and setup.method == "full" and full_weights_dtype(setup, strategy) == "bf16":
        return 0
    if setup.method == "full" and full_weights_dtype(setup, strategy) == "bf16":
        largest = arch.largest_param_tensor()
        if setup.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
            return 20 * min(largest, STOCHASTIC_ROUNDING_SLICE)
        return 2 * largest
    if setup.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        return 0
    if setup.optimizer != "adamw":
        return 0
    return 4 * (min(n_trainable, arch.largest_param_tensor()) if one_tensor else n_trainable)


def attention_mask_kind(setup: TrainingSetup) -> str:
    """Which attention kernel path a CUDA run takes: 'flash' (no mask: k/v stay narrow with GQA),
    'masked' (SDPA's memory-efficient kernel with a mask: k/v repeated to all heads, an additive mask in
    the compute dtype saved per layer) or 'eager'.

    transformers passes no mask to SDPA for an unpadded, unpacked batch (one row, or padding-free rows);
    packed rows (position_ids restart per example) and padded batches get a 4-D mask. flash_attention_2
    never takes a mask (packed rows run as variable-length sequences).
    """
    if setup.attention == "eager":
        return "eager"
    if setup.attention == "flash":
        return "flash"
    return "masked" if (setup.packing or setup.micro_batch_size > 1) else "flash"


# tokens per MLP tile: one [tokens, intermediate] tensor of at most 16 MiB (kubetune_trainer.tokenwise)
MLP_TILE_BYTES = 16 * MiB
MIN_TILE_TOKENS = 64


def recomputed_norms(setup: TrainingSetup, strategy: str = "none") -> bool:
    """Whether the decoder norms save only their input (kubetune_trainer.tokenwise recomputes them token-wise;
    outside DeepSpeed). Liger's RMSNorm (CUDA, ligerKernels) saves the same."""
    return strategy != "deepspeed" or setup.liger_kernels


def tiled_mlp(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> bool:
    """Whether the dense MLPs run in token tiles (training.tiledMlp auto: LoRA/QLoRA with gradient
    checkpointing, outside DeepSpeed; not mixture-of-experts blocks)."""
    return (setup.method != "full" and setup.gradient_checkpointing and strategy != "deepspeed"
            and not arch.is_moe)


def mlp_tile_tokens(arch: Architecture, setup: TrainingSetup) -> int:
    """Tokens per MLP tile (the trainer sizes it by config.intermediate_size), at most a micro batch."""
    return min(setup.tokens, max(MIN_TILE_TOKENS, MLP_TILE_BYTES // (arch.intermediate_size * setup.compute_bytes)))


def layer_activation_bytes_per_token(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> float:
    """Bytes autograd saves for backward in one decoder layer, per token (no checkpointing).

    Counted from what PyTorch keeps for each op of a transformers decoder layer (a = bytes of the
    compute dtype, H hidden, I intermediate, q = heads x head_dim, kv = key/value width):
      RMSNorm: fp32 upcast of its input (4H) [+ normalized input aH if the norm weight trains]; recomputed
      token-wise (recomputed_norms): its input aH
      q/k/v after RoPE: a(q + 2kv) when the kernel takes grouped k/v (flash); with a mask SDPA's
      memory-efficient kernel gets k/v repeated to all heads (3aq); fused qkv (Phi-3) keeps the whole
      projection output alive through the v view [+ the shared input aH if the projections train]
      attention core: output aq + fp32 logsumexp 4 x heads (flash, memory-efficient) or the fp32 softmax
      and its copy (4 + a) x heads x s (eager, the s^2 term; plus the tanh output with soft-capping)
      o_proj input aq (if trained); MLP: act input aI, act output aI, up output aI,
      [+ MLP input aH and down input aI if trained]; tiled (tiled_mlp): its input aH only, the rest lives
      in one tile at a time during backward; MoE: the same per routed expert copy, plus router logits.
      LoRA: the rank-r intermediate a x r per adapted module, and the input each distinct input once (the
      adapters read it as it is under autocast: q/k/v share one, gate/up another; o_proj's is the attention
      output the kernel keeps anyway); with dropout each module its dropped-out copy and 1-byte mask
      (a + 1) x in; inside tiled MLPs nothing.
    """
    a = setup.compute_bytes
    h, i, s = arch.hidden_size, arch.intermediate_size, setup.seq_length
    full = setup.method == "full"
    kind = attention_mask_kind(setup)
    lean_norms = recomputed_norms(setup, strategy)
    tiled = tiled_mlp(arch, setup, strategy)
    norm = a * h if lean_norms else 4 * h + (a * h if full else 0)
    per = arch.norms_per_layer * norm
    per += _attention_saved_bytes_per_token(arch, setup)
    # MLP
    mlp = a * h if tiled else 3 * a * i + (a * h + a * i if full else 0)
    if arch.is_moe:
        k = arch.num_experts_per_tok
        # each routed copy: gathered input (saved if trained), gate_up output (2I, act saves a view),
        # act output, down input (if trained), down output scaled by the routing weight (aH)
        per_expert = 2 * a * i + a * i + a * h + (a * h + a * i if full else 0)
        mlp = k * per_expert + (a + 4) * arch.num_local_experts
    per += mlp
    if setup.method != "full":
        per += _lora_activation_bytes_per_token(arch, setup, tiled, kind)
    return float(per)


def _attention_saved_bytes_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """What the attention block saves per token (see layer_activation_bytes_per_token), LoRA aside."""
    a = setup.compute_bytes
    h, s, heads = arch.hidden_size, setup.seq_length, arch.num_attention_heads
    kind = attention_mask_kind(setup)
    kv = arch.kv_dim if kind == "flash" else arch.q_dim  # repeat_kv unless the kernel takes grouped k/v
    if arch.fused_projections:
        per = a * (arch.q_dim + kv) + a * (arch.q_dim + 2 * arch.kv_dim)  # q, k after RoPE; v keeps the qkv output
    else:
        per = a * (arch.q_dim + 2 * kv)
    if kind == "eager":
        per += (4 + a) * heads * s
        if arch.attn_logit_softcapping:
            per += a * heads * s
    else:
        per += a * arch.q_dim + 4 * heads
    if kind == "masked":
        per += a * setup.seq_length  # the additive mask the kernel makes from the boolean one, per layer
    if setup.method == "full":
        per += a * h + a * arch.q_dim  # inputs of q/k/v (shared) and o_proj
    return float(per)


def attention_backward_bytes_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """Alive per token in one layer while its attention kernel runs backward, beyond the checkpointed inputs
    and the incoming gradient: the attention block's saved set (its adapters' too; the MLP's is freed by then),
    the gradient of the attention output and the kernel's own: dq, dk, dv at the query width (k/v repeated,
    or expanded for grouped-query attention) and an fp32 dq accumulator; FlashAttention sums the expanded
    dk/dv to the key/value width before it frees the accumulator (traced). Eager attention: not modelled
    (its saved softmax dominates the layer recompute instead)."""
    a = setup.compute_bytes
    q, kv = arch.q_dim, arch.kv_dim
    kind = attention_mask_kind(setup)
    per = _attention_saved_bytes_per_token(arch, setup)
    if setup.method != "full":
        per += _lora_activation_bytes_per_token(arch, setup, True, kind)  # the attention adapters only
    per += a * q + 3 * a * q + 4 * q
    if kind == "flash" and kv < q:
        per += 2 * a * kv
    return float(per)


# which tensor a decoder layer's linear reads: adapters reading the same one share it under autocast
_LORA_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                "qkv_proj": "attention input", "o_proj": "attention output", "gate_proj": "mlp input",
                "up_proj": "mlp input", "gate_up_proj": "mlp input", "gate": "mlp input", "down_proj": "mlp inner"}
_MLP_INPUTS = ("mlp input", "mlp inner")


def _lora_activation_bytes_per_token(arch: Architecture, setup: TrainingSetup, tiled: bool = False,
                                     kind: str = "flash") -> float:
    """LoRA's own saved tensors per token and layer (see layer_activation_bytes_per_token)."""
    a = setup.compute_bytes
    dropout = setup.lora_dropout > 0
    total = 0.0
    seen: set[str] = set()
    for t in resolve_lora_targets(arch, setup.target_modules):
        name = t.module.name
        if name in ("lm_head", "embed_tokens"):
            continue  # outside the decoder layers; lm_head LoRA is counted with the logits
        rank = setup.lora_r * t.rank_multiplier
        if name.startswith("experts."):  # each routed copy of the tokens through the fused expert tensors
            if tiled:
                continue  # (only asked for the attention adapters: MoE blocks are never tiled)
            total += arch.num_experts_per_tok * ((a + (1 if dropout else 0)) * t.module.in_features + a * rank)
            continue
        source = _LORA_INPUTS.get(name, name)
        if tiled and source in _MLP_INPUTS:
            continue  # saved inside one MLP tile at a time
        total += a * rank
        if dropout:
            total += (a + 1) * t.module.in_features
        elif source not in seen:
            seen.add(source)
            if not (source == "attention output" and kind != "eager"):  # the kernel's saved output, viewed
                total += a * t.module.in_features
    return total


def fused_loss_head(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> bool:
    """Whether the trainer's loss runs lm_head through its fused chunked function (kubetune_trainer.loss
    LinearCrossEntropy: one lm_head gradient summed in place): a plain Linear head, i.e. not a LoRA target and
    not a DeepSpeed-partitioned weight (counted as ZeRO-3 for any stage: the larger figure)."""
    lora_head = setup.method != "full" and any(t.module.name == "lm_head"
                                                for t in resolve_lora_targets(arch, setup.target_modules))
    return strategy != "deepspeed" and not lora_head


def chunk_tokens(arch: Architecture, setup: TrainingSetup) -> int:
    """Tokens per loss chunk: fp32 logits of at most 256 MiB per chunk (kubetune_trainer.loss), at most a
    micro batch."""
    return min(setup.tokens, max(LOSS_MIN_CHUNK_TOKENS, LOSS_CHUNK_LOGIT_BYTES // (4 * arch.vocab_size)))


@dataclass(frozen=True)
class _Moment:
    """Transient bytes at one moment of the step: gradients alive, activations/temporaries, loss buffers."""

    gradients: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.gradients + self.activations + self.logits


def step_moments(arch: Architecture, setup: TrainingSetup, n_trainable: int, grads: int,
                 strategy: str = "none") -> dict[str, _Moment]:
    """The candidate peaks of one training step beyond weights and optimizer states (docs/sizing.md).

    - loss backward: every layer's saved tensors (or checkpointed inputs), the hidden states the loss
      keeps, and one loss chunk's fp32 buffers (12 x chunk x V: log-softmax output, its gradient and the
      logits' gradient; the fused head's logits, logsumexp temporaries and cast gradient come to the same)
      plus the lm_head gradient when lm_head trains (fused head: from the start of the loss backward);
    - lm_head gradient (full, unfused head, more than one loss chunk): its running sum, the next chunk's part
      and their sum;
    - layer recompute (checkpointing): the checkpointed inputs of every layer plus the last layer's full
      saved set, rebuilt for its backward, plus the gradients of its intermediates (tiled MLPs: one tile's);
    - attention backward (checkpointing): later in that layer, its attention kernel's backward beside the
      attention block's saved set (attention_backward_bytes_per_token);
    - end of backward (full fine-tuning): every gradient but the first layer's and the embedding's, plus the
      first layer's saved set and backward working set;
    - optimizer step: every gradient plus the step's temporaries (step_temporary_bytes);
    - parameter step in backward (optimizerInBackward): the largest parameter's gradient, stepped alone
      (the optimizer's temporaries for it and one fp32 norm slice), instead of the last two.
    Accumulated gradients of earlier micro-batches are alive through forward and backward (accumulation > 1).
    Liger's fused linear cross-entropy (CUDA) is counted as the chunked loss: the trace runs the chunked loss
    in its place, so Liger's own buffers (chunks of about T x H fp32 logits) are not modelled separately.
    """
    a = setup.compute_bytes
    t = setup.tokens
    h, v = arch.hidden_size, arch.vocab_size
    L = arch.num_hidden_layers
    full = setup.method == "full"
    in_bwd = optimizer_in_backward(setup, strategy)
    per_layer = int(layer_activation_bytes_per_token(arch, setup, strategy) * t)
    layer_input = a * h * t
    lean_norms = recomputed_norms(setup, strategy)
    tiled = tiled_mlp(arch, setup, strategy)
    kind = attention_mask_kind(setup)
    mask = 0
    if kind != "flash":
        mask = setup.micro_batch_size * setup.seq_length * setup.seq_length  # the boolean 4-D mask, once
    if setup.activation_offloading:
        # saved tensors wait in host memory (kubetune_trainer.offload) and come back one backward node at a
        # time: with checkpointing the recomputed layer's input, without it the largest node's saved set
        # (the MLP product's two factors)
        in_transit = layer_input if setup.gradient_checkpointing else 2 * a * arch.intermediate_size * t
        saved = in_transit + mask
    else:
        saved = L * kept_per_layer_bytes(arch, setup, strategy) + mask
    # the final norm's input (recomputed norms) or its normed output (saved when the norm weight trains)
    final_norm = a * h * t if (full or lean_norms) else 0
    loss_hidden = 2 * a * h * t  # the completion-token hidden states the chunks read, and their copy
    flow = a * h * t  # gradient of the hidden states flowing into the layers
    c = chunk_tokens(arch, setup)
    # the same for the fused head (traced): its recomputed fp32 logits, logsumexp's temporaries beside them, the
    # gradient formed in place and its compute-dtype cast
    loss_chunk = 12 * c * v + (2 * a * c * v if arch.final_logit_softcapping else 0)
    fused = fused_loss_head(arch, setup, strategy)
    head_params = arch.vocab_size * h if not arch.tie_word_embeddings else arch.embedding_params()
    head_grad = a * head_params if full else 0  # lm_head's gradient, formed at the start of backward
    # gradients of the layer's intermediates while its backward runs (MLP and projection widths; LoRA: the
    # adapter path's input gradient as well, cast through the fp32 adapter dtype). QLoRA's dequantized
    # weight of the matmul being differentiated is freed before these peak (traced).
    if full:
        layer_backward = 3 * a * (h + arch.intermediate_size) * t
    elif arch.is_moe:
        layer_backward = (3 * a * (h + arch.intermediate_size) + a * h) * t
    else:
        # LoRA/QLoRA, untiled: at most two MLP-wide gradients (of the product's factors) and one hidden-wide
        layer_backward = (2 * a * arch.intermediate_size + a * h) * t
    if tiled:
        # the MLP input's gradient, then one tile's intermediates and their gradients (6 x tile x I) and the
        # tile's output gradient
        tile = mlp_tile_tokens(arch, setup)
        layer_backward = a * h * t + 6 * a * arch.intermediate_size * tile + a * h * tile
        if setup.method == "qlora":
            # a tile's backward through a 4-bit projection dequantizes the whole weight (bitsandbytes)
            layer_backward += a * max(m.in_features * m.out_features for m in arch.mlp_linears())
    accumulated = grads if setup.gradient_accumulation_steps > 1 else 0
    chunks = -(-t // c)
    moments = {
        "loss backward": _Moment(accumulated + (head_grad if (fused or chunks > 1) else 0),
                                 saved + final_norm + flow, loss_hidden + loss_chunk),
    }
    if head_grad and chunks > 1 and not fused:
        # lm_head's gradient summed over loss chunks by autograd: the running sum, the next chunk's part and their sum
        moments["lm_head gradient"] = _Moment(accumulated + 3 * head_grad, saved + final_norm + flow, loss_hidden)
    # a recomputed input norm saves the layer's input, which checkpointing keeps already
    recomputed = per_layer - (layer_input if lean_norms else 0)
    if setup.gradient_checkpointing:
        moments["layer recompute"] = _Moment(accumulated + (0 if in_bwd else head_grad),
                                             saved + recomputed + layer_backward + flow, 0)
        if kind != "eager":
            # later in the same layer's backward: its attention kernel's backward (the MLP's tensors are freed)
            attention = int(attention_backward_bytes_per_token(arch, setup) * t)
            moments["attention backward"] = _Moment(accumulated + (0 if in_bwd else head_grad),
                                                    saved + attention + flow, 0)
    if setup.activation_offloading and not setup.gradient_checkpointing:
        # a layer's backward: the MLP product's factors back from host memory, its incoming gradient and both
        # factors' gradients, beside the hidden-wide gradients (traced)
        working = max(layer_backward, (3 * a * arch.intermediate_size + 2 * a * h) * t)
        moments["layer backward"] = _Moment(accumulated + (0 if in_bwd else head_grad), saved + working + flow, 0)
    if in_bwd:
        largest = arch.largest_param_tensor()
        # the largest parameter's gradient while it is stepped alone: the optimizer's temporaries for that
        # tensor and the fp32 square of one norm slice, with the loss backward's hidden states still alive
        norm = 8 * min(largest, NORM_SLICE)
        temporaries = step_temporary_bytes(arch, setup, n_trainable, strategy, one_tensor=True) + norm
        moments["parameter step in backward"] = _Moment(a * largest, temporaries + saved + flow, loss_hidden)
    else:
        if full:
            # the first layer's backward: every gradient but its own and the (untied) embedding's (last)
            end = (layer_input + recomputed if setup.gradient_checkpointing else per_layer) + layer_backward + flow
            later = arch.layer_params() + (0 if arch.tie_word_embeddings else arch.embedding_params())
            moments["end of backward"] = _Moment(grads - _ceil_div(grads * later, n_trainable), end, 0)
            if arch.tie_word_embeddings:
                # the embedding lookup's backward forms a dense gradient of the whole (tied) table and adds it
                # out of place to the lm_head's: the new part and the sum, with every other gradient alive
                # (traced: Qwen2.5-0.5B, Llama-3.2-1B)
                moments["tied embedding gradient"] = _Moment(grads, 2 * a * arch.embedding_params(), 0)
        moments["optimizer step"] = _Moment(grads, step_temporary_bytes(arch, setup, n_trainable, strategy), 0)
    return moments


def kept_per_layer_bytes(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> int:
    """What one decoder layer keeps from forward to backward: its input with checkpointing, else its saved set."""
    t = setup.tokens
    if setup.gradient_checkpointing:
        return setup.compute_bytes * arch.hidden_size * t
    return int(layer_activation_bytes_per_token(arch, setup, strategy) * t)


def offloaded_activation_bytes(arch: Architecture, setup: TrainingSetup, strategy: str = "none") -> int:
    """Host RAM activation offloading fills at the end of forward: what every layer keeps and the hidden states
    the loss keeps (traced: 1.06 GiB for Llama 3.1 8B, 4,096 tokens, checkpointing)."""
    loss_hidden = 2 * setup.compute_bytes * arch.hidden_size * setup.tokens
    return arch.num_hidden_layers * kept_per_layer_bytes(arch, setup, strategy) + loss_hidden


def activation_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Activations and temporaries at the step's peak moment (see step_moments), without gradients or loss."""
    n = trainable_params(arch, setup.method, setup.target_modules, setup.lora_r)
    m = max(step_moments(arch, setup, n, gradient_bytes(setup, n)).values(), key=lambda x: x.total)
    return m.activations


def logits_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Loss buffers at the step's peak moment: the hidden states the loss keeps and one chunk's fp32 logits
    buffers (see step_moments); never the full [tokens, vocab] logits (kubetune_trainer.loss)."""
    n = trainable_params(arch, setup.method, setup.target_modules, setup.lora_r)
    m = max(step_moments(arch, setup, n, gradient_bytes(setup, n)).values(), key=lambda x: x.total)
    return m.logits


def zero3_working_set_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Parameters ZeRO-3 gathers on each GPU at a time: the current layer and the prefetched next one,
    or the embedding/lm_head with one layer (whichever is larger), in the compute dtype."""
    b = setup.compute_bytes
    layer = arch.layer_params()
    return max(2 * layer, arch.embedding_params() + layer) * b


def comm_buffer_bytes(arch: Architecture, setup: TrainingSetup, par: Parallelism, grads_full: int) -> int:
    """Communication buffers: NCCL (>1 GPU), DDP gradient buckets (a second copy of all gradients,
    as DDP does without gradient_as_bucket_view), DeepSpeed ZeRO reduce/all-gather buckets (sized
    hidden^2 elements each, as accelerate's `auto` config does: 4 x H^2 x 2 B)."""
    if par.world_size <= 1 and par.strategy != "deepspeed":
        return 0
    total = NCCL_BYTES if par.world_size > 1 else 0
    if par.strategy == "ddp":
        total += grads_full
    elif par.strategy == "deepspeed":
        total += 4 * arch.hidden_size**2 * 2
    return total


def fragmentation_bytes(persistent: int, transient: int) -> int:
    """Reserved-but-unused allocator memory: 15% of the per-step tensors, 2% of the long-lived ones."""
    return int(FRAGMENTATION_TRANSIENT * transient + FRAGMENTATION_PERSISTENT * persistent)


def estimate_memory(arch: Architecture, setup: TrainingSetup, par: Parallelism | None = None) -> MemoryEstimate:
    """Peak bytes per GPU for one training step of `arch` under `setup` and `par`.

    Weights, master weights and optimizer states live through the whole step; gradients, activations and
    loss buffers are taken at the step's peak moment (step_moments). ZeRO partitioning over the
    data-parallel world size N: stage 1 divides optimizer states and fp32 master weights by N, stage 2
    also gradients, stage 3 also the weights (plus the gathered working set). Offloading the optimizer
    moves gradients, states and master weights to host RAM; offloading parameters (stage 3) leaves only
    the working set on the GPU.
    """
    par = par or Parallelism()
    n = max(par.world_size, 1)
    strategy = par.strategy
    n_train = trainable_params(arch, setup.method, setup.target_modules, setup.lora_r)
    weights = weight_bytes(arch, setup, n_train, strategy)
    master = master_weight_bytes(setup, n_train, strategy)
    grads_full = gradient_bytes(setup, n_train, strategy)
    grads = grads_full
    optim = optimizer_state_bytes(setup, n_train, strategy)
    notes: list[str] = []
    host = 0
    z = par.zero
    if z >= 1:
        master, optim = _ceil_div(master, n), _ceil_div(optim, n)
    if z >= 2:
        grads = _ceil_div(grads, n)
    if z >= 3:
        weights = _ceil_div(weights, n) + zero3_working_set_bytes(arch, setup)
        notes.append("ZeRO-3 weights are partitioned; the gathered working set is included")
    if par.offload_optimizer:
        # ZeRO-Offload: the optimizer step runs on the CPU, so gradient partitions, fp32 master
        # weights and optimizer states all live in host RAM (the GPU keeps bucket buffers only)
        host += master + optim + grads * 2  # fp32 copy of the gradient partition on the host
        master = optim = grads = 0
        notes.append("gradients, optimizer states and fp32 master weights live in host RAM")
    if par.offload_params:
        host += weights - zero3_working_set_bytes(arch, setup)
        weights = zero3_working_set_bytes(arch, setup)
        notes.append("parameters live in host RAM; only the gathered working set is on the GPU")
    if setup.activation_offloading:
        host += offloaded_activation_bytes(arch, setup, strategy)
        notes.append("saved activations wait in host RAM (activation offloading)")
    if embeddings_on_host(arch, setup, strategy):
        host += host_embedding_bytes(arch, setup, strategy)
        notes.append("the frozen input-embedding table lives in host RAM; only the batch's rows reach the GPU")
    moments = step_moments(arch, setup, n_train, grads, strategy)
    if z:  # DeepSpeed steps its own optimizer on partitions: no per-parameter step temporaries here
        moments.pop("optimizer step", None)
        moments["optimizer step"] = _Moment(grads, 0, 0)
    moment_name, peak = max(moments.items(), key=lambda kv: kv[1].total)
    notes.append(f"peak at the {moment_name}")
    if optimizer_in_backward(setup, strategy):
        notes.append("optimizer step fused into backward: gradients are freed parameter by parameter")
    acts, logits = peak.activations, peak.logits
    comm = comm_buffer_bytes(arch, setup, par, grads_full)
    frag = fragmentation_bytes(weights + master + optim + comm, peak.total)
    if setup.method == "qlora" and z >= 3:
        notes.append("QLoRA with ZeRO-3 needs bnb_4bit_quant_storage set to the compute dtype")
    return MemoryEstimate(
        weights=weights, master_weights=master, gradients=peak.gradients, optimizer_states=optim,
        activations=acts, logits=logits, comm_buffers=comm, cuda_context=CUDA_CONTEXT_BYTES,
        fragmentation=frag, total_params=arch.total_params(), trainable_params=n_train,
        host_offload=host, notes=tuple(notes),
    )


def _ceil_div(x: int, n: int) -> int:
    return -(-x // n)


def gib(x: float) -> float:
    """Bytes -> GiB rounded to 2 decimals."""
    return round(x / GiB, 2)
