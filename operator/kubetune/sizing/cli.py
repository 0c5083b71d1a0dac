"""`kubetune estimate`: GPU memory estimate for a model/method, a comparison table, or a FineTuneJob manifest."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune.api import FineTuneJobSpec, LoraSpec, TrainingSpec, parse_spec

from .architecture import ArchitectureError, architecture_from_config
from .catalog import catalog_names, load_catalog, resolve_architecture
from .estimator import MemoryEstimate, Parallelism, TrainingSetup, estimate_memory, gib
from .fleet import fleet_from_nodes, nodes_from_file, parse_gpu_shorthand
from .sizer import size_job
from .training_setup import setup_from_spec

DEFAULT_FLEET = Path("devcluster/fleet.yaml")
TABLE_MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-14b", "llama-3.1-70b")
TABLE_METHODS = ("full", "lora", "qlora")
# A spec built from flags estimates memory only: nothing is read or written, so these locations are unused.
UNUSED_URI = "pvc://unused/estimate"
ATTENTION_FLAGS = {"auto": "auto", "sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}
_TRAINING, _LORA = TrainingSpec(), LoraSpec()  # the spec defaults (kubetune.api) are the flags' defaults

TERM_LABELS = {
    "weights": "weights", "masterWeights": "fp32 master weights", "gradients": "gradients",
    "optimizerStates": "optimizer states", "activations": "activations", "logits": "logits + loss",
    "commBuffers": "NCCL/DDP/ZeRO buffers", "cudaContext": "CUDA context", "fragmentation": "allocator fragmentation",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune estimate", description=__doc__)
    p.add_argument("model", nargs="?", help="catalog name (e.g. llama-3.1-8b) or hf://org/name URI")
    p.add_argument("--config", help="path to a config.json instead of a catalog model")
    p.add_argument("-f", "--file", help="FineTuneJob manifest to size against a fleet (no cluster needed)")
    p.add_argument("--fleet", help=f"YAML of Node manifests (default {DEFAULT_FLEET} when it exists)")
    p.add_argument("--gpu", action="append", default=[], metavar="PRODUCT:GPUS[xNODES]",
                   help="fleet shorthand, e.g. H100-80GB:8 or NVIDIA-L4:1x4 (repeatable; replaces --fleet)")
    p.add_argument("--table", action="store_true", help="GiB per GPU for a few catalog models x full/LoRA/QLoRA")
    p.add_argument("--list", action="store_true", help="list the catalog models")
    p.add_argument("--method", choices=("full", "lora", "qlora"), default="lora")
    p.add_argument("--seq", type=int, default=_TRAINING.max_seq_length,
                   help=f"max sequence length (default {_TRAINING.max_seq_length})")
    p.add_argument("--batch", type=int, default=_TRAINING.micro_batch_size,
                   help=f"micro batch size (default {_TRAINING.micro_batch_size})")
    p.add_argument("--r", type=int, default=_LORA.r, help=f"LoRA rank (default {_LORA.r})")
    targets = ",".join(_LORA.target_modules)
    p.add_argument("--targets", default=targets, help=f"LoRA target modules, comma separated (default {targets})")
    p.add_argument("--optimizer", default=_TRAINING.optimizer,
                   choices=("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flash", "eager"),
                   help="attention kernel (auto: the trainer's choice; packed batches run variable-length flash)")
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--activation-offloading", action="store_true",
                   help="saved activations wait in host RAM between forward and backward "
                        "(training.activationOffloading)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs in total (default 1)")
    p.add_argument("--strategy", default="auto", choices=("auto", "none", "ddp", "zero1", "zero2", "zero3"))
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--data", metavar="FILE",
                   help="with -f: run the trainer's preflight on this dataset file (needs the trainer package) and "
                        "print its examples, tokens, steps, GPU-hours and cost, as status.preflight/.estimate would")
    p.add_argument("--model-dir", default="", help="with --data: a local model directory instead of spec.model.uri")
    p.add_argument("--pvc-root", default="", help="with --data: local directory holding the pvc:// claims")
    p.add_argument("--pricing", default="", help="with --data: PRODUCT=PRICE,... per GPU-hour (as the operator's)")
    p.add_argument("--currency", default="USD", help="currency of --pricing")
    p.add_argument("--runs", metavar="FILE", default="",
                   help="with --data: finished FineTuneJobs (e.g. kubectl get finetunejobs -A -o yaml) whose clean "
                        "succeeded runs calibrate the time, as the operator's own runs do")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trace", action="store_true",
                   help="also trace the trainer's real step on fake tensors (needs torch, no GPU) and show the "
                        "traced peak beside the estimate")
    return p


def spec_from_flags(args: argparse.Namespace, method: str | None = None, model_uri: str = "") -> FineTuneJobSpec:
    """The typed FineTuneJob spec the estimate flags describe (defaults from kubetune.api)."""
    method = method or args.method
    lora = {"r": args.r, "targetModules": [t.strip() for t in args.targets.split(",") if t.strip()]}
    return FineTuneJobSpec.model_validate({
        "model": {"uri": model_uri or UNUSED_URI}, "dataset": {"uri": UNUSED_URI},
        "output": {"uri": UNUSED_URI}, "method": method, "lora": lora if method != "full" else None,
        "training": {"epochs": 1, "maxSeqLength": args.seq, "microBatchSize": args.batch,
                     "optimizer": args.optimizer, "precision": args.precision, "packing": args.packing,
                     "gradientCheckpointing": not args.no_checkpointing,
                     "attentionImplementation": ATTENTION_FLAGS[args.attention],
                     "activationOffloading": args.activation_offloading},
    })


def _setup(args: argparse.Namespace, method: str | None = None) -> TrainingSetup:
    setup = setup_from_spec(spec_from_flags(args, method), precision=args.precision)
    return setup if args.attention == "auto" else dataclasses.replace(setup, attention=args.attention)


def _parallelism(args: argparse.Namespace) -> Parallelism:
    n = max(args.gpus, 1)
    strategy = args.strategy
    if strategy == "auto":
        strategy = "zero3" if args.offload_params else "zero2" if args.offload_optimizer else ("ddp" if n > 1 else "none")
    if strategy.startswith("zero"):
        return Parallelism("deepspeed", int(strategy[-1]), args.offload_optimizer, args.offload_params, n)
    return Parallelism("ddp" if n > 1 and strategy == "ddp" else "none", world_size=n if strategy == "ddp" else 1)


def format_breakdown(title: str, e: MemoryEstimate) -> str:
    """A text table of the estimate's terms in GiB."""
    lines = [title, f"  parameters {e.total_params:,} (trainable {e.trainable_params:,})"]
    for key, value in e.breakdown().items():
        if key == "total":
            continue
        lines.append(f"  {TERM_LABELS[key]:<26} {gib(value):>9.2f} GiB")
    lines.append(f"  {'total per GPU':<26} {gib(e.total):>9.2f} GiB")
    if e.host_offload:
        lines.append(f"  {'host RAM (offload)':<26} {gib(e.host_offload):>9.2f} GiB per GPU")
    for note in e.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _table(args: argparse.Namespace) -> str:
    rows = [f"{'model':<16}" + "".join(f"{m:>10}" for m in TABLE_METHODS) + "   (GiB per GPU, 1 GPU, "
            f"seq {args.seq}, micro batch {args.batch}, {'no ' if args.no_checkpointing else ''}checkpointing)"]
    catalog = load_catalog()
    for name in TABLE_MODELS:
        arch = catalog[name]
        cells = [gib(estimate_memory(arch, _setup(args, m), _parallelism(args)).total) for m in TABLE_METHODS]
        rows.append(f"{name:<16}" + "".join(f"{c:>10.1f}" for c in cells))
    return "\n".join(rows)


def _fleet(args: argparse.Namespace):
    if args.gpu:
        nodes = [n for g in args.gpu for n in parse_gpu_shorthand(g)]
    else:
        path = Path(args.fleet) if args.fleet else DEFAULT_FLEET
        if not path.exists():
            raise FileNotFoundError(f"fleet file {path} not found; pass --fleet FILE or --gpu PRODUCT:GPUS")
        nodes = nodes_from_file(path)
    return fleet_from_nodes(nodes)


def _size_manifest(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    docs = [d for d in yaml.safe_load_all(Path(args.file).read_text()) if d]
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if not jobs:
        raise ValueError(f"{args.file}: no FineTuneJob found")
    fleet = _fleet(args)
    runs = None
    if args.data and args.runs:
        from kubetune.estimate_offline import finished_runs

        runs = finished_runs(Path(args.runs).read_text())
    results, texts = [], []
    for job in jobs:
        spec = parse_spec(job.get("spec") or {})
        config = json.loads(Path(args.config).read_text()) if args.config else None
        decision = size_job(spec, fleet, config=config)
        status = decision.to_status()
        name = (job.get("metadata") or {}).get("name", "?")
        result = {"name": name, "plan": status}
        results.append(result)
        text = [f"FineTuneJob {name}: {'fits' if decision.fits else 'DOES NOT FIT'}", f"  {decision.reason}"]
        if decision.fits:
            d = decision.distributed
            text.append(f"  layout: {decision.pods} pod(s) x {decision.gpus_per_pod} "
                        f"{decision.gpu_product or 'CPU'}; strategy {d['strategy']}"
                        + (f" ZeRO-{d['zeroStage']}" if d["strategy"] == "deepspeed" else "")
                        + (" + offload optimizer" if d["offloadOptimizer"] else "")
                        + (" + offload params" if d["offloadParams"] else ""))
        if decision.estimate is not None:
            text.append(format_breakdown("  per-GPU estimate:" if decision.device == "gpu" else "  host estimate:",
                                         decision.estimate))
        if decision.fits and args.data:
            from kubetune.estimate import parse_pricing
            from kubetune.estimate_offline import describe as describe_offline
            from kubetune.estimate_offline import offline_estimate
            from kubetune.sizing.layout import layout_from_decision

            offline = offline_estimate(name, spec, layout_from_decision(decision, spec), status, args.data,
                                       model_dir=args.model_dir, pvc_root=args.pvc_root,
                                       pricing=parse_pricing(args.pricing, args.currency),
                                       runs=runs)
            result.update(offline)
            text.append(describe_offline(offline))
        if not decision.fits:
            text.append(f"  {decision.message}")
            if decision.suggestion:
                text.append(f"  suggestion: {decision.suggestion}")
        texts.append("\n".join(text))
    return {"fleet": fleet.describe(), "jobs": results}, f"fleet: {fleet.describe()}\n" + "\n".join(texts)


def _catalog_config(name: str) -> dict[str, Any] | None:
    """The config.json fields the catalog holds for model `name` (None when it is not a catalog model)."""
    from .catalog import CATALOG_DIR

    for path in sorted(CATALOG_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for entry in doc["models"]:
            if entry["name"].lower() == name.lower():
                return {**(doc.get("common") or {}), **(entry.get("config") or {})}
    return None


TRACE_TIMEOUT_SECONDS = 900


def _trace(args: argparse.Namespace, name: str, estimate: MemoryEstimate) -> tuple[dict[str, Any], str]:
    """(JSON, text) of the trainer's traced step for these flags, or why there is none (the estimate stands).

    The trace runs the trainer's own code on fake tensors, so it needs the trainer package and torch: it runs
    as `python -m kubetune_trainer.memtrace` in a subprocess (the operator package never imports either)."""
    fallback = "; the figure above is the analytic estimate only"
    config = json.loads(Path(args.config).read_text()) if args.config else _catalog_config(name)
    if config is None:
        reason = f"no config.json for {name} (not a catalog model); pass --config"
        return {"error": reason}, f"  trace not run: {reason}{fallback}"
    settings = dict(
        method=args.method, micro_batch_size=args.batch, seq_length=args.seq, lora_r=args.r,
        target_modules=[t.strip() for t in args.targets.split(",") if t.strip()], optimizer=args.optimizer,
        precision=args.precision, gradient_checkpointing=not args.no_checkpointing, packing=args.packing,
        attention=ATTENTION_FLAGS[args.attention], gradient_accumulation_steps=_TRAINING.gradient_accumulation_steps,
        activation_offloading=args.activation_offloading)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as cfg:
        json.dump(config, cfg)
        cfg.flush()
        try:
            run = subprocess.run([sys.executable, "-m", "kubetune_trainer.memtrace", "--settings", json.dumps(settings),
                                  "--config", cfg.name, "--model-name", name],
                                 capture_output=True, text=True, timeout=TRACE_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            reason = f"the trace took longer than {TRACE_TIMEOUT_SECONDS} s"
            return {"error": reason}, f"  trace not available: {reason}{fallback}"
    if "No module named" in run.stderr and run.returncode != 0:
        missing = run.stderr.strip().splitlines()[-1]
        reason = f"the trace needs the trainer package and torch ({missing})"
        return {"error": reason}, f"  trace not run: {reason}{fallback}"
    try:
        answer = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {}
    except ValueError:
        answer = {}
    if "report" not in answer:
        reason = answer.get("error") or (run.stderr.strip().splitlines() or ["the trace failed"])[-1]
        return {"error": reason}, f"  trace not available: {reason}{fallback}"
    report = answer["report"]
    peak = int(report["peakBytes"]) + int(report.get("pagedOptimizerBytes") or 0)
    comparable = estimate.tensors - estimate.comm_buffers  # the trace has no CUDA context, allocator or NCCL
    head = (f"traced step of the trainer (one process; tensors only, paged optimizer states included): "
            f"{gib(peak):.2f} GiB beside the estimate's {gib(comparable):.2f} GiB of tensors "
            f"(ratio {comparable / peak:.3f}; the estimate's total adds the CUDA context and fragmentation)\n")
    return answer["report"], head + answer["text"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kubetune estimate`; returns the exit code (1 when a manifest does not fit)."""
    args = _parser().parse_args(argv)
    try:
        if args.list:
            catalog = load_catalog()
            for name in catalog_names():
                a = catalog[name]
                print(f"{name:<20} {a.family:<8} {a.total_params() / 1e9:6.2f}B  vocab {a.vocab_size}")
            return 0
        if args.table:
            print(_table(args))
            return 0
        if args.file:
            data, text = _size_manifest(args)
            print(json.dumps(data, indent=2) if args.json else text)
            return 0 if all(j["plan"]["fits"] and "error" not in j for j in data["jobs"]) else 1
        if args.config:
            arch = architecture_from_config(json.loads(Path(args.config).read_text()), name=args.config)
        elif args.model:
            uri = args.model if "://" in args.model else f"hf://{args.model}" if "/" in args.model else args.model
            arch = resolve_architecture({"uri": uri})
        else:
            _parser().print_usage(sys.stderr)
            print("kubetune estimate: give a model, --config, --table, --list or -f job.yaml", file=sys.stderr)
            return 2
        setup, par = _setup(args), _parallelism(args)
        e = estimate_memory(arch, setup, par)
        traced = _trace(args, arch.name, e) if args.trace else None
        if args.json:
            out = {"model": arch.name, "method": setup.method, "parallelism": par.describe(),
                   "breakdownBytes": e.breakdown(), "estimate": e.to_dict()}
            print(json.dumps({**out, "trace": traced[0]} if traced else out, indent=2))
        else:
            print(format_breakdown(f"{arch.name} ({arch.source}), {setup.method}, seq {setup.seq_length}, "
                                   f"micro batch {setup.micro_batch_size}, {par.describe()}:", e))
            if traced:
                print(traced[1])
        return 0
    except (ArchitectureError, ValueError, FileNotFoundError) as exc:
        print(f"kubetune estimate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
