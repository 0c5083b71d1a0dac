"""What a run will cost before it starts (status.estimate) and what it cost (status.accounting.cost). Pure.

Inputs: the preflight's counts (status.preflight: training rows, tokens per epoch), the sized layout (GPU type,
GPUs, processes), the sizer's parameter count (status.plan.estimate.totalParams) and the operator's price table
(`--pricing`, chart value `pricing`: price per GPU-hour per `nvidia.com/gpu.product`, in `--currency`).

- **Steps and tokens** are exact: the trainer's step formula (`kubetune_trainer.recipe.total_optimizer_steps`,
  repeated here because the operator never imports the trainer; a test checks both agree) for the layout's world
  size, and the tokens of every micro-batch those steps process.
- **Time** is an estimate: FLOPs per token (6 x parameters for full fine-tuning, 4 x for LoRA/QLoRA, which compute
  no weight gradients of the frozen base; + 2 x with gradient checkpointing, which repeats the forward) divided by
  the GPUs' dense bf16 tensor peak (datasheet) x MODEL_FLOPS_UTILIZATION. GPU types missing from the peak table,
  and CPU-only layouts, get steps and tokens but no time and no cost.
- **Calibrated time** (`kubetune.throughput`): once runs on the same GPU type (and method) have succeeded in this
  cluster, their measured figures replace the datasheet guess: time = their median seconds outside training +
  FLOPs / (devices x their median achieved FLOP/s per device). This also gives CPU-only layouts and GPU types
  missing from the peak table a time.
- **GPU-hours** = GPUs x time; **cost** = GPU-hours x the GPU type's price (none without a price).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from kubetune.throughput import Calibration

# Model FLOPs utilization assumed for fine-tuning (PaLM's MFU definition): what well-tuned single-node LLM
# fine-tuning reaches on current GPUs is typically 30-45%; the estimate takes the low end.
MODEL_FLOPS_UTILIZATION = 0.35
# Dense bf16/fp16 tensor-core peak, TFLOP/s per GPU, from the vendor datasheets; matched in order against
# nvidia.com/gpu.product (so "H100-PCIE" is tried before "H100", "L40S" before "L40" and "L4").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100-PCIE", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10-", 125.0), ("V100", 125.0), ("T4", 65.0),
)


@dataclasses.dataclass(frozen=True)
class Pricing:
    """Price per GPU-hour by GPU product (`nvidia.com/gpu.product`), and the currency they are in."""

    prices: tuple[tuple[str, float], ...] = ()
    currency: str = "USD"

    def price(self, gpu_type: str) -> float | None:
        """The price per GPU-hour of that GPU type, None when the table has none."""
        return dict(self.prices).get(gpu_type)


def parse_pricing(text: str, currency: str = "USD") -> Pricing:
    """`PRODUCT=PRICE,PRODUCT=PRICE` (the operator flag) or a JSON/YAML mapping (the chart's value)."""
    import yaml

    text = (text or "").strip()
    if not text:
        return Pricing((), currency)
    if text.startswith("{"):
        mapping = yaml.safe_load(text) or {}
    else:
        mapping = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--pricing: {item!r} is not PRODUCT=PRICE")
            mapping[key.strip()] = value
    prices = []
    for key, value in mapping.items():
        price = float(value)
        if price < 0 or not math.isfinite(price):
            raise ValueError(f"--pricing: the price of {key} must be a finite number >= 0, got {value!r}")
        prices.append((str(key), price))
    return Pricing(tuple(sorted(prices)), currency)


def optimizer_steps(train_rows: int, micro_batch: int, grad_accum: int, world: int, epochs: float,
                    max_steps: int) -> int:
    """The trainer's step count (kubetune_trainer.recipe.total_optimizer_steps)."""
    per_rank = math.ceil(train_rows / max(world, 1))
    micro_per_epoch = max(1, math.ceil(per_rank / micro_batch))
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * micro_per_epoch / grad_accum))


def peak_tflops(gpu_type: str) -> float | None:
    """Dense bf16 peak of a GPU product, None when unknown."""
    name = (gpu_type or "").upper()
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def flops_per_token(total_params: int, method: str, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token: 2N forward, 2N backward through activations, 2N weight gradients (full only),
    and a repeated forward under gradient checkpointing."""
    per = 6.0 if method == "full" else 4.0
    if gradient_checkpointing:
        per += 2.0
    return per * total_params


def plan_params(plan: dict[str, Any] | None) -> int:
    """The model's parameter count the sizer recorded (status.plan.estimate.totalParams), 0 when unknown."""
    return int(((plan or {}).get("estimate") or {}).get("totalParams") or 0)


def estimate_status(preflight: dict[str, Any], layout: dict[str, Any], plan: dict[str, Any] | None, spec: Any,
                    pricing: Pricing, calibration: Calibration | None = None) -> dict[str, Any]:
    """status.estimate for the preflight's counts on this layout (status.layout) at these prices; with a
    calibration (this cluster's measured runs on the layout's GPU type), the time comes from it."""
    t = spec.training
    world = max(int(layout.get("pods") or 1) * int(layout.get("procsPerNode") or 1), 1)
    rows = int(preflight.get("trainRows") or preflight.get("trainExamples") or 0)
    steps = optimizer_steps(rows, t.micro_batch_size, t.gradient_accumulation_steps, world, t.epochs, t.max_steps)
    processed = steps * t.gradient_accumulation_steps * t.micro_batch_size * world
    tokens = round(int(preflight.get("tokensPerEpoch") or 0) * processed / rows) if rows else 0
    gpu_type, gpus = str(layout.get("gpuType") or ""), int(layout.get("totalGpus") or 0)
    out: dict[str, Any] = {"steps": steps, "tokens": tokens, "world": world, "gpuType": gpu_type, "gpus": gpus,
                           "currency": pricing.currency}
    params = plan_params(plan)
    peak = peak_tflops(gpu_type)
    basis = []
    fpt = flops_per_token(params, spec.method, t.gradient_checkpointing)
    seconds: float | None = None
    if calibration is not None and params > 0:
        rate = (gpus if gpus > 0 else world) * calibration.flops_per_device / fpt
        seconds = calibration.overhead_seconds + tokens / rate
        basis.append(f"{params / 1e9:.3g}B parameters; {calibration.describe()}")
    elif gpus > 0 and peak is not None and params > 0:
        rate = gpus * peak * 1e12 * MODEL_FLOPS_UTILIZATION / fpt
        seconds = tokens / rate
        basis.append(f"{params / 1e9:.2f}B parameters at {MODEL_FLOPS_UTILIZATION:.0%} of {peak:g} TFLOP/s per GPU "
                     "(datasheet; no finished run on this GPU type to calibrate from yet)")
    elif gpus > 0:
        basis.append(f"no time estimate: {'unknown peak for ' + gpu_type if peak is None else 'unknown model size'}")
    if seconds is not None:
        out.update(tokensPerSecond=round(rate, 1), etaSeconds=round(seconds, 1),
                   gpuHours=round(gpus * seconds / 3600.0, 4))
    if gpus == 0:
        out["gpuHours"], out["cost"] = 0.0, 0.0
        basis.append("CPU-only layout: no GPU time")
    elif seconds is not None:
        price = pricing.price(gpu_type)
        if price is not None:
            out.update(pricePerGpuHour=price, cost=round(out["gpuHours"] * price, 4))
        else:
            basis.append(f"no price for {gpu_type}")
    out["basis"] = "; ".join(basis)
    out["display"] = estimate_display(out)
    return out


def estimate_display(est: dict[str, Any]) -> str:
    """One line: steps, tokens, GPU-hours and cost."""
    def num(x: float) -> str:
        return f"{x:.2f}" if x >= 1 else f"{x:.2g}"

    text = f"{est['steps']} steps, {est['tokens']:,} tokens"
    if est.get("etaSeconds") is not None:
        text += f", about {duration_text(float(est['etaSeconds']))}"
    if est.get("gpuHours") is not None and est.get("gpus"):
        text += f", {num(est['gpuHours'])} GPU-hours on {est['gpus']} x {est['gpuType']}"
    if est.get("cost") is not None and est.get("gpus"):
        text += f", about {num(est['cost'])} {est['currency']}"
    return text


def duration_text(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
