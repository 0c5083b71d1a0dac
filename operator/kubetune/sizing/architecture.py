"""Model architecture: what the estimator needs to know about a decoder-only transformer.

An `Architecture` is built from a Hugging Face `config.json` dict, from the built-in
catalog (YAML files in `catalog/`), or from the inline hints of `spec.model.architecture`.
Family-specific layout facts that are not config fields (Qwen2's q/k/v bias, Phi-3's fused
projections, Gemma 2's four norms per layer) are derived from `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

# model_type -> family name used in the catalog and in spec.model.architecture.family
KNOWN_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "phi3", "gemma2")

# Attention/MLP projection names per family, as transformers names the nn.Linear modules.
_ATTN_SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_SPLIT = ("gate_proj", "up_proj", "down_proj")

# spec.model.architecture (camelCase) -> config.json (snake_case)
HINT_FIELDS = {
    "hiddenSize": "hidden_size",
    "intermediateSize": "intermediate_size",
    "numHiddenLayers": "num_hidden_layers",
    "numAttentionHeads": "num_attention_heads",
    "numKeyValueHeads": "num_key_value_heads",
    "vocabSize": "vocab_size",
    "tieWordEmbeddings": "tie_word_embeddings",
    "numLocalExperts": "num_local_experts",
    "numExpertsPerTok": "num_experts_per_tok",
    "headDim": "head_dim",
}
REQUIRED_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class ArchitectureError(ValueError):
    """The model architecture cannot be determined or is inconsistent."""


@dataclass(frozen=True)
class LinearModule:
    """One nn.Linear inside a decoder layer (or the lm_head): its peft name and shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    per_layer: int = 1  # how many copies per decoder layer (1 for dense layers)

    @property
    def params(self) -> int:
        """Parameters of one copy: weight plus optional bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """Shape of a decoder-only causal LM, in config.json terms."""

    name: str
    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    attention_bias: bool = False  # bias on q, k, v and o (llama/mistral `attention_bias`)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    norms_per_layer: int = 2  # Gemma 2: 4
    attn_logit_softcapping: float = 0.0
    final_logit_softcapping: float = 0.0
    max_position_embeddings: int = 0
    lora_default_targets: tuple[str, ...] = _ATTN_SPLIT
    source: str = "config"  # catalog | config | hints
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived shapes -------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the query projection output (heads x head_dim)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projection outputs."""
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        """True for sparse mixture-of-experts models (Mixtral)."""
        return self.num_local_experts > 0

    def attention_linears(self) -> list[LinearModule]:
        """The attention projections of one decoder layer."""
        h = self.hidden_size
        if self.fused_projections:
            return [
                LinearModule("qkv_proj", h, self.q_dim + 2 * self.kv_dim, self.attention_bias),
                LinearModule("o_proj", self.q_dim, h, self.attention_bias),
            ]
        qkv_b = self.attention_bias or self.qkv_bias
        return [
            LinearModule("q_proj", h, self.q_dim, qkv_b),
            LinearModule("k_proj", h, self.kv_dim, qkv_b),
            LinearModule("v_proj", h, self.kv_dim, qkv_b),
            LinearModule("o_proj", self.q_dim, h, self.attention_bias),
        ]

    def mlp_linears(self) -> list[LinearModule]:
        """The dense MLP projections of one decoder layer (empty for MoE: experts are fused tensors)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.is_moe:
            return []
        if self.fused_projections:
            return [
                LinearModule("gate_up_proj", h, 2 * i, self.mlp_bias),
                LinearModule("down_proj", i, h, self.mlp_bias),
            ]
        return [
            LinearModule("gate_proj", h, i, self.mlp_bias),
            LinearModule("up_proj", h, i, self.mlp_bias),
            LinearModule("down_proj", i, h, self.mlp_bias),
        ]

    def layer_linears(self) -> list[LinearModule]:
        """All nn.Linear modules of one decoder layer (what peft's `all-linear` targets)."""
        return self.attention_linears() + self.mlp_linears()

    def expert_params_per_layer(self) -> int:
        """Parameters of the MoE block per layer: router + experts (gate_up and down, fused 3-D tensors)."""
        if not self.is_moe:
            return 0
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        return h * e + e * (h * 2 * i + i * h)

    def norm_params_per_layer(self) -> int:
        """RMSNorm weights per decoder layer."""
        return self.norms_per_layer * self.hidden_size

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        return sum(m.params for m in self.layer_linears()) + self.expert_params_per_layer() + self.norm_params_per_layer()

    def embedding_params(self) -> int:
        """Input embedding matrix (vocab x hidden)."""
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """Output projection; 0 when tied to the input embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        """Exact parameter count of the *ForCausalLM model (embeddings, layers, final norm, lm_head)."""
        return (
            self.embedding_params()
            + self.num_hidden_layers * self.layer_params()
            + self.hidden_size  # final norm
            + self.lm_head_params()
        )

    def quantizable_params(self) -> int:
        """Parameters bitsandbytes stores in 4 bit for QLoRA: weights of the decoder layers' nn.Linear modules.

        Embeddings, lm_head, norms, biases, the router and fused MoE expert tensors (3-D parameters, not
        nn.Linear modules, which bitsandbytes does not replace) stay in the compute dtype.
        """
        linear = sum(m.in_features * m.out_features for m in self.layer_linears())
        return self.num_hidden_layers * linear

    def largest_linear_params(self) -> int:
        """Weight elements of the biggest single decoder-layer matrix (QLoRA dequantizes one at a time)."""
        sizes = [m.in_features * m.out_features for m in self.layer_linears()]
        if self.is_moe:
            sizes.append(self.hidden_size * 2 * self.intermediate_size)
        return max(sizes)

    def largest_param_tensor(self) -> int:
        """Elements of the biggest single parameter tensor (embedding, lm_head, a linear or a fused expert
        tensor): optimizer steps that work one tensor at a time size their temporaries by it."""
        sizes = [self.embedding_params(), self.lm_head_params(), self.largest_linear_params()]
        if self.is_moe:
            sizes.append(self.num_local_experts * self.hidden_size * 2 * self.intermediate_size)
        return max(sizes)

    def with_overrides(self, **changes: Any) -> "Architecture":
        """A copy with some fields replaced (used for inline hints)."""
        return replace(self, **changes)


def _family_of(model_type: str) -> str:
    if model_type in KNOWN_FAMILIES:
        return model_type
    # Other llama-like decoders (same projection names, 2 norms, no biases) are treated as llama.
    return "llama"


def architecture_from_config(
    config: Mapping[str, Any],
    name: str = "",
    source: str = "config",
    lora_default_targets: tuple[str, ...] | None = None,
) -> Architecture:
    """Build an Architecture from a Hugging Face config.json dict."""
    cfg = dict(config)
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type", ""))}
    missing = [k for k in REQUIRED_CONFIG_FIELDS if not cfg.get(k)]
    if missing:
        raise ArchitectureError(f"config for {name or 'model'} is missing {', '.join(missing)}")
    model_type = str(cfg.get("model_type") or "llama")
    family = _family_of(model_type)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if hidden % heads and not cfg.get("head_dim"):
        raise ArchitectureError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; give head_dim")
    if heads % kv_heads:
        raise ArchitectureError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    experts = int(cfg.get("num_local_experts") or 0)
    default_tie = family == "gemma2"
    if lora_default_targets is None:
        lora_default_targets = ("qkv_proj", "o_proj") if family == "phi3" else _ATTN_SPLIT
    return Architecture(
        name=name or str(cfg.get("_name_or_path") or model_type),
        family="mixtral" if experts and family in ("llama", "mistral", "mixtral") else family,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=int(cfg["vocab_size"]),
        head_dim=head_dim,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default_tie)),
        num_local_experts=experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or (2 if experts else 0)),
        attention_bias=bool(cfg.get("attention_bias", False)) and family != "qwen2",
        qkv_bias=family == "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        fused_projections=family == "phi3",
        norms_per_layer=4 if family == "gemma2" else 2,
        attn_logit_softcapping=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_logit_softcapping=float(cfg.get("final_logit_softcapping") or 0.0),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        lora_default_targets=tuple(lora_default_targets),
        source=source,
        config=cfg,
    )


def apply_hints(base: Architecture | None, hints: Mapping[str, Any] | None, name: str = "") -> Architecture:
    """Overlay spec.model.architecture hints on a base architecture (hints win; 0/empty = not given)."""
    hints = dict(hints or {})
    given = {cfg_key: hints[h] for h, cfg_key in HINT_FIELDS.items() if h in hints and hints[h] not in (None, 0, "")}
    if "tieWordEmbeddings" in hints and hints["tieWordEmbeddings"] is not None:
        given["tie_word_embeddings"] = bool(hints["tieWordEmbeddings"])
    family = str(hints.get("family") or "")
    if base is None:
        if not given and not family:
            raise ArchitectureError("no architecture")
        cfg = {"model_type": family or "llama", **given}
        missing = [k for k in REQUIRED_CONFIG_FIELDS if not cfg.get(k)]
        if missing:
            camel = {v: k for k, v in HINT_FIELDS.items()}
            raise ArchitectureError(
                "spec.model.architecture is incomplete for a model that is not in the catalog: missing "
                + ", ".join(camel[m] for m in missing)
            )
        return architecture_from_config(cfg, name=name, source="hints")
    if not given and (not family or family == base.family):
        return base
    cfg = {**base.config, **given}
    if family:
        cfg["model_type"] = family
    if given.get("head_dim") is None and ("hidden_size" in given or "num_attention_heads" in given):
        cfg.pop("head_dim", None)  # recompute from the hinted hidden size / heads
    arch = architecture_from_config(cfg, name=name or base.name, source=f"{base.source}+hints",
                                    lora_default_targets=base.lora_default_targets)
    return arch
