"""Optimizers for full fine-tuning with bf16 weights (no fp32 master copy) that do not lose small updates.

A bf16 weight has 8 significant bits: an update below half a unit in the last place (|w| * 2^-9) rounds
back to the old value, so plain bf16 AdamW silently stops learning once lr * step is small against the
weight. Two update rules avoid that without an fp32 copy of the weights:

- ``adamw`` / ``sgd``: torch-optimi's AdamW / SGD with Kahan summation (a bf16 compensation buffer keeps
  what rounding dropped and adds it back on the next step). optimi is plain PyTorch (foreach kernels), so it
  runs on CPU and CUDA with any torch >= 2.2. torchao's bf16 stochastic-rounding AdamW was the alternative;
  it runs through ``torch.compile`` per parameter shape, which needs a compiler on the node and recompiles for
  every shape (minutes on CPU), so it is not used.
- ``adamw_8bit`` / ``paged_adamw_8bit`` / ``paged_adamw_32bit``: bitsandbytes' optimizers, whose kernels round
  the updated bf16 weight to nearest. Here each parameter is updated in fp32 (a temporary copy of a slice of
  at most 16M elements of the parameter and its gradient) and written back to bf16 with stochastic rounding:
  unbiased, so small updates survive in expectation, with no persistent extra memory. The optimizer states
  stay 8-bit (or 32-bit) exactly as bitsandbytes keeps them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
BETAS = (0.9, 0.999)
SLICE_ELEMENTS = 1 << 24  # fp32 temporaries of the stochastic-rounding update: 2 x 64 MiB at most
STATE_BLOCK = 256  # bitsandbytes' 8-bit optimizer states keep one absmax per 256 elements
EPS = 1e-8


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 → bf16 rounding up or down with probability proportional to the distance (unbiased)."""
    bits = value.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise) & -65536  # keep the upper 16 bits: exactly representable in bf16
    return rounded.view(torch.float32).to(torch.bfloat16)


def _rounding_generator(device: torch.device, step: int, gindex: int, pindex: int, start: int) -> torch.Generator:
    """The rounding noise is a function of (step, parameter, slice) only: the same whatever order parameters are
    stepped in (optimizer in backward or not) and after a resume, without touching the global RNG."""
    seed = ((step * 1_000_003 + gindex) * 1_000_033 + pindex) * 1_000_037 + start // SLICE_ELEMENTS
    return torch.Generator(device=device).manual_seed(seed % (2 ** 63))


def _stochastic_rounding_class(base: type) -> type:
    """A subclass of bitsandbytes optimizer `base` that updates bf16 parameters in fp32 with stochastic rounding.

    The fp32 copy is made for SLICE_ELEMENTS of a parameter at a time (with the matching slices of the optimizer
    states and of their per-256-element absmax), so the temporary stays small even for an embedding matrix.
    """

    def update_step(self, group, p, gindex, pindex):  # noqa: ANN001 - bitsandbytes' signature
        if p.dtype != torch.bfloat16:
            return base.update_step(self, group, p, gindex, pindex)
        state = self.state[p]
        saved = dict(state)
        weight, grad = p.data, p.grad
        flat_w, flat_g = weight.contiguous().view(-1), grad.contiguous().view(-1)
        n = flat_w.numel()
        try:
            for start in range(0, n, SLICE_ELEMENTS):
                end = min(n, start + SLICE_ELEMENTS)
                state["step"] = saved["step"]  # bitsandbytes counts one step per call
                for key in ("state1", "state2"):
                    if isinstance(saved.get(key), torch.Tensor):
                        state[key] = saved[key].view(-1)[start:end]
                for key in ("absmax1", "absmax2"):
                    if isinstance(saved.get(key), torch.Tensor):
                        state[key] = saved[key][start // STATE_BLOCK:-(-end // STATE_BLOCK)]
                p.data = flat_w[start:end].float()
                p.grad = flat_g[start:end].float()
                base.update_step(self, group, p, gindex, pindex)
                flat_w[start:end].copy_(stochastic_round_to_bf16(p.data, _rounding_generator(
                    p.device, int(state["step"]), gindex, pindex, start)))
        finally:
            step = state["step"]
            state.update(saved)
            state["step"] = step
            p.data, p.grad = weight, grad
        if not weight.is_contiguous():  # flat_w was a copy: write it back
            weight.copy_(flat_w.view_as(weight))
        return None

    return type(f"StochasticRounding{base.__name__}", (base,), {"update_step": update_step})


def bnb_optimizer(name: str, params: Iterable, lr: float, *, bf16_weights: bool):
    """bitsandbytes AdamW8bit / PagedAdamW8bit / PagedAdamW32bit; with `bf16_weights`, stochastic rounding."""
    import bitsandbytes as bnb

    base = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    cls = _stochastic_rounding_class(base) if bf16_weights else base
    return cls(list(params), lr=lr, betas=BETAS, eps=EPS)


def compensated_optimizer(name: str, params: Iterable, lr: float, weight_decay: float, *,
                          gradient_release: bool = False):
    """torch-optimi AdamW (decoupled weight decay, as torch's) or SGD (momentum 0.9, torch's initialisation)
    with Kahan summation for bf16 weights. `gradient_release`: stepped one parameter at a time during backward
    (optimi then counts steps per parameter instead of per group)."""
    import optimi

    params = list(params)
    # optimi picks its Triton kernels whenever triton is importable, also for CPU tensors, where they fail.
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    triton = None if tensors and all(t.is_cuda for t in tensors) else False
    if name == "adamw":
        return optimi.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, kahan_sum=True,
                            triton=triton, gradient_release=gradient_release)
    if name == "sgd":
        return optimi.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, torch_init=True, kahan_sum=True,
                          triton=triton, gradient_release=gradient_release)
    raise ValueError(f"no compensated optimizer for {name!r}")


def parameter_step(optimizer: Any) -> Callable[[torch.Tensor], None]:
    """A function that steps `optimizer` for one parameter, called when that parameter holds the only gradient.

    torch's and bitsandbytes' optimizers keep a step count per parameter, so a plain step() updates just that
    one; optimi counts per group unless built with gradient_release, and then steps one parameter by argument.
    """
    if type(optimizer).__module__.split(".")[0] == "optimi":
        if not all(group.get("gradient_release") for group in optimizer.param_groups):
            raise ValueError("an optimi optimizer stepped in backward must be built with gradient_release=True")
        return lambda param: optimizer.step(param=param)
    return lambda param: optimizer.step()


def optimizer_description(optimizer: Any) -> str:
    """Module-qualified class name of an optimizer (recorded in metrics.json)."""
    cls = type(optimizer)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"
