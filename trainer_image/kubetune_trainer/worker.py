"""One training process: plan → recipe → outputs; rank 0 writes the termination summary on every path.

`kubetune-train run` calls `run_worker` (torchrun starts one per GPU); `launch` calls it in-process for a
1 x 1 run. The exit codes follow docs/contracts.md §5.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from kubetune_trainer.errors import KubetuneTrainerError

DEFAULT_PLAN_PATH = "/etc/kubetune/plan.json"
PERMANENT_FAILURE_EXIT = 3  # InvalidPlan / DataError: a retry cannot fix them (contracts §5)
PERMANENT_REASONS = ("InvalidPlan", "DataError")


def resolve_plan_path(arg: str | None) -> str:
    """The plan file: `arg`, else $KUBETUNE_PLAN, else the path the operator mounts it at."""
    return arg or os.environ.get("KUBETUNE_PLAN") or DEFAULT_PLAN_PATH


def exit_code_for(reason: str) -> int:
    """3 for failures a retry cannot fix, 1 for the rest."""
    return PERMANENT_FAILURE_EXIT if reason in PERMANENT_REASONS else 1


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(f"terminated by signal {signum} (preemption or deletion); the run resumes from "
                     "the latest checkpoint when restarted")


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
    from kubetune_trainer.plan import load_plan
    from kubetune_trainer.recipe import FineTuneRecipe, RunEnv
    from kubetune_trainer.summary import build_summary, failure_summary, write_summary

    log = logging.getLogger("kubetune_trainer")
    env = RunEnv.from_env()
    reporter = env.rank == 0
    recipe = None
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)

    def progress() -> dict:
        if recipe is None:
            return {}
        r = recipe.result
        return {"step": getattr(recipe, "step", r.step), "total_steps": r.total_steps,
                "epoch": recipe.epoch_at(recipe.step) if hasattr(recipe, "micro_per_epoch") else 0.0,
                "train_loss": r.train_loss, "eval_loss": r.eval_loss, "perplexity": r.perplexity,
                "tokens": r.tokens, "tokens_per_second": r.tokens_per_second,
                "checkpoint": {"step": r.checkpoint_step,
                               "uri": recipe._checkpoint_uri(r.checkpoint_step) if r.checkpoint_step else ""}}

    try:
        plan = load_plan(resolve_plan_path(plan_path))
        recipe = FineTuneRecipe(plan, env)
        recipe.setup()
        result = recipe.train()
        arts = recipe.export()
        if reporter:
            write_summary(build_summary(status="Succeeded", reason="Completed", message=result.stop_message,
                                        artifacts=arts, runtime_seconds=result.runtime_seconds, **{
                                            k: v for k, v in progress().items() if k != "runtime_seconds"}))
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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
