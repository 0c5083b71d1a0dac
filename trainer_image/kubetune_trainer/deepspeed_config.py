"""DeepSpeed config JSON generated from the plan (pure: no torch/deepspeed import)."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.plan import DistributedPlan, TrainingPlan


def deepspeed_config(training: TrainingPlan, distributed: DistributedPlan, precision: str,
                     world_size: int | None = None, pin_memory: bool = True) -> dict[str, Any]:
    """The DeepSpeed config dict for this plan; `precision` is the resolved one (bf16|fp16|fp32).

    The optimizer and LR scheduler are built by the trainer and handed to DeepSpeed as
    client objects, so the config has no "optimizer"/"scheduler" sections and allows a
    non-DeepSpeed optimizer with ZeRO-Offload (``zero_force_ds_cpu_optimizer: false``).
    """
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be resolved to bf16|fp16|fp32, got {precision!r}")
    stage = distributed.zero_stage
    if stage not in (1, 2, 3):
        raise ValueError(f"zeroStage must be 1, 2 or 3 for DeepSpeed, got {stage}")
    if distributed.offload_params and stage != 3:
        raise ValueError("offloadParams needs zeroStage 3")
    world = world_size if world_size is not None else distributed.world_size
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": stage >= 2,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            # Rank 0 gathers full weights for the final adapter/model export.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if distributed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return config
