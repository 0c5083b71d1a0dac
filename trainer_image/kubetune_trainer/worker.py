"""One training process: plan → recipe → outputs; rank 0 writes the termination summary on every path.

`kubetune-train run` calls `run_worker` (torchrun starts one per GPU); `launch` calls it in-process for a
1 x 1 run. The exit codes follow docs/contracts.md §5.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from kubetune_trainer import outcomes
from kubetune_trainer.errors import KubetuneTrainerError
from kubetune_trainer.preemption import STOP_FILE_ENV, GracefulStop

DEFAULT_PLAN_PATH = "/etc/kubetune/plan.json"
PERMANENT_FAILURE_EXIT = 3  # InvalidPlan / DataError: a retry cannot fix them (contracts §5)
PERMANENT_REASONS = tuple(sorted(outcomes.PERMANENT_REASONS))


def resolve_plan_path(arg: str | None) -> str:
    """The plan file: `arg`, else $KUBETUNE_PLAN, else the path the operator mounts it at."""
    return arg or os.environ.get("KUBETUNE_PLAN") or DEFAULT_PLAN_PATH


def exit_code_for(reason: str) -> int:
    """The exit code of a summary reason (kubetune_trainer.outcomes): permanent, preempted or retried."""
    return outcomes.exit_code_for(reason)


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_oom_detail(summary: dict, peak_bytes: int, total_bytes: int, micro_batch: int) -> None:
    """The measured side of an out-of-memory failure in the summary: in its message, and the peak as a field when a
    GPU reported one (the operator scales its estimates by it when it re-plans the layout)."""
    summary["message"] += oom_detail(peak_bytes, total_bytes, micro_batch)
    if peak_bytes:
        summary["peakGpuMemoryBytes"] = peak_bytes


def oom_detail(peak_bytes: int, total_bytes: int, micro_batch: int) -> str:
    """The measured side of an out-of-memory failure, appended to the summary message ('' without a GPU)."""
    if total_bytes <= 0:
        return f" (microBatchSize {micro_batch})"
    gib = 1024 ** 3
    return (f" (peak {peak_bytes / gib:.1f} GiB allocated of {total_bytes / gib:.1f} GiB on the GPU, "
            f"microBatchSize {micro_batch})")


def _gpu_memory() -> tuple[int, int]:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated()), int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - a report detail, never a second failure
        pass
    return 0, 0


def run_worker(plan_path: str | None = None) -> int:
    """One training process: plan → recipe; rank 0 writes the termination summary on every path."""
    _setup_logging()
    if "DS_ACCELERATOR" not in os.environ:
        try:
            import torch

            if not torch.cuda.is_available():
                os.environ["DS_ACCELERATOR"] = "cpu"
        except ImportError:
            pass
    from kubetune_trainer.evaluation import hook as evaluation
    from kubetune_trainer.export import hook as export_hook
    from kubetune_trainer.plan import load_plan
    from kubetune_trainer.recipe import FineTuneRecipe, RunEnv
    from kubetune_trainer.divergence import MESSAGE_PREFIX as DIVERGENCE_PREFIX
    from kubetune_trainer.summary import build_summary, failure_summary, write_summary

    log = logging.getLogger("kubetune_trainer")
    env = RunEnv.from_env()
    reporter = env.rank == 0
    recipe = None
    stop = GracefulStop()
    stop.install()

    def progress() -> dict:
        if recipe is None:
            return {}
        r = recipe.result
        step = getattr(recipe, "step", r.step)
        return {"step": step, "total_steps": r.total_steps,
                "epoch": recipe.epoch_at(step) if hasattr(recipe, "micro_per_epoch") else 0.0,
                "train_loss": r.train_loss, "eval_loss": r.eval_loss, "perplexity": r.perplexity,
                "tokens": r.tokens, "tokens_per_second": r.tokens_per_second,
                "steady_tokens_per_second": r.steady_tokens_per_second,
                "checkpoint": {"step": r.checkpoint_step,
                               "uri": recipe._checkpoint_uri(r.checkpoint_step) if r.checkpoint_step else ""}}

    try:
        stop.adopt_launcher_request(os.environ.get(STOP_FILE_ENV))
        plan = load_plan(resolve_plan_path(plan_path))
        recipe = FineTuneRecipe(plan, env, stop=stop)
        recipe.setup()
        stop.hold()  # SIGTERM from here on: checkpoint at the next step boundary (recipe.train), never mid-export
        eval_set = evaluation.prepare(plan) if reporter else None  # a bad evaluation file fails before training
        result = recipe.train()
        arts = recipe.export()
        exported = export_hook.after_training(recipe) if reporter and plan.output.export is not None else None
        if exported is not None:
            arts = {**arts, **exported.artifacts}
        evaluated = evaluation.after_training(recipe, eval_set) if eval_set is not None else None
        if evaluated is not None:
            arts = {**arts, **evaluated.artifacts}
        recipe.finish_tracking(arts, evaluated.summary if evaluated is not None else None)
        if reporter:
            notes = "; ".join(filter(None, [result.stop_message, *result.warnings]))
            summary = build_summary(status="Succeeded", reason="Completed", message=notes,
                                    artifacts=arts, runtime_seconds=result.runtime_seconds,
                                    evaluation=evaluated.summary if evaluated is not None else None,
                                    export=exported.summary if exported is not None else None,
                                    tracking=recipe.tracker.report() if recipe.tracker is not None else None, **{
                                        k: v for k, v in progress().items() if k != "runtime_seconds"})
            diverged = next((w for w in result.warnings if w.startswith(DIVERGENCE_PREFIX)), "")
            if diverged:  # training.divergence.action warn: the run finished, the operator raises a condition
                summary["divergence"] = diverged
            write_summary(summary)
            log.info("training succeeded: %s", json.dumps(recipe.final_metrics()["artifacts"]))
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure path reports a reason
        if isinstance(exc, KeyboardInterrupt):
            exc = KubetuneTrainerError("interrupted (SIGINT)")
        if isinstance(exc, SystemExit):
            if exc.code in (0, None):
                return 0
            exc = KubetuneTrainerError(str(exc.code))
        summary = failure_summary(exc, **progress())
        if summary["reason"] == "OutOfMemory" and recipe is not None:
            add_oom_detail(summary, *_gpu_memory(), recipe.plan.training.micro_batch_size)
        if isinstance(exc, KubetuneTrainerError):
            log.error("training failed (%s): %s", summary["reason"], exc)
        else:
            log.exception("training failed (%s)", summary["reason"])
        if reporter:
            if recipe is not None and hasattr(recipe, "started"):
                summary["runtimeSeconds"] = round(time.time() - recipe.started, 2)
            write_summary(summary)
        return exit_code_for(summary["reason"])
    finally:
        if recipe is not None:
            recipe.cleanup()
        stop.restore()
