"""Trainable-parameter counting for full fine-tuning and LoRA (what peft will create)."""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import Architecture, ArchitectureError, LinearModule

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraTarget:
    """One adapted module kind: the linear it wraps and how many copies the model has."""

    module: LinearModule
    copies: int  # number of such modules in the whole model
    rank_multiplier: int = 1  # fused MoE experts: peft uses rank r*experts (x2 for gate_up_proj)

    def trainable_params(self, r: int) -> int:
        """LoRA A (r x in) + B (out x r) per copy, times copies."""
        return self.copies * r * self.rank_multiplier * (self.module.in_features + self.module.out_features)


def resolve_lora_targets(arch: Architecture, target_modules: list[str] | tuple[str, ...]) -> list[LoraTarget]:
    """Which linears peft adapts for `target_modules` (`all-linear` = every linear except the output layer)."""
    layer = {m.name: m for m in arch.layer_linears()}
    names = list(target_modules) or list(arch.lora_default_targets)
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise ArchitectureError("lora.targetModules: 'all-linear' cannot be combined with other names")
        targets = [LoraTarget(m, arch.num_hidden_layers) for m in layer.values()]
        return targets + _moe_targets(arch)
    targets: list[LoraTarget] = []
    for name in dict.fromkeys(names):
        if name in layer:
            targets.append(LoraTarget(layer[name], arch.num_hidden_layers))
        elif name == "gate" and arch.is_moe:
            targets.append(_moe_targets(arch)[0])
        elif name == "lm_head":
            targets.append(LoraTarget(LinearModule("lm_head", arch.hidden_size, arch.vocab_size), 1))
        elif name == "embed_tokens":
            # peft's LoRA Embedding: A is (r x vocab), B is (hidden x r) -> same count formula
            targets.append(LoraTarget(LinearModule("embed_tokens", arch.vocab_size, arch.hidden_size), 1))
        else:
            valid = ", ".join([*layer, "lm_head", "embed_tokens", ALL_LINEAR])
            raise ArchitectureError(f"lora.targetModules: {name!r} is not a module of {arch.name} ({arch.family}); valid: {valid}")
    return targets


def _moe_targets(arch: Architecture) -> list[LoraTarget]:
    """MoE modules peft's all-linear adapts: the router and the fused expert tensors (via ParamWrapper).

    peft 0.21 wraps the 3-D expert parameters with one LoRA pair per tensor whose rank is
    r x num_experts (2 x r x num_experts for the fused gate_up_proj).
    """
    if not arch.is_moe:
        return []
    h, i, e, n = arch.hidden_size, arch.intermediate_size, arch.num_local_experts, arch.num_hidden_layers
    return [
        LoraTarget(LinearModule("gate", h, e), n),
        LoraTarget(LinearModule("experts.gate_up_proj", h, 2 * i), n, rank_multiplier=2 * e),
        LoraTarget(LinearModule("experts.down_proj", i, h), n, rank_multiplier=e),
    ]


def lora_trainable_params(arch: Architecture, target_modules: list[str] | tuple[str, ...], r: int) -> int:
    """Exact number of LoRA parameters peft creates (no bias, no DoRA magnitude)."""
    return sum(t.trainable_params(r) for t in resolve_lora_targets(arch, target_modules))


def trainable_params(arch: Architecture, method: str, target_modules: list[str] | tuple[str, ...] = (), r: int = 16) -> int:
    """Trainable parameters for a method: all of them for `full`, the adapters for lora/qlora."""
    if method == "full":
        return arch.total_params()
    return lora_trainable_params(arch, target_modules, r)
