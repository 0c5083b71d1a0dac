"""GPU-free memory trace of the trainer's real training step (fake tensors, counted storage).

    from kubetune_trainer.memtrace import plan_settings, trace_step
    report = trace_step(plan_settings("lora", micro_batch_size=2, seq_length=2048), config_json_dict)
    print(report.peak_bytes, report.breakdown)

Modules: `counter` (the dispatch mode that counts live storage), `build` (the model from a config, as the
recipe loads it), `attention` (the CUDA attention kernels' saved tensors), `quantized` (bitsandbytes 4-bit on
fake tensors), `cuda_defaults` (foreach optimizers, paged states), `step` (the traced recipe step), `report`.
"""

from kubetune_trainer.memtrace.build import TraceError, UnsupportedModel, resolve_config
from kubetune_trainer.memtrace.report import TraceReport
from kubetune_trainer.memtrace.step import plan_settings, trace_step

__all__ = ["TraceError", "TraceReport", "UnsupportedModel", "plan_settings", "resolve_config", "trace_step"]
