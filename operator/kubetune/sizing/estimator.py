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
    """Peak bytes per GPU of one training step, term by term (see docs/sizing.md)."""

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
    host_offload: int = 0  # CPU RAM per rank for offloaded optimizer/params
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


def weight_bytes(arch: Architecture, setup: TrainingSetup, n_trainable: int) -> int:
    """Model weights on the GPU (unpartitioned).

    full: every parameter in the compute dtype (bf16/fp16: 2 B, fp32: 4 B); the fp32 master
    copy mixed precision needs is a separate term. lora: frozen base in the compute dtype plus
    fp32 adapters. qlora: decoder linears in NF4 (see nf4_bytes_per_param) or int8, fp32 adapters, and
    embeddings, lm_head, norms and biases in fp32: the trainer's k-bit preparation
    (peft.prepare_model_for_kbit_training) upcasts every parameter that is not quantized to fp32
    (checked on the trainer's own QLoRA path in tests/trainer/test_qlora_dtypes.py).
    """
    p = arch.total_params()
    b = setup.compute_bytes
    if setup.method == "full":
        return p * b
    adapters = n_trainable * ADAPTER_BYTES
    if setup.method == "lora":
        return p * b + adapters
    q = arch.quantizable_params()
    return int(q * quantized_bytes_per_param(setup.quant_bits, setup.quant_double)) + (p - q) * QLORA_UNQUANTIZED_BYTES \
        + adapters


def master_weight_bytes(setup: TrainingSetup, n_trainable: int) -> int:
    """fp32 master copy of the trainable weights: needed for full fine-tuning in bf16/fp16 (4 B/param).

    LoRA adapters are already fp32 and fp32 training updates the weights in place: 0.
    """
    return n_trainable * 4 if setup.method == "full" and setup.precision != "fp32" else 0


def gradient_bytes(setup: TrainingSetup, n_trainable: int) -> int:
    """Gradients of the trainable parameters, in the dtype of those parameters.

    full: compute dtype (2 B in bf16/fp16, 4 B in fp32). lora/qlora: fp32 adapters -> 4 B.
    They live across gradient-accumulation micro steps, so they count at the peak.
    """
    per = setup.compute_bytes if setup.method == "full" else ADAPTER_BYTES
    return n_trainable * per


def optimizer_state_bytes(setup: TrainingSetup, n_trainable: int) -> int:
    """Optimizer states per trainable parameter.

    AdamW (and paged 32-bit): exp_avg + exp_avg_sq in fp32 = 8 B. 8-bit AdamW (bitsandbytes,
    paged or not): two uint8 states = 2 B (+ one fp32 absmax per 2048-value block per state,
    ~0.004 B). SGD as the trainer configures it (no momentum): 0. Paged optimizers can be
    evicted to host RAM under pressure, but the sizer does not count on it.
    """
    per = {"adamw": 8.0, "paged_adamw_32bit": 8.0, "adamw_8bit": 2.0 + 8 / 2048,
           "paged_adamw_8bit": 2.0 + 8 / 2048, "sgd": 0.0}[setup.optimizer]
    return int(n_trainable * per)


def layer_activation_bytes_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """Bytes autograd saves for backward in one decoder layer, per token (no checkpointing).

    Counted from what PyTorch keeps for each op of a transformers decoder layer (a = bytes of
    the compute dtype, H hidden, I intermediate, q = heads x head_dim, kv = key/value width):
      RMSNorm: fp32 upcast of its input (4H) [+ normalized input aH if the norm weight trains]
      q/k/v: the projected q, k, v after RoPE (a(q + 2kv); SDPA/eager repeat k/v to all heads
      for GQA, flash-attn does not) [+ the shared input aH if the projections train]
      attention core: SDPA/flash: output aq + fp32 logsumexp 4*heads; eager: fp32 softmax and
      its bf16 copy (4 + a) x heads x s per token (the s^2 term), plus the tanh output with
      logit soft-capping (Gemma 2)
      o_proj input aq (if trained); MLP: act input aI, act output aI, up output aI,
      [+ MLP input aH and down input aI if trained]; MoE: the same per routed expert copy,
      plus router logits.
      LoRA per adapted module: its input copy in fp32 (peft casts to the adapter dtype) 4 x in,
      a 1-byte dropout mask x in when dropout > 0, and the rank-r intermediate 4r.
    """
    a = setup.compute_bytes
    h, i, s = arch.hidden_size, arch.intermediate_size, setup.seq_length
    full = setup.method == "full"
    heads = arch.num_attention_heads
    kv = arch.kv_dim if setup.attention == "flash" else arch.q_dim  # repeat_kv outside flash-attn
    norm = 4 * h + (a * h if full else 0)
    per = arch.norms_per_layer * norm
    # attention
    per += a * (arch.q_dim + 2 * kv)
    if setup.attention == "eager":
        per += (4 + a) * heads * s
        if arch.attn_logit_softcapping:
            per += a * heads * s
    else:
        per += a * arch.q_dim + 4 * heads
    if full:
        per += a * h + a * arch.q_dim  # inputs of q/k/v (shared) and o_proj
    # MLP
    mlp = 3 * a * i + (a * h + a * i if full else 0)
    if arch.is_moe:
        k = arch.num_experts_per_tok
        # each routed copy: gathered input (saved if trained), gate_up output (2I, act saves a view),
        # act output, down input (if trained), down output scaled by the routing weight (aH)
        per_expert = 2 * a * i + a * i + a * h + (a * h + a * i if full else 0)
        mlp = k * per_expert + (a + 4) * arch.num_local_experts
    per += mlp
    if setup.method != "full":
        per += _lora_activation_bytes_per_token(arch, setup)
    return float(per)


def _lora_activation_bytes_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """LoRA's own saved tensors per token and layer (see layer_activation_bytes_per_token)."""
    mask = 1 if setup.lora_dropout > 0 else 0
    total = 0.0
    for t in resolve_lora_targets(arch, setup.target_modules):
        if t.module.name in ("lm_head", "embed_tokens"):
            continue  # outside the decoder layers; lm_head LoRA is counted with the logits
        rank = setup.lora_r * t.rank_multiplier
        routed = arch.num_experts_per_tok if t.module.name.startswith("experts.") else 1
        total += routed * ((ADAPTER_BYTES + mask) * t.module.in_features + ADAPTER_BYTES * rank)
    return total


def activation_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Activation memory at the peak of backward for one micro batch.

    Without checkpointing: every layer's saved tensors (L x per-layer x tokens).
    With checkpointing (one checkpoint per decoder layer, as transformers does): each layer
    keeps only its input (aH per token), and during backward one layer is recomputed, so its
    full saved set is live once: L x aH x T + per-layer x T.
    Both add the final norm, the lm_head input when lm_head trains, two hidden-size gradient
    buffers flowing between layers (2aH x T), the padding attention mask when sequences are
    padded (SDPA/eager: b x s x s bytes as bool/dtype), and for QLoRA one dequantized
    weight matrix (the largest linear, in the compute dtype) that bitsandbytes materializes
    per matmul.
    """
    a = setup.compute_bytes
    t = setup.tokens
    h = arch.hidden_size
    per_layer = layer_activation_bytes_per_token(arch, setup)
    if setup.gradient_checkpointing:
        layers = arch.num_hidden_layers * a * h * t + per_layer * t
    else:
        layers = arch.num_hidden_layers * per_layer * t
    final_norm = (4 * h + (a * h if setup.method == "full" else 0)) * t
    head_input = a * h * t if setup.method == "full" or "lm_head" in setup.target_modules else 0
    grad_flow = 2 * a * h * t
    mask = 0
    if not setup.packing and setup.attention != "flash":
        mask = setup.micro_batch_size * setup.seq_length * setup.seq_length * (1 if setup.attention == "sdpa" else a)
    dequant = arch.largest_linear_params() * a if setup.method == "qlora" else 0
    return int(layers + final_norm + head_input + grad_flow + mask + dequant)


def logits_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Logits and cross-entropy buffers at their peak, the start of the loss backward: 12 x V per token.

    transformers computes the logits in the compute dtype, upcasts them to fp32 for the loss
    (`logits.float()`), and cross_entropy = log_softmax + nll_loss saves the fp32 log-softmax output
    (4V). The trainer drops the model outputs before backward, so at the peak the live tensors are
    that saved output, its incoming gradient and the gradient w.r.t. the fp32 logits: 3 x 4V.
    (During forward: logits aV + fp32 copy 4V + log-softmax 4V = (8 + a)V <= 12V.) This is why a
    128k-256k vocabulary dominates small models. Final-logit soft-capping (Gemma 2: tanh before the
    upcast) keeps its tanh output and the capped logits as well (2aV).
    """
    a = setup.compute_bytes
    per_token = 12 * arch.vocab_size
    if arch.final_logit_softcapping:
        per_token += 2 * a * arch.vocab_size
    return int(per_token * setup.tokens)


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

    ZeRO partitioning over the data-parallel world size N: stage 1 divides optimizer states and
    fp32 master weights by N, stage 2 also gradients, stage 3 also the weights (plus the gathered
    working set). Offloading the optimizer moves gradients, states and master weights to host RAM; offloading
    parameters (stage 3) leaves only the working set on the GPU.
    """
    par = par or Parallelism()
    n = max(par.world_size, 1)
    n_train = trainable_params(arch, setup.method, setup.target_modules, setup.lora_r)
    weights = weight_bytes(arch, setup, n_train)
    master = master_weight_bytes(setup, n_train)
    grads_full = gradient_bytes(setup, n_train)
    grads = grads_full
    optim = optimizer_state_bytes(setup, n_train)
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
    acts = activation_bytes(arch, setup)
    logits = logits_bytes(arch, setup)
    comm = comm_buffer_bytes(arch, setup, par, grads_full)
    frag = fragmentation_bytes(weights + master + grads + optim + comm, acts + logits)
    if setup.method == "qlora" and z >= 3:
        notes.append("QLoRA with ZeRO-3 needs bnb_4bit_quant_storage set to the compute dtype")
    return MemoryEstimate(
        weights=weights, master_weights=master, gradients=grads, optimizer_states=optim,
        activations=acts, logits=logits, comm_buffers=comm, cuda_context=CUDA_CONTEXT_BYTES,
        fragmentation=frag, total_params=arch.total_params(), trainable_params=n_train,
        host_offload=host, notes=tuple(notes),
    )


def _ceil_div(x: int, n: int) -> int:
    return -(-x // n)


def gib(x: float) -> float:
    """Bytes -> GiB rounded to 2 decimals."""
    return round(x / GiB, 2)
