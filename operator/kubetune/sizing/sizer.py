"""Choose GPU type, GPUs per pod, pods and ZeRO stage/offload for a FineTuneJob (docs/contracts.md §8).

Pure: typed FineTuneJob spec + Fleet -> SizingDecision. The search and its order of preference are described
in docs/sizing.md ("Sizing").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from kubetune.api import DistributedSpec, FineTuneJobSpec, ResourcesSpec

from .architecture import Architecture, ArchitectureError
from .catalog import resolve_architecture
from .estimator import GiB, MemoryEstimate, Parallelism, TrainingSetup, estimate_memory, gib
from .fleet import PRODUCT_LABEL, Fleet, GpuPool, parse_quantity_bytes
from .training_setup import setup_from_spec

DEFAULT_HEADROOM = 0.10  # keep 10% of each GPU free: estimate error, allocator spikes, other processes
CPU_AUTO_MAX_PARAMS = 100_000_000  # with no GPU nodes, only tiny models run on CPU without asking
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


@dataclass
class SizingDecision:
    """The sizer's answer: where and how the job runs, or why it cannot."""

    fits: bool
    gpu_product: str = ""
    gpus_per_pod: int = 0
    pods: int = 0
    gpu_memory_bytes: int = 0
    parallelism: Parallelism = field(default_factory=Parallelism)  # resolved strategy over total_gpus
    node_selector: dict[str, str] = field(default_factory=dict)
    message: str = ""
    suggestion: str = ""
    suggestion_patch: dict[str, Any] = field(default_factory=dict)  # spec changes that make it fit
    reason: str = ""
    device: str = "gpu"  # gpu | cpu
    estimate: MemoryEstimate | None = None
    headroom: float = DEFAULT_HEADROOM
    model: str = ""
    model_source: str = ""
    method: str = ""
    free_now: bool = True  # False when the cluster's occupancy is known and the chosen GPUs are all taken

    @property
    def total_gpus(self) -> int:
        """GPUs across all pods."""
        return self.gpus_per_pod * self.pods

    @property
    def distributed(self) -> dict[str, Any]:
        """The resolved strategy as the plan/status block: strategy, zeroStage, offloadOptimizer, offloadParams."""
        par = self.parallelism
        return {"strategy": par.strategy, "zeroStage": par.zero, "offloadOptimizer": par.offload_optimizer,
                "offloadParams": par.offload_params}

    @property
    def usable_bytes(self) -> int:
        """GPU memory the estimate may use after the headroom margin."""
        return int(self.gpu_memory_bytes * (1 - self.headroom))

    def to_status(self) -> dict[str, Any]:
        """camelCase dict for FineTuneJob status.plan (bytes plus GiB for people)."""
        out: dict[str, Any] = {
            "fits": self.fits, "device": self.device, "gpuType": self.gpu_product,
            "gpusPerPod": self.gpus_per_pod, "pods": self.pods, "totalGpus": self.total_gpus,
            "gpuMemoryBytes": self.gpu_memory_bytes, "gpuMemoryGiB": gib(self.gpu_memory_bytes),
            "headroom": self.headroom, "distributed": dict(self.distributed),
            "nodeSelector": dict(self.node_selector), "model": self.model, "modelSource": self.model_source,
            "method": self.method, "reason": self.reason, "message": self.message,
            "suggestion": self.suggestion,
        }
        if self.estimate is not None:
            e = self.estimate
            breakdown = e.breakdown()
            out["estimate"] = {
                # analytic: kubetune.sizing.estimator's formulas (kept within +5%/-2% of the trainer's traced
                # step by bench/estimate_vs_trace.py); `kubetune estimate --trace` traces the real step offline
                "source": "analytic",
                "perGpuBytes": e.total, "perGpuGiB": gib(e.total),
                "usableBytes": self.usable_bytes, "usableGiB": gib(self.usable_bytes),
                "totalParams": e.total_params, "trainableParams": e.trainable_params,
                "hostOffloadBytes": e.host_offload, "hostOffloadGiB": gib(e.host_offload),
                "breakdownBytes": breakdown, "breakdownGiB": {k: gib(v) for k, v in breakdown.items()},
                "notes": list(e.notes),
            }
        return out


@dataclass(frozen=True)
class _Candidate:
    pool: GpuPool
    gpus_per_pod: int
    pods: int
    par: Parallelism
    tier: int  # 0 no offload, 1 optimizer offload, 2 parameter offload
    estimate: MemoryEstimate

    @property
    def n(self) -> int:
        return self.gpus_per_pod * self.pods

    host_limit: int = 0  # host RAM per pod available for offload (0 = unknown, not checked)

    def host_need(self) -> int:
        """Host RAM a pod needs for offloaded tensors (all its ranks)."""
        return self.estimate.host_offload * self.gpus_per_pod

    def fits(self, headroom: float) -> bool:
        gpu_ok = self.estimate.total <= int(self.pool.memory_bytes * (1 - headroom))
        host_ok = not self.host_limit or self.host_need() <= int(self.host_limit * (1 - headroom))
        return gpu_ok and host_ok

    def describe(self) -> str:
        return f"{self.pods} pod(s) x {self.gpus_per_pod} {self.pool.product}, {self.par.describe()}"


# ------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------

def _strategies(dist: DistributedSpec, n: int, method: str = "lora") -> Iterator[tuple[int, Parallelism]]:
    """(tier, Parallelism) options for n GPUs in the order the sizer prefers them.

    For QLoRA the automatic choice stops at ZeRO-2: sharding 4-bit weights with ZeRO-3 needs
    bnb_4bit_quant_storage and offloading them is not supported; an explicit ZeRO-3 is honoured.
    """
    strategy = dist.strategy
    stage = dist.zero_stage
    off_opt = dist.offload_optimizer
    off_par = dist.offload_params
    tier = 2 if off_par else 1 if off_opt else 0
    if strategy == "ddp":
        yield 0, Parallelism("ddp" if n > 1 else "none", world_size=n)
        return
    if strategy == "deepspeed" or (strategy == "auto" and (stage or off_opt or off_par)):
        stage = stage or (3 if off_par else 2)
        if off_par and stage != 3:
            return
        yield tier, Parallelism("deepspeed", stage, off_opt, off_par, n)
        return
    # auto: no offload first (single process / DDP, then ZeRO-2, ZeRO-3), then offload
    if n == 1:
        yield 0, Parallelism("none", world_size=1)
    else:
        yield 0, Parallelism("ddp", world_size=n)
        yield 0, Parallelism("deepspeed", 2, world_size=n)
        if method != "qlora":
            yield 0, Parallelism("deepspeed", 3, world_size=n)
    yield 1, Parallelism("deepspeed", 2, True, False, n)
    if method == "qlora":
        return
    yield 1, Parallelism("deepspeed", 3, True, False, n)
    yield 2, Parallelism("deepspeed", 3, True, True, n)


def _layouts(pool: GpuPool, res: ResourcesSpec) -> Iterator[tuple[int, int]]:
    """(gpus_per_pod, pods) the pool can host, fewest GPUs first; honours resources pins."""
    g_pin, p_pin, max_gpus = res.gpus_per_pod, res.pods, res.max_gpus
    options = []
    for g in ([g_pin] if g_pin else range(1, pool.gpus_per_node + 1)):
        available = pool.nodes_with(g)
        if available == 0:
            continue
        for pods in ([p_pin] if p_pin else range(1, available + 1)):
            if pods > available:
                continue
            if pods > 1 and not g_pin and g != pool.gpus_per_node:
                continue  # span nodes only with whole nodes
            if max_gpus and g * pods > max_gpus:
                continue
            options.append((g * pods, pods, g))
    for _, pods, g in sorted(options):
        yield g, pods


# ------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SearchResult:
    """What the search over the fleet found, including why offload layouts were turned down."""

    best: _Candidate | None  # the preferred fitting candidate
    closest: _Candidate | None  # the candidate with the smallest GPU need relative to its GPU
    host_note: str = ""  # set when offload would fit the GPUs but not the pods' host RAM
    occupancy_note: str = ""  # set when free capacity changed the choice, or the choice has none free now


def _search(arch: Architecture, spec: FineTuneJobSpec, fleet: Fleet, headroom: float) -> _SearchResult:
    """The best fitting candidate and the smallest-need candidate over the fleet."""
    res = spec.resources
    dist = spec.distributed
    pinned = res.gpu_type
    pools = [p for p in fleet.pools if not pinned or p.product.lower() == pinned.lower()]
    best: _Candidate | None = None
    cheapest: _Candidate | None = None  # the best ignoring free capacity
    closest: _Candidate | None = None
    host_blocked: list[_Candidate] = []
    setups: dict[bool, TrainingSetup] = {}
    for pool in pools:
        setup = setups.get(pool.bf16) or setups.setdefault(pool.bf16, setup_from_spec(spec, bf16_capable=pool.bf16))
        found_in_pool: dict[int, bool] = {}
        pod_limit = parse_quantity_bytes(res.memory)
        host_limit = min(x for x in (pool.host_memory_bytes, pod_limit) if x) if (pool.host_memory_bytes or pod_limit) else 0
        for g, pods in _layouts(pool, res):
            n = g * pods
            for tier, par in _strategies(dist, n, spec.method):
                if found_in_pool.get(tier):
                    continue  # a smaller layout of this pool already fits in this tier
                cand = _Candidate(pool, g, pods, par, tier, estimate_memory(arch, setup, par), host_limit)
                host_ok = not cand.host_limit or cand.host_need() <= int(cand.host_limit * (1 - headroom))
                if host_ok and (closest is None or _need_ratio(cand) < _need_ratio(closest)):
                    closest = cand
                if not host_ok and cand.estimate.total <= int(pool.memory_bytes * (1 - headroom)):
                    host_blocked.append(cand)
                if cand.fits(headroom):
                    found_in_pool[tier] = True
                    if best is None or _preference(cand, fleet) < _preference(best, fleet):
                        best = cand
                    if cheapest is None or _rank(cand) < _rank(cheapest):
                        cheapest = cand
    note = ""
    if best is None and host_blocked:
        h = min(host_blocked, key=lambda c: c.host_need() / c.host_limit)
        note = (f"with CPU offload ({h.describe()}) the GPUs would suffice but each pod needs "
                f"{gib(h.host_need())} GiB of host RAM and only {gib(h.host_limit)} GiB is allocatable")
    return _SearchResult(best, closest, note, _occupancy_note(best, cheapest, fleet))


def _placeable(c: _Candidate) -> bool:
    return c.pool.placeable_now(c.gpus_per_pod, c.pods)


def _preference(c: _Candidate, fleet: Fleet) -> tuple:
    """_rank, except that with the cluster's occupancy known a layout whose GPUs are free now comes before one
    that would queue (within the same offload tier: free GPUs never buy a slower, offloaded run)."""
    rank = _rank(c)
    if not fleet.occupancy_known:
        return rank
    return (rank[0], 0 if _placeable(c) else 1, *rank[1:])


def _occupancy_note(best: _Candidate | None, cheapest: _Candidate | None, fleet: Fleet) -> str:
    """Why free capacity moved the choice away from the cheapest layout, or that the choice must wait."""
    if best is None or cheapest is None or not fleet.occupancy_known:
        return ""
    if best is not cheapest and best.pool is not cheapest.pool:
        why = ("its pods stayed unschedulable" if cheapest.pool.avoid
               else f"{cheapest.n} GPU(s) are needed and {cheapest.pool.describe_free()}")
        return (f"chose {best.n} x {best.pool.product} over {cheapest.n} x {cheapest.pool.product}: {why}; "
                f"{best.pool.describe_free()}")
    if not _placeable(best):
        return (f"the pods will wait for free GPUs: {best.n} needed and {best.pool.describe_free()}; "
                "no other GPU type that fits has them free")
    return ""


def _need_ratio(c: _Candidate) -> float:
    return c.estimate.total / c.pool.memory_bytes


_STRATEGY_RANK = {("none", 0): 0, ("ddp", 0): 1, ("deepspeed", 1): 2, ("deepspeed", 2): 3, ("deepspeed", 3): 4}


# Relative price class for GPUs of (nearly) the same memory: the older generation is preferred.
_GENERATION = (("B200", 8), ("H200", 7), ("H100", 6), ("GH200", 7), ("A100", 5), ("L40", 4), ("A6000", 4),
               ("A40", 4), ("L4", 3), ("A10", 3), ("V100", 2), ("T4", 1))


def gpu_generation(product: str) -> int:
    """Price class used to break ties between GPU types with the same memory (unknown: 6)."""
    up = product.upper()
    for tag, rank in _GENERATION:
        if tag in up:
            return rank
    return 6


def _rank(c: _Candidate) -> tuple:
    """Preference: no offload before offload, fewest GPUs, smallest GPU memory (in 4 GiB steps, so
    79.6 and 80 GiB cards tie), older generation, simplest strategy, fewest pods."""
    bucket = round(c.pool.memory_mib / 4096)
    return (c.tier, c.n, bucket, gpu_generation(c.pool.product), c.pool.memory_mib,
            _STRATEGY_RANK.get((c.par.strategy, c.par.zero), 9), c.pods, c.pool.product)


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------

def size_job(spec: FineTuneJobSpec, fleet: Fleet, headroom: float = DEFAULT_HEADROOM,
             config: Mapping[str, Any] | None = None, suggest: bool = True) -> SizingDecision:
    """Size a typed FineTuneJob spec (defaults from kubetune.api) against a fleet (docs/contracts.md §8).

    `config` is the model's config.json when the caller has it (it overrides the catalog; inline
    hints still win). Raises ArchitectureError only when the model cannot be resolved and the job
    is not a CPU run.
    """
    method = spec.method
    res = spec.resources
    try:
        arch: Architecture | None = resolve_architecture(spec.model, config)
    except ArchitectureError:
        if _cpu_requested(res) or (not fleet.has_gpus and _no_gpu_pins(res)):
            arch = None
        else:
            raise
    if _cpu_requested(res) or (not fleet.has_gpus and _no_gpu_pins(res)):
        return _size_cpu(spec, fleet, arch, headroom)
    assert arch is not None
    base = dict(model=arch.name, model_source=arch.source, method=method, headroom=headroom)
    what = f"{METHOD_NAMES.get(method, method)} of {arch.name}"
    pinned = res.gpu_type
    if pinned and fleet.pool(pinned) is None:
        decision = SizingDecision(fits=False, **base, reason=f"pinned gpuType {pinned} is not in the cluster",
                                  message=f"spec.resources.gpuType {pinned} is not in the cluster "
                                          f"(GPU pools: {fleet.describe()})")
        return _with_suggestion(decision, spec, fleet, headroom, config) if suggest else decision
    if not fleet.has_gpus:
        one = estimate_memory(arch, setup_from_spec(spec), Parallelism())
        decision = SizingDecision(
            fits=False, **base, estimate=one,
            reason=f"no GPU nodes in the cluster; {what} needs {gib(one.total)} GiB on one GPU",
            message=(f"the cluster has no schedulable GPU nodes ({fleet.cpu_nodes} CPU node(s)); {what} needs "
                     f"{gib(one.total)} GiB on a single GPU. Add GPU nodes, or for a tiny model run on CPU by "
                     "setting resources.gpusPerPod: 0, resources.pods: 1 and resources.cpu"))
        return decision
    found = _search(arch, spec, fleet, headroom)
    best, closest = found.best, found.closest
    if best is not None:
        e = best.estimate
        usable = best.pool.memory_bytes * (1 - headroom)
        reason = (f"{what} needs {gib(e.total)} GiB per GPU with {best.par.describe()}; "
                  f"fits {best.n} x {best.pool.product} ({gib(usable)} GiB usable each)")
        occupancy = f". Free GPUs: {found.occupancy_note}" if found.occupancy_note else ""
        return SizingDecision(
            fits=True, **base, gpu_product=best.pool.product, gpus_per_pod=best.gpus_per_pod, pods=best.pods,
            gpu_memory_bytes=best.pool.memory_bytes, parallelism=best.par,
            node_selector={PRODUCT_LABEL: best.pool.product}, estimate=e, reason=reason,
            message=f"{reason}{occupancy}. Breakdown: {_brief(e)}",
            free_now=not fleet.occupancy_known or _placeable(best),
        )
    largest = fleet.largest()
    assert largest is not None
    pins = _describe_pins(spec)
    if closest is not None:
        c = closest
        usable = c.pool.memory_bytes * (1 - headroom)
        reason = (f"{what} does not fit: needs at least {gib(c.estimate.total)} GiB per GPU "
                  f"({c.describe()}) but {c.pool.product} has {gib(c.pool.memory_bytes)} GiB "
                  f"({gib(usable)} GiB usable with {int(headroom * 100)}% headroom)")
        message = (f"{reason}{pins}. Largest GPU in the cluster: {largest.product} with "
                   f"{gib(largest.memory_bytes)} GiB. Breakdown of the closest layout: {_brief(c.estimate)}")
        est = c.estimate
    else:
        reason = f"{what} does not fit: no layout of the cluster's GPUs satisfies the pins"
        message = f"{reason}{pins}. GPU pools: {fleet.describe()}"
        est = None
    if found.host_note:
        message += f". Note: {found.host_note}"
    decision = SizingDecision(fits=False, **base, estimate=est, reason=reason, message=message,
                              gpu_memory_bytes=closest.pool.memory_bytes if closest else 0)
    return _with_suggestion(decision, spec, fleet, headroom, config) if suggest else decision


def _brief(e: MemoryEstimate) -> str:
    parts = [f"{k} {gib(v)}" for k, v in e.breakdown().items() if v and k != "total"]
    return ", ".join(parts) + f" (GiB; total {gib(e.total)})"


def _describe_pins(spec: FineTuneJobSpec) -> str:
    res = spec.resources.dump()
    pins = [f"{k}={res[k]}" for k in ("gpuType", "gpusPerPod", "pods", "maxGpus") if res.get(k)]
    dist = spec.distributed
    if _dist_pinned(dist):
        pins.append(f"distributed={dist.strategy}/zero{dist.zero_stage}")
    return f" (pinned: {', '.join(pins)})" if pins else ""


def _dist_pinned(dist: DistributedSpec) -> bool:
    """True when the spec fixes anything of the distributed strategy."""
    return dist.strategy != "auto" or bool(dist.zero_stage) or dist.offload_optimizer or dist.offload_params


# ------------------------------------------------------------------------------------------
# CPU runs
# ------------------------------------------------------------------------------------------

def _no_gpu_pins(res: ResourcesSpec) -> bool:
    return not res.gpu_type and not res.gpus_per_pod and not res.max_gpus


def _cpu_requested(res: ResourcesSpec) -> bool:
    """Explicit CPU run: gpusPerPod 0 with pods and cpu set (the CRD's documented CPU-only form)."""
    return _no_gpu_pins(res) and res.pods > 0 and bool(res.cpu)


def parse_memory_quantity(text: str) -> int:
    """Kubernetes memory quantity ('64Gi', '512Mi', '8G', '1000') -> bytes; 0 for empty."""
    return parse_quantity_bytes(text)


def _size_cpu(spec: FineTuneJobSpec, fleet: Fleet, arch: Architecture | None, headroom: float) -> SizingDecision:
    """CPU run: explicit (gpusPerPod 0 + pods + cpu) or implicit (no GPU nodes, tiny model)."""
    res = spec.resources
    method = spec.method
    explicit = _cpu_requested(res)
    pods = max(res.pods, 1)
    base = dict(device="cpu", pods=pods, gpus_per_pod=0, method=method, headroom=headroom,
                model=arch.name if arch else spec.model.uri,
                model_source=arch.source if arch else "unknown")
    if arch is None:
        return SizingDecision(fits=True, **base,
                              reason="CPU run; model architecture unknown, memory not estimated",
                              message="CPU run (no GPUs requested); the model is not in the catalog and has no "
                                      "architecture hints, so its memory was not estimated")
    # CPU training runs in fp32 (no bf16 autocast on most CPUs)
    est = estimate_memory(arch, setup_from_spec(spec, precision="fp32"), Parallelism())
    need = est.reserved  # no CUDA context on CPU
    limit = parse_memory_quantity(res.memory)
    if not explicit and est.total_params > CPU_AUTO_MAX_PARAMS:
        return SizingDecision(
            fits=False, **{**base, "device": "gpu", "pods": 0}, estimate=est,
            reason=f"no GPU nodes in the cluster and {arch.name} is not a tiny model",
            message=(f"the cluster has no schedulable GPU nodes; {arch.name} ({est.total_params / 1e9:.2f}B parameters) "
                     f"needs {gib(estimate_memory(arch, setup_from_spec(spec), Parallelism()).total)} GiB on one GPU. "
                     "Add GPU nodes, or force a CPU run with resources.gpusPerPod: 0, resources.pods: 1, resources.cpu"))
    if limit and need > limit:
        return SizingDecision(
            fits=False, **base, estimate=est,
            reason=f"CPU run needs {gib(need)} GiB of RAM but resources.memory is {gib(limit)} GiB",
            message=f"CPU run of {arch.name}: needs {gib(need)} GiB of RAM per pod (fp32) but resources.memory "
                    f"is {res.memory}; raise resources.memory to at least {gib(need * 1.1)}Gi",
            suggestion=f"set resources.memory to {int(need * 1.1 / GiB) + 1}Gi",
            suggestion_patch={"resources": {"memory": f"{int(need * 1.1 / GiB) + 1}Gi"}})
    why = "explicit CPU request (gpusPerPod 0, pods, cpu)" if explicit else "no GPU nodes and a tiny model"
    return SizingDecision(fits=True, **base, estimate=est,
                          reason=f"CPU run ({why}); needs about {gib(need)} GiB of RAM per pod",
                          message=f"CPU run ({why}) of {arch.name}: about {gib(need)} GiB of RAM per pod in fp32")


# ------------------------------------------------------------------------------------------
# suggestions: re-run the sizer on cheaper variants of the spec
# ------------------------------------------------------------------------------------------

def _deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _alternatives(spec: FineTuneJobSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """(description, spec patch) from least to most disruptive."""
    res = spec.resources
    training = spec.training
    method = spec.method
    free_res = {"gpuType": "", "gpusPerPod": 0, "pods": 0, "maxGpus": 0}
    auto_dist = {"strategy": "auto", "zeroStage": 0, "offloadOptimizer": False, "offloadParams": False}
    pinned_res = bool(res.gpu_type or res.gpus_per_pod or res.pods or res.max_gpus)
    pinned_dist = _dist_pinned(spec.distributed)
    if pinned_dist:
        yield "let the sizer choose the distributed strategy (distributed.strategy: auto)", {"distributed": auto_dist}
    if pinned_res:
        yield "remove the spec.resources GPU pins", {"resources": free_res}
    if pinned_res and pinned_dist:
        yield "remove the spec.resources GPU pins and set distributed.strategy: auto", {"resources": free_res, "distributed": auto_dist}
    relax = {"resources": free_res, "distributed": auto_dist} if (pinned_res or pinned_dist) else {}
    if not training.gradient_checkpointing:
        yield "enable training.gradientCheckpointing", _deep_merge(relax, {"training": {"gradientCheckpointing": True}})
    smaller = _smaller_micro_batch(training.micro_batch_size, training.gradient_accumulation_steps)
    if smaller is not None:
        mb, ga = smaller
        yield (f"set training.microBatchSize: {mb} and gradientAccumulationSteps: {ga} (same effective batch)",
               _deep_merge(relax, {"training": {"microBatchSize": mb, "gradientAccumulationSteps": ga}}))
    if training.optimizer in ("adamw", "paged_adamw_32bit") and method == "full":
        yield "use training.optimizer: adamw_8bit", _deep_merge(relax, {"training": {"optimizer": "adamw_8bit"}})
    seq = training.max_seq_length
    s = seq // 2
    while s >= 512:
        yield f"reduce training.maxSeqLength to {s}", _deep_merge(relax, {"training": {"maxSeqLength": s}})
        s //= 2
    if method == "full":
        yield "use method: lora", _deep_merge(relax, {"method": "lora"})
    if method in ("full", "lora"):
        yield "use method: qlora (4-bit NF4 base weights)", _deep_merge(relax, {"method": "qlora"})


# The CRD's maximum of spec.training.gradientAccumulationSteps (a unit test ties the two): a suggestion never
# asks for more.
MAX_GRADIENT_ACCUMULATION_STEPS = 4096


def _smaller_micro_batch(mb: int, ga: int) -> tuple[int, int] | None:
    """The smallest micro batch that divides `mb` and keeps the effective batch (mb x ga) with a number of
    accumulation steps within the CRD's bound; None when there is none smaller than `mb`."""
    for smaller in range(1, mb):
        if mb % smaller == 0 and ga * mb // smaller <= MAX_GRADIENT_ACCUMULATION_STEPS:
            return smaller, ga * mb // smaller
    return None


def _dedupe_seq(texts: list[str]) -> list[str]:
    """Keep only the last 'reduce training.maxSeqLength' step of an accumulated list."""
    seq = [t for t in texts if "maxSeqLength" in t]
    return [t for t in texts if "maxSeqLength" not in t or t == seq[-1]]


def apply_patch(spec: FineTuneJobSpec, patch: Mapping[str, Any]) -> FineTuneJobSpec:
    """The spec with a suggestion patch (camelCase, as in SizingDecision.suggestion_patch) applied."""
    return FineTuneJobSpec.model_validate(_deep_merge(spec.dump(), patch))


def _with_suggestion(decision: SizingDecision, spec: FineTuneJobSpec, fleet: Fleet, headroom: float,
                     config: Mapping[str, Any] | None) -> SizingDecision:
    """Attach the first alternative that fits (each one actually re-sized)."""
    singles = list(_alternatives(spec))
    # one change at a time first; then the changes accumulated in order (least disruptive first)
    combos: list[tuple[str, dict[str, Any]]] = list(singles)
    texts: list[str] = []
    acc: dict[str, Any] = {}
    for text, patch in singles:
        texts.append(text)
        acc = _deep_merge(acc, patch)
        if len(texts) > 1:
            combos.append(("; ".join(_dedupe_seq(texts)), acc))
    for text, patch in combos:
        try:
            d = size_job(apply_patch(spec, patch), fleet, headroom, config, suggest=False)
        except (ArchitectureError, ValueError):
            continue
        if d.fits and d.device == "gpu":
            where = f"{d.total_gpus} x {d.gpu_product}"
            strategy = d.parallelism.describe()
            decision.suggestion = (f"{text}: then it needs {gib(d.estimate.total if d.estimate else 0)} GiB per GPU "
                                   f"on {where} ({strategy})")
            decision.suggestion_patch = patch
            decision.message = f"{decision.message}. Cheapest change that fits: {decision.suggestion}"
            return decision
    decision.suggestion = "no change of method, sequence length or batch fits this cluster; add larger GPUs or more GPU nodes"
    decision.message = f"{decision.message}. {decision.suggestion}"
    return decision
