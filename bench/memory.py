"""Peak GPU memory of the kubetune trainer against a plain transformers + peft script, side by side, traced
without a GPU (kubetune_trainer.memtrace: the real step on fake tensors, live storage counted).

    ~/.cache/kubetune/venv/bin/python bench/memory.py            # torchtune's cases, 8B/70B at 2k-16k, longest fit
    ~/.cache/kubetune/venv/bin/python bench/memory.py --quick    # 4 layers of Llama-3.2-1B, three methods (CI)

For each case both sides run the same batch (same token ids, packing, micro batch, sequence length) through
their own step: **kubetune** is `FineTuneRecipe` on the plan (`memtrace.trace_step`); **baseline** is
`bench/memory_baseline.py` (bf16 autocast, transformers' own loss over full fp32 logits, fp32 weights for
full fine-tuning, `prepare_model_for_kbit_training` for QLoRA), traced with the same counter, fake-tensor
executor, CUDA attention kernels, foreach optimizers and paged-state accounting. torchtune's published peaks
(its README, "Memory and training speed": Llama 3.1 8B, batch size 2, packed to 2048, RTX 4090) are printed
beside the three cases they describe. The longest sequence that fits one 80 GB GPU is found by bisection
over traced peaks plus the estimator's documented fixed overheads (CUDA context, allocator fragmentation).
Writes bench/results/memory.json (or --out). Traced figures are not GPU measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "operator", REPO / "trainer_image", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from memory_baseline import LOAD_URI, BaselineSettings, baseline_step, build_baseline  # noqa: E402

GiB = 1024 ** 3
MiB = 1024 ** 2
SCHEMA_VERSION = 1
RESULTS = REPO / "bench" / "results" / "memory.json"
GPU_80GB_MIB = 81920  # A100 80GB as GPU feature discovery reports it (kubetune.sizing.fleet); Unsloth's GPU
TORCHTUNE_SOURCE = ("torchtune README (github.com/pytorch/torchtune), 'Memory and training speed': Llama 3.1 8B, "
                    "batch size 2 without gradient accumulation, dataset packed to 2048, torch.compile, 1x RTX 4090")
TORCHTUNE_GIB = {"lora": 16.2, "qlora": 7.4, "full": 18.9}
UNSLOTH_SOURCE = ("Unsloth README / blog 'Llama 3.3' (unsloth.ai/blog/llama3-3): Llama 3.1 8B, 4-bit QLoRA on all "
                  "linear layers, rank 32, batch size 1, 80 GB A100: 342,733 tokens with Unsloth vs 28,454 with "
                  "Hugging Face + FA2 ('12x longer context')")
UNSLOTH_TOKENS = {"unsloth": 342_733, "hf_fa2": 28_454}
OUT_OF_REACH_TOKENS = 1 << 20  # bisection stops here: no case of interest reaches a million tokens
SEQ_RESOLUTION = 1024  # bisection resolution (tokens)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QVO = ("q_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Case:
    """One configuration traced on both sides."""

    id: str
    model: str  # a sizing-catalog model id (its config.json)
    method: str
    micro_batch_size: int
    seq_length: int
    packing: bool = True
    gradient_checkpointing: bool = True
    lora_r: int = 8
    target_modules: tuple[str, ...] = QVO
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0  # 0 = no clipping (lets the trainer step the optimizer inside backward)
    torchtune_gib: float | None = None
    layers: int | None = None  # keep only this many decoder layers of the model (the quick preset)
    activation_offloading: bool = False  # kubetune side only: the plain script has no such switch
    embeddings_on_host: bool | None = None  # kubetune side only (training.embeddingsOnHost); None = auto

    def plan(self) -> dict[str, Any]:
        """The kubetune plan dict (memtrace.plan_settings) for this case."""
        from kubetune_trainer.memtrace import plan_settings

        return plan_settings(self.method, micro_batch_size=self.micro_batch_size, seq_length=self.seq_length,
                             lora_r=self.lora_r, lora_alpha=2.0 * self.lora_r, target_modules=list(self.target_modules),
                             optimizer=self.optimizer, gradient_checkpointing=self.gradient_checkpointing,
                             packing=self.packing, max_grad_norm=self.max_grad_norm,
                             activation_offloading=self.activation_offloading,
                             embeddings_on_host=self.embeddings_on_host)

    def baseline(self) -> BaselineSettings:
        """The same run for the plain script."""
        return BaselineSettings(method=self.method, lora_r=self.lora_r, lora_alpha=2.0 * self.lora_r,
                                target_modules=self.target_modules, optimizer=self.optimizer,
                                gradient_checkpointing=self.gradient_checkpointing, max_grad_norm=self.max_grad_norm)


def _torchtune_case(method: str) -> Case:
    # torchtune's 8B full single-device config: PagedAdamW8bit, optimizer_in_bwd True, clip_grad_norm null
    full = method == "full"
    return Case(id=f"llama-3.1-8b-{method}-mbs2-seq2048-packed", model="llama-3.1-8b", method=method,
                micro_batch_size=2, seq_length=2048, optimizer="paged_adamw_8bit" if full else "adamw",
                max_grad_norm=0.0 if full else 1.0, torchtune_gib=TORCHTUNE_GIB[method])


TORCHTUNE_CASES = [_torchtune_case(m) for m in ("lora", "qlora", "full")] + [
    # the same LoRA run with the trainer's activation offloading (training.activationOffloading)
    replace(_torchtune_case("lora"), id="llama-3.1-8b-lora-mbs2-seq2048-packed-offload", activation_offloading=True),
    # and with the frozen input-embedding table left on the GPU (auto keeps it in host memory for LoRA/QLoRA)
    replace(_torchtune_case("lora"), id="llama-3.1-8b-lora-mbs2-seq2048-packed-embeddings-on-gpu",
            embeddings_on_host=False)]
MORE_CASES = [
    Case("llama-3.1-8b-lora-mbs1-seq16384", "llama-3.1-8b", "lora", 1, 16384, packing=False),
    Case("llama-3.1-8b-qlora-mbs1-seq16384", "llama-3.1-8b", "qlora", 1, 16384, packing=False),
    Case("llama-3.1-8b-full-mbs1-seq16384", "llama-3.1-8b", "full", 1, 16384, packing=False,
         optimizer="paged_adamw_8bit"),
    Case("llama-3.1-70b-lora-mbs2-seq2048-packed", "llama-3.1-70b", "lora", 2, 2048),
    Case("llama-3.1-70b-qlora-mbs2-seq2048-packed", "llama-3.1-70b", "qlora", 2, 2048),
]
# Unsloth's long-context setting: QLoRA (and LoRA) rank 32 on all linear layers, batch 1, one unpadded sequence
# (and with the trainer's activation offloading, as Unsloth keeps checkpointed activations in system RAM; the
# plain side of those rows is the run without it)
LONGEST_CASES = [Case(f"llama-3.1-8b-{m}-r32-all-linear-mbs1{'-offload' if off else ''}", "llama-3.1-8b", m, 1,
                      8192, packing=False, lora_r=32, target_modules=ALL_LINEAR, activation_offloading=off)
                 for off in (False, True) for m in ("lora", "qlora")]


def longest_sides(case: Case) -> tuple[str, ...]:
    """The sides a longest-sequence case bisects (an offloaded case shares the plain side of its method's)."""
    return ("kubetune",) if case.activation_offloading else ("kubetune", "baseline")
# Llama-3.2-1B's layers, embeddings and 128k vocabulary, 4 of its 16 decoder layers: seconds per trace
QUICK_CASES = [Case(f"llama-3.2-1b-4layers-{m}-mbs2-seq1024-packed", "llama-3.2-1b", m, 2, 1024, layers=4,
                    optimizer="paged_adamw_8bit" if m == "full" else "adamw") for m in ("lora", "qlora", "full")]


# ----------------------------------------------------------------------------- tracing
def model_config(model: str) -> dict[str, Any]:
    """config.json of a sizing-catalog model."""
    from kubetune.sizing import lookup_catalog

    arch = lookup_catalog(model)
    if arch is None:
        raise SystemExit(f"memory: {model} is not in the sizing catalog")
    return dict(arch.config)


def case_config(case: Case, cache: dict[str, dict]) -> dict[str, Any]:
    """The case's model config (catalog config.json, with `layers` decoder layers when the case sets it)."""
    config = dict(cache.setdefault(case.model, model_config(case.model)))
    if case.layers:
        config["num_hidden_layers"] = case.layers
        config.pop("layer_types", None)
    return config


def batch_rows(micro_batch_size: int, seq_length: int, packing: bool, vocab_size: int) -> list[dict]:
    """Token rows of one micro-batch: full-length rows (packed: four examples each, position ids restart)."""
    rows = []
    for i in range(micro_batch_size):
        ids = [(7 * j + i) % vocab_size for j in range(seq_length)]
        row: dict[str, Any] = {"input_ids": ids, "labels": list(ids)}
        if packing:
            piece = max(1, seq_length // 4)
            row["position_ids"] = [j % piece for j in range(seq_length)]
        rows.append(row)
    return rows


def trace_ours(case: Case, config: dict[str, Any]) -> dict[str, Any]:
    """The kubetune trainer's traced step for the case (memtrace.trace_step)."""
    from kubetune_trainer.memtrace import trace_step

    report = trace_step(case.plan(), config, model_name=case.model)
    return _side(report.peak_bytes, report.breakdown, report.paged_optimizer_bytes,
                 f"{report.peak_phase}, {report.peak_op}" + (f" in {report.peak_where}" if report.peak_where else ""),
                 report.attention, report.trainable_params, report.seconds, report.notes)


def _side(peak: int, breakdown: dict[str, int], paged: int, moment: str, attention: str, trainable: int,
          seconds: float, notes: list[str]) -> dict[str, Any]:
    return {"peakBytes": int(peak), "peakGiB": round(peak / GiB, 3), "breakdown": dict(breakdown),
            "pagedOptimizerBytes": int(paged), "peakAt": moment, "attention": attention,
            "trainableParams": int(trainable), "seconds": round(seconds, 1), "notes": list(notes)}


def trace_baseline(case: Case, config: dict[str, Any], optimizer_steps: int = 2) -> dict[str, Any]:
    """The plain transformers + peft step (bench/memory_baseline.py) traced with memtrace's counter."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.data import DataCollator
    from kubetune_trainer.memtrace import resolve_config
    from kubetune_trainer.memtrace.attention import KernelLog, cuda_attention
    from kubetune_trainer.memtrace.build import BuildLog, config_loader
    from kubetune_trainer.memtrace.counter import StorageCounter
    from kubetune_trainer.memtrace.cuda_defaults import cuda_optimizer_defaults, paged_optimizer_states
    from kubetune_trainer.memtrace.fake_support import FakeExecutor, swappable_fake_tensors
    from kubetune_trainer.memtrace.quantized import isolated_qmaps, quant_state_tensors

    started = time.perf_counter()
    cfg = resolve_config(config)
    settings = case.baseline()
    rows = batch_rows(case.micro_batch_size, case.seq_length, case.packing, int(cfg.vocab_size))
    executor = FakeExecutor(bitsandbytes_4bit=case.method == "qlora")
    counter = StorageCounter(run_op=executor)
    executor.counter = counter
    kernels, log = KernelLog(), BuildLog()
    uses_bnb = case.method == "qlora" or case.optimizer != "adamw"
    _import_before_faking(cfg, uses_bnb)
    with contextlib.ExitStack() as stack:
        if uses_bnb:
            stack.enter_context(isolated_qmaps())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(swappable_fake_tensors())
        stack.enter_context(counter)
        stack.enter_context(config_loader(cfg, log, without_modes=_disable_current_modes))
        stack.enter_context(cuda_attention(kernels))  # casts fp32 inputs as CUDA autocast would
        stack.enter_context(cuda_optimizer_defaults())
        stack.enter_context(paged_optimizer_states(_paged_hook(counter)))
        counter.phase = "model build"
        model, optimizer = build_baseline(settings, lambda **kw: AutoModelForCausalLM.from_pretrained(LOAD_URI, **kw))
        gc.collect()
        state = [*model.parameters(), *model.buffers()]
        for p in model.parameters():
            if getattr(p, "quant_state", None) is not None:
                state += [t for _, t in quant_state_tensors(p.quant_state)]
        counter.label(state, "weights")
        params = [p for p in model.parameters() if p.requires_grad]
        def accumulated(param) -> None:
            counter.label([param.grad], "gradients")

        hooks = [p.register_post_accumulate_grad_hook(accumulated) for p in params]
        counter.reset_peak()
        with _disable_current_modes():
            batch = DataCollator(pad_token_id=0)(rows)
        for tensor in batch.values():
            counter.track(tensor, "batch")
        try:
            for step in range(optimizer_steps):
                counter.phase = f"step {step + 1}"
                baseline_step(model, optimizer, [batch], device_type="cpu", max_grad_norm=settings.max_grad_norm)
                counter.label([t for s in optimizer.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor)], "optimizerStates")
        finally:
            for h in hooks:
                h.remove()
        breakdown = counter.peak_breakdown()
        paged = max(counter.peak_paged_bytes, counter.paged_bytes)
        moment = counter.peak_moment
        trainable = sum(p.numel() for p in params)
        del model, optimizer, params, state
    notes = list(log.notes)
    if executor.scalar_reads:
        notes.append(f"{executor.scalar_reads} scalar read(s) of fake values returned 0")
    return _side(counter.peak_bytes, breakdown, paged,
                 f"{moment.phase}, {moment.op}" + (f" in {moment.where}" if moment.where else ""),
                 kernels.summary(), trainable, time.perf_counter() - started, notes)


def _paged_hook(counter):
    """What memtrace's paged_optimizer_states takes from the counter (the context that marks paged storage)."""
    return getattr(counter, "paged_allocations", None) or counter.mark_paged


def _import_before_faking(cfg, uses_bnb: bool) -> None:
    """Import, outside the fake mode, the modules the plain step imports lazily (so none keeps fake constants)."""
    import peft  # noqa: F401
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: F401

    from kubetune_trainer.memtrace import step as memtrace_step

    prepare = getattr(memtrace_step, "_import_before_faking", None)
    if prepare is not None:
        prepare(cfg, uses_bnb)
    if uses_bnb:
        import bitsandbytes  # noqa: F401


# ----------------------------------------------------------------------------- fitting one GPU
def gpu_need_bytes(side: dict[str, Any]) -> int:
    """Traced peak + the estimator's documented fixed overheads: CUDA context and allocator fragmentation
    (kubetune.sizing.estimator: 15% of the per-step tensors, 2% of the long-lived ones)."""
    from kubetune.sizing.estimator import CUDA_CONTEXT_BYTES, fragmentation_bytes

    b = side["breakdown"]
    persistent = b.get("weights", 0) + b.get("gradients", 0) + b.get("optimizerStates", 0)
    return int(side["peakBytes"] + CUDA_CONTEXT_BYTES + fragmentation_bytes(persistent, b.get("activations", 0)))


def longest_fit(trace: Callable[[int], dict[str, Any]], budget: int, start: int,
                resolution: int = SEQ_RESOLUTION, limit: int = OUT_OF_REACH_TOKENS) -> dict[str, Any]:
    """Largest sequence length (a multiple of `resolution`) whose traced need fits `budget`, by bisection.

    `trace(seq)` returns a side dict. Two probes (`start`, 4 x `start`) give a linear first guess, a bracket
    [fits, does not fit] is found around it (widened by doubling when the guess is off), then bisected until
    it is narrower than `resolution` or 1/128 of the answer. Returns the length, whether `limit` was reached,
    the resolution reached and every probe (0 tokens when even `resolution` does not fit)."""
    probes: list[dict[str, Any]] = []
    seen: dict[int, bool] = {}

    def fits(seq: int) -> bool:
        if seq in seen:
            return seen[seq]
        side = trace(seq)
        need = gpu_need_bytes(side)
        ok = need <= budget
        probes.append({"seqLength": seq, "peakBytes": side["peakBytes"], "needBytes": need, "fits": ok,
                       "seconds": side["seconds"]})
        print(f"    seq {seq:>7}: traced {side['peakBytes'] / GiB:6.2f} GiB, with overheads {need / GiB:6.2f} GiB "
              f"-> {'fits' if ok else 'does not fit'}", flush=True)
        seen[seq] = ok
        return ok

    def snap(x: float) -> int:
        return int(min(limit, max(resolution, x // resolution * resolution)))

    s0 = snap(start)
    s1 = snap(4 * s0)
    lo, hi = 0, None
    for s in (s0, s1):
        if fits(s):
            lo = s
        else:
            hi = s
            break
    if hi is None:  # both fit: extrapolate the need linearly to the budget
        n0, n1 = (next(p["needBytes"] for p in probes if p["seqLength"] == s) for s in (s0, s1))
        slope = (n1 - n0) / (s1 - s0)
        guess = s1 + (budget - n1) / slope if slope > 0 else limit
        step = max(resolution, snap(0.03 * guess))
        below = snap(max(lo, guess - step))
        while below > lo and not fits(below):  # the guess was too long: step down, doubling the step
            hi = below
            step *= 2
            below = snap(max(lo, below - step))
        if below > lo and seen.get(below):
            lo = below
        above = snap(max(lo + resolution, guess + step))
        while hi is None or hi > above:
            if above >= limit and fits(limit):
                return {"seqLength": limit, "reachedLimit": True, "resolution": resolution, "probes": probes}
            if not fits(above):
                hi = above
                break
            lo = above
            step *= 2
            above = snap(above + step)
    while hi - lo > max(resolution, lo // 128):
        mid = snap((lo + hi) // 2)
        if mid in (lo, hi):
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"seqLength": lo, "reachedLimit": False, "resolution": hi - lo, "probes": probes}


# ----------------------------------------------------------------------------- the run
def run_case(case: Case, configs: dict[str, dict]) -> dict[str, Any]:
    """Trace both sides of one case and compare."""
    config = case_config(case, configs)
    print(f"== {case.id}", flush=True)
    ours = trace_ours(case, config)
    print(f"   kubetune  {ours['peakGiB']:7.2f} GiB  ({ours['seconds']:.0f} s)", flush=True)
    gc.collect()
    base = trace_baseline(case, config)
    print(f"   baseline  {base['peakGiB']:7.2f} GiB  ({base['seconds']:.0f} s)", flush=True)
    gc.collect()
    row: dict[str, Any] = {"id": case.id, "case": _case_json(case), "kubetune": ours, "baseline": base,
                           "ratio": round(ours["peakBytes"] / base["peakBytes"], 4)}
    if case.torchtune_gib is not None:
        row["torchtune"] = {"peakGiB": case.torchtune_gib, "source": TORCHTUNE_SOURCE,
                            "kubetuneAtOrBelow": ours["peakBytes"] <= case.torchtune_gib * GiB}
    return row


def _case_json(case: Case) -> dict[str, Any]:
    out = asdict(case)
    out["target_modules"] = list(case.target_modules)
    out.pop("id")
    return {_camel(k): v for k, v in out.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def run_longest_side(case: Case, side: str, configs: dict[str, dict], budget: int) -> dict[str, Any]:
    """Longest sequence of `side` (kubetune | baseline) on one GPU of `budget` bytes, by bisection over traces."""
    config = case_config(case, configs)
    trace = {"kubetune": trace_ours, "baseline": trace_baseline}[side]
    print(f"== longest sequence, {case.id}, {side}", flush=True)
    return longest_fit(lambda seq: trace(replace(case, seq_length=seq), config), budget, case.seq_length)


def _run_unit(unit: tuple[str, Any], budget: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    kind, what = unit
    configs: dict[str, dict] = {}
    return run_case(what, configs) if kind == "case" else run_longest_side(*what, configs, budget)


def run_units(units: list[tuple[str, Any]], budget: int, jobs: int,
              done: Callable[[dict[int, dict]], None] = lambda _: None) -> list[dict[str, Any]]:
    """Results of `units` in order: in this process (jobs 1) or in `jobs` worker processes. `done(results so
    far by unit index)` is called after each unit."""
    results: dict[int, dict] = {}
    if jobs <= 1:
        for i, u in enumerate(units):
            results[i] = _run_unit(u, budget)
            done(results)
        return [results[i] for i in range(len(units))]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # torchtune's cases first (the headline), then the bisections and 70B (longest-running), then the rest
    def rank(i: int) -> tuple:
        kind, what = units[i]
        case = what if kind == "case" else what[0]
        return (case.torchtune_gib is None, kind != "longest", "70b" not in case.id)

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_unit, units[i], budget): i for i in sorted(range(len(units)), key=rank)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            done(results)
    return [results[i] for i in range(len(units))]


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The printed table."""
    lines = [f"{'case':<46} {'kubetune':>9} {'baseline':>9} {'ratio':>6} {'torchtune':>9}  (GiB, traced)"]
    for row in result["cases"]:
        tt = row.get("torchtune")
        lines.append(f"{row['id']:<46} {row['kubetune']['peakGiB']:>9.2f} {row['baseline']['peakGiB']:>9.2f} "
                     f"{row['ratio']:>6.2f} {tt['peakGiB'] if tt else '-':>9}"
                     + ("" if not tt else "  at/below torchtune" if tt["kubetuneAtOrBelow"] else "  ABOVE torchtune"))
    for row in result.get("longest", []):
        lines.append(f"longest sequence on {row['gpuBytes'] / GiB:.0f} GiB, {row['id']}: kubetune "
                     f"{row['kubetune']['seqLength']:,} tokens, baseline {row['baseline']['seqLength']:,} "
                     f"(x{row['ratio']}); Unsloth claims x{UNSLOTH_TOKENS['unsloth'] / UNSLOTH_TOKENS['hf_fa2']:.1f}")
    return lines


def result_json(args, argv, rows: list[dict], longest: list[dict], complete: bool, seconds: float,
                torch_version: str, transformers_version: str) -> dict[str, Any]:
    """The results file's content."""
    result: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "command": " ".join(["bench/memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": "quick" if args.quick else "full",
        "complete": complete,
        "what": "traced peak of live tensor storage per GPU (kubetune_trainer.memtrace, fake tensors on CPU): "
                "not a GPU measurement; no CUDA context or allocator fragmentation in peakBytes",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch_version, "transformers": transformers_version},
        "torchtuneSource": TORCHTUNE_SOURCE,
        "unslothSource": UNSLOTH_SOURCE, "unslothTokens": UNSLOTH_TOKENS,
        "cases": rows,
        "longest": longest,
        "seconds": round(seconds, 1),
    }
    if args.quick:
        result["longestLeftOut"] = "--quick traces no longest-sequence bisection"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers of Llama-3.2-1B, three methods, no bisection")
    p.add_argument("--cases", default="", help="comma-separated case ids (default: the preset's)")
    p.add_argument("--no-longest", action="store_true", help="skip the longest-sequence bisection")
    p.add_argument("--gpu-mib", type=int, default=GPU_80GB_MIB, help="GPU memory for the longest fit (MiB)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trace this many cases / bisections at once, each in its own process (default 1)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cases = QUICK_CASES if args.quick else TORCHTUNE_CASES + MORE_CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        known = {c.id: c for c in QUICK_CASES + TORCHTUNE_CASES + MORE_CASES}
        unknown = sorted(wanted - set(known))
        if unknown:
            raise SystemExit(f"memory: unknown case id(s) {unknown}; known: {sorted(known)}")
        cases = [known[c] for c in args.cases.split(",")]
    started = time.time()
    units: list[tuple[str, Any]] = [("case", c) for c in cases]
    if not args.quick and not args.no_longest:
        units += [("longest", (c, side)) for c in LONGEST_CASES for side in longest_sides(c)]
    import transformers

    out = args.out or (RESULTS if not args.quick else REPO / "bench" / "results" / "memory-quick.json")
    budget = args.gpu_mib * MiB

    def assemble(done: dict[int, dict], complete: bool) -> dict[str, Any]:
        rows = [done[i] for i, (kind, _) in enumerate(units) if kind == "case" and i in done]
        longest = []

        def sides_of(case: Case) -> dict[str, dict]:
            return {u[1][1]: done[i] for i, u in enumerate(units)
                    if u[0] == "longest" and u[1][0] is case and i in done}

        for case in (LONGEST_CASES if not args.quick and not args.no_longest else []):
            sides = sides_of(case)
            if not sides:
                continue
            if case.activation_offloading:
                plain = next(c for c in LONGEST_CASES if c.method == case.method and not c.activation_offloading)
                sides.update({k: v for k, v in sides_of(plain).items() if k == "baseline"})
            b = sides["baseline"]["seqLength"] if "baseline" in sides and "kubetune" in sides else 0
            longest.append({"id": case.id, "case": _case_json(case), "gpuBytes": budget, **sides,
                            "ratio": round(sides["kubetune"]["seqLength"] / b, 2) if b else None})
        return result_json(args, argv, rows, longest, complete, time.time() - started, torch.__version__,
                           transformers.__version__)

    def partial(done: dict[int, dict]) -> None:
        if len(done) < len(units):  # progress: a run stopped early still leaves what it traced
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(assemble(done, False), indent=1) + "\n")

    done = run_units(units, budget, args.jobs, partial)
    result = assemble(dict(enumerate(done)), True)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(summary_lines(result)))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
