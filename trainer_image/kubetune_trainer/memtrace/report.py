"""The result of a memory trace: peak bytes, what they are, and when they happen (JSON and text forms)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024 ** 3

BREAKDOWN_LABELS = {"weights": "weights", "gradients": "gradients", "optimizerStates": "optimizer states",
                    "activations": "activations + temporaries"}


@dataclass
class TraceReport:
    """Traced GPU memory of one training step of the plan's recipe on one process (bytes unless named otherwise).

    `peak_bytes` is the high-water mark of live tensor storage as PyTorch's caching allocator would be asked
    for it (no CUDA context, no allocator rounding or fragmentation, no NCCL buffers); `breakdown` splits it
    and adds up to it. Paged optimizer states live in CUDA unified memory, outside the allocator, and are
    reported apart in `paged_optimizer_bytes`; activations offloaded to host memory in
    `host_activation_bytes`, an input-embedding table kept in host memory in `host_weight_bytes`.
    """

    model: str
    model_type: str
    method: str
    precision: str
    micro_batch_size: int
    seq_length: int
    gradient_accumulation_steps: int
    micro_steps_traced: int
    optimizer_steps_traced: int
    gradient_checkpointing: bool
    packing: bool
    padded_batch: bool
    optimizer: str
    attention: str
    total_params: int
    trainable_params: int
    weights_bytes: int
    peak_bytes: int
    breakdown: dict[str, int]
    paged_optimizer_bytes: int
    peak_phase: str
    peak_op: str
    peak_where: str
    largest_at_peak: list[dict[str, Any]] = field(default_factory=list)
    host_activation_bytes: int = 0  # activation offloading: the most saved activations in host memory at once
    host_weight_bytes: int = 0  # training.embeddingsOnHost: the input-embedding table in host memory
    ops: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        """The peak in GiB."""
        return self.peak_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        """camelCase JSON form."""
        return {_camel(k): v for k, v in asdict(self).items()}

    def format_text(self, indent: str = "  ") -> str:
        """A short human-readable table of the peak and its breakdown."""
        lines = [f"{indent}traced peak {self.peak_bytes / GIB:.2f} GiB ({self.peak_bytes:,} bytes) at "
                 f"{self.peak_phase}, {self.peak_op}" + (f" in {self.peak_where}" if self.peak_where else "")]
        for key, label in BREAKDOWN_LABELS.items():
            lines.append(f"{indent}  {label:<26} {self.breakdown.get(key, 0) / GIB:>9.2f} GiB")
        if self.paged_optimizer_bytes:
            lines.append(f"{indent}  {'paged optimizer states':<26} {self.paged_optimizer_bytes / GIB:>9.2f} GiB "
                         "(unified memory, outside the allocator peak)")
        if self.host_activation_bytes:
            lines.append(f"{indent}  {'offloaded activations':<26} {self.host_activation_bytes / GIB:>9.2f} GiB "
                         "(host memory, outside the GPU peak)")
        if self.host_weight_bytes:
            lines.append(f"{indent}  {'input embeddings':<26} {self.host_weight_bytes / GIB:>9.2f} GiB "
                         "(host memory, outside the GPU peak)")
        lines.append(f"{indent}  parameters {self.total_params:,} (trainable {self.trainable_params:,}); "
                     f"attention {self.attention}; {self.micro_steps_traced} micro-step(s) x "
                     f"{self.optimizer_steps_traced} optimizer step(s) traced in {self.seconds:.1f} s")
        for note in self.notes:
            lines.append(f"{indent}  note: {note}")
        return "\n".join(lines)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
