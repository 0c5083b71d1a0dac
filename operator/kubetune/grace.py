"""How long a trainer pod gets between SIGTERM and SIGKILL (terminationGracePeriodSeconds).

On SIGTERM the trainer finishes the optimizer step in flight, writes a checkpoint of that step and exits
(docs/contracts.md §5). The grace period therefore covers the step in flight plus writing one checkpoint, whose
size follows from the sizing estimate in the plan: the trainable parameters in fp32 plus AdamW's two fp32
moments per trainable parameter.
"""

from __future__ import annotations

import math
from typing import Any

CHECKPOINT_BYTES_PER_TRAINABLE_PARAM = 4 + 8  # fp32 weights + AdamW exp_avg and exp_avg_sq (fp32)


def checkpoint_bytes(plan_status: dict[str, Any] | None) -> int:
    """Bytes of one resumable checkpoint for the sized plan (0 when the plan carries no estimate)."""
    estimate = (plan_status or {}).get("estimate") or {}
    trainable = int(estimate.get("trainableParams") or 0)
    return trainable * CHECKPOINT_BYTES_PER_TRAINABLE_PARAM


def termination_grace_seconds(plan_status: dict[str, Any] | None, *, base_seconds: int,
                              write_bytes_per_second: int) -> int:
    """`base_seconds` (the step in flight, shutdown) plus the time to write one checkpoint at the assumed rate."""
    rate = max(1, int(write_bytes_per_second))
    return int(base_seconds) + math.ceil(checkpoint_bytes(plan_status) / rate)
