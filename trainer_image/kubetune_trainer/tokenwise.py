"""Decoder norms and MLPs that keep almost nothing for backward: each runs without autograd in forward, saves
only its input, and is recomputed with autograd in backward, the MLP a tile of tokens at a time.

Both are token-wise (every token's output depends on that token's input only), so the recomputation can be
split along the tokens without changing the result beyond float summation order. What autograd saves
otherwise, per decoder layer and token (a = 2 bytes for bf16, H hidden, I MLP width):

- RMSNorm upcasts its input to fp32 and autograd keeps that copy (4H per norm, two or four per layer, plus
  the normalized input when the weight trains). Recomputed, a norm keeps its bf16 input (aH), which is often
  alive anyway: the input layer norm reads the decoder layer's input, the very tensor gradient
  checkpointing keeps.
- The gated MLP keeps the gate output, its activation and the up output (3aI), and its backward forms as many
  gradients again: on Llama 3.1 8B with 4,096 tokens that is 6 x 112 MiB alive at once, the largest part of
  the recomputed layer under gradient checkpointing. Tiled, only one tile's intermediates exist at a time
  (`MLP_TILE_BYTES` per intermediate), plus the MLP's input and its gradient.

Cost: the norms' recomputation is elementwise work; the MLP's forward runs once more per step (in forward
without autograd, then per tile in backward), and the MLP holds most of a decoder layer's matmul work. Under
gradient checkpointing the layer's recompute skips the MLP where the layer ends in `residual + mlp`
(`RESIDUAL_MLP_LAYERS`): that recompute only rebuilds saved tensors, and the MLP's is its input, so the MLP
runs twice per step there as well, not three times. Hence `training.tiledMlp` (null = auto: on for
LoRA/QLoRA with gradient checkpointing, where the recomputed MLP dominates the peak). Full fine-tuning
keeps the plain MLP under auto: summing a weight's gradient over tiles would need an fp32 buffer the size of
the MLP weights (the gradients of the trainable parameters an MLP or norm has are summed over tiles in fp32
and handed to autograd once, so gradient hooks and the optimizer in backward see one complete gradient).

Not applied under DeepSpeed (ZeRO-3 frees gathered weights after forward, before the recomputation) or with
torch.compile (the compiled graph chooses its own saved set), nor to mixture-of-experts blocks (routers
return more than one tensor). Random ops inside (LoRA dropout) draw the same values in the recomputation as
in forward: the RNG state is restored, as gradient checkpointing does.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

MLP_TILE_BYTES = 16 * 2 ** 20  # one MLP intermediate per tile (~585 tokens of Llama 3.1 8B's 14,336-wide MLP)
NORM_TILE_BYTES = 8 * 2 ** 20  # a norm's fp32 upcast per tile (512 tokens at hidden size 4,096): its backward
# holds several fp32 temporaries of that size
MIN_TILE_TOKENS = 64
NORM_ATTRIBUTES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
_WRAPPED = "_kubetune_tokenwise"
# Decoder layers (transformers' classes) that end in `residual + mlp(norm(x))`: nothing after the MLP saves a
# tensor for backward, so a checkpoint's recomputation of the layer need not run the MLP (see `_wrap`). Not
# Gemma 2/3 or OLMo 2, whose post-feed-forward norm saves the MLP's output.
RESIDUAL_MLP_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                                 "Qwen3DecoderLayer", "Phi3DecoderLayer"})


def tile_tokens(width: int, element_bytes: int, budget: int) -> int:
    """Tokens per tile so that one [tokens, width] tensor of `element_bytes` stays within `budget` bytes."""
    return max(MIN_TILE_TOKENS, budget // max(1, width * element_bytes))


class _Autocast:
    """The autocast state of forward, re-entered for the recomputation in backward (which runs without it)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@contextlib.contextmanager
def _rng_restored(state: tuple[torch.Tensor, torch.Tensor | None] | None, device: torch.device):
    """Run with the RNG state of forward (CPU, and the input's CUDA device), leaving the current one unchanged."""
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _stochastic(module: nn.Module) -> bool:
    """True when `module` draws random numbers in forward (an active dropout)."""
    return module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


class TokenwiseRecompute(torch.autograd.Function):
    """y = run(x) for a token-wise `run`, computed `tile` tokens at a time without autograd; backward recomputes
    each tile with autograd. `params` are the trainable parameters `run` uses (their gradients are returned)."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], torch.Tensor], tile: int, stochastic: bool, x: torch.Tensor,
                *params):
        ctx.run, ctx.tile = run, tile
        ctx.autocast = _Autocast(x.device.type)
        ctx.rng = _rng_state(x.device) if stochastic else None
        ctx.save_for_backward(x, *params)
        if run is _OUTPUT_UNUSED:  # a checkpoint's recompute that needs only what this function saves
            return x.new_empty(x.shape)
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows <= tile:
            return run(x)
        out = None
        for start in range(0, rows, tile):
            part = run(flat[start:start + tile])
            if out is None:
                out = part.new_empty((rows, part.shape[-1]))
            out[start:start + tile] = part
            del part
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[3]
        need_p = list(ctx.needs_input_grad[4:])
        flat_x = x.reshape(-1, x.shape[-1])
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        rows, tile = flat_x.shape[0], ctx.tile
        grad_x = torch.empty_like(flat_x) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        wanted = [p for p, need in zip(params, need_p) if need]
        with torch.enable_grad(), ctx.autocast(), _rng_restored(ctx.rng, x.device):
            for start in range(0, rows, tile):
                xt = flat_x[start:start + tile].detach().requires_grad_(need_x)
                yt = ctx.run(xt)
                inputs = ([xt] if need_x else []) + wanted
                if not inputs:
                    break
                grads = torch.autograd.grad(yt, inputs, flat_g[start:start + tile], allow_unused=True)
                del yt
                if need_x:
                    grad_x[start:start + tile] = grads[0]
                    grads = grads[1:]
                it = iter(grads)
                for i, need in enumerate(need_p):
                    if not need:
                        continue
                    g = next(it)
                    if g is None:
                        continue
                    sums[i] = g.float() if sums[i] is None else sums[i].add_(g)
                del grads
        param_grads = [None if s is None else s.to(p.dtype) for s, p in zip(sums, params)]
        return (None, None, None, None if grad_x is None else grad_x.view_as(x), *param_grads)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _OUTPUT_UNUSED(x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - a marker, never called
    raise AssertionError("the output of a skipped recomputation was used")


def _in_checkpoint_recompute() -> bool:
    """True while autograd's engine runs a node: a forward running now is a checkpoint's recomputation."""
    return torch._C._current_autograd_node() is not None


def _wrap(module: nn.Module, tile_for: Callable[[torch.Tensor], int], output_unused_in_recompute: bool = False) -> None:
    """Replace `module.forward` (one tensor in, one tensor out) with its token-wise recomputed form.

    `output_unused_in_recompute`: the module's output feeds nothing that saves a tensor for backward (a decoder
    layer's MLP whose output is only added to the residual), so a gradient checkpoint's recomputation of the
    layer, which only rebuilds saved tensors, needs from it nothing but its saved input: it returns an
    uninitialised tensor there instead of running the whole MLP once more (its output is never read: the
    recomputation stops at the last saved tensor, this input, and the residual add saves nothing)."""
    inner = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
            return inner(x, *args, **kwargs)
        params = _trainable(module)
        if not x.requires_grad and not params:
            return inner(x)
        run = _OUTPUT_UNUSED if output_unused_in_recompute and _in_checkpoint_recompute() else inner
        return TokenwiseRecompute.apply(run, tile_for(x), _stochastic(module), x, *params)

    module.forward = forward
    setattr(module, _WRAPPED, inner)


def _decoder(model: nn.Module) -> tuple[nn.Module | None, list[nn.Module]]:
    """(the module holding the decoder layers, the layers): the largest ModuleList of modules that have an
    `mlp` or a norm attribute."""
    parent, best = None, []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) > len(best) and all(
                    hasattr(layer, "mlp") or any(hasattr(layer, n) for n in NORM_ATTRIBUTES) for layer in child):
                parent, best = module, list(child)
    return parent, best


def _plain_mlp(mlp: Any) -> bool:
    """A dense MLP (not a mixture of experts): tensor in, tensor out, token-wise."""
    if not isinstance(mlp, nn.Module):
        return False
    names = {name.split(".")[0] for name, _ in mlp.named_children()}
    return not ({"experts", "router", "gate"} & names) and "moe" not in type(mlp).__name__.lower()


def _wrap_norms(owner: nn.Module, names: tuple[str, ...]) -> int:
    n = 0
    for name in names:
        norm = getattr(owner, name, None)
        if isinstance(norm, nn.Module) and not hasattr(norm, _WRAPPED) and not list(norm.children()):
            _wrap(norm, lambda x: tile_tokens(x.shape[-1], 4, NORM_TILE_BYTES))
            n += 1
    return n


def apply_tokenwise(model: nn.Module, *, tiled_mlp: bool, norms: bool, intermediate_size: int,
                    element_bytes: int = 2) -> dict[str, int]:
    """Wrap the decoder layers' norms (`norms`) and dense MLPs (`tiled_mlp`) of `model` in place; returns how
    many of each were wrapped ({"norms": n, "mlps": m})."""
    counts = {"norms": 0, "mlps": 0}
    tile = tile_tokens(intermediate_size, element_bytes, MLP_TILE_BYTES)
    decoder, layers = _decoder(model)
    for layer in layers:
        if norms:
            counts["norms"] += _wrap_norms(layer, NORM_ATTRIBUTES)
        mlp = getattr(layer, "mlp", None)
        if tiled_mlp and _plain_mlp(mlp) and not hasattr(mlp, _WRAPPED):
            _wrap(mlp, lambda x: tile, output_unused_in_recompute=type(layer).__name__ in RESIDUAL_MLP_LAYERS)
            counts["mlps"] += 1
    if norms and decoder is not None:
        counts["norms"] += _wrap_norms(decoder, ("norm",))  # the final norm, read by the loss
    log.info("token-wise recompute: %d norms, %d MLPs (tiles of %d tokens)", counts["norms"], counts["mlps"], tile)
    return counts


def tiled_mlp_problem(*, method: str, gradient_checkpointing: bool, strategy: str, torch_compile: bool) -> str:
    """Why auto leaves the MLP untiled for this run ('' when auto tiles it)."""
    if method == "full":
        return "full fine-tuning would sum the MLP weights' gradients over tiles in an fp32 buffer of their size"
    if not gradient_checkpointing:
        return "without gradient checkpointing the saved layers, not one recomputed MLP, dominate the peak"
    return recompute_problem(strategy=strategy, torch_compile=torch_compile)


def recompute_problem(*, strategy: str, torch_compile: bool) -> str:
    """Why no token-wise recomputation can run here ('' when it can)."""
    if strategy == "deepspeed":
        return "DeepSpeed ZeRO-3 frees gathered weights after forward, before the recomputation"
    if torch_compile:
        return "torch.compile chooses the saved tensors of the compiled graph itself"
    return ""
