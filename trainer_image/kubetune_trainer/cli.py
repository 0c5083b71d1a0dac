"""`kubetune-train`: launch (pod entrypoint) | run (one worker) | preflight | validate-plan | validate-data."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from kubetune_trainer.errors import KubetuneTrainerError
from kubetune_trainer.launch import launch
from kubetune_trainer.worker import PERMANENT_FAILURE_EXIT, exit_code_for, resolve_plan_path, run_worker

# run_worker and PERMANENT_FAILURE_EXIT are the `run` command's function and exit code.
__all__ = ["PERMANENT_FAILURE_EXIT", "main", "run_worker", "validate_data", "validate_plan"]


def validate_plan(path: str | None) -> int:
    """Print the validated plan (camelCase JSON) or the PlanError; exit 0/3."""
    from kubetune_trainer.plan import load_plan

    try:
        plan = load_plan(resolve_plan_path(path))
    except KubetuneTrainerError as exc:
        print(f"{exc.reason}: {exc}", file=sys.stderr)
        return exit_code_for(exc.reason)
    print(json.dumps(plan.to_json_dict(), indent=2))
    return 0


def validate_data(path: str | None, tokenizer_dir: str | None) -> int:
    """Load the plan's dataset (with the model's tokenizer) and print the data report; exit 0/3."""
    from kubetune_trainer.plan import load_plan

    try:
        plan = load_plan(resolve_plan_path(path))
        from transformers import AutoTokenizer

        from kubetune_trainer import storage
        from kubetune_trainer.data import build_datasets

        source = tokenizer_dir or str(storage.fetch_model(plan.model.uri))
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=plan.model.trust_remote_code)
        prepared = build_datasets(plan.dataset.to_json_dict(), plan.training.to_json_dict(), tokenizer,
                                  plan.training.seed)
    except KubetuneTrainerError as exc:
        print(f"{exc.reason}: {exc}", file=sys.stderr)
        return exit_code_for(exc.reason)
    print(json.dumps(prepared.report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point."""
    parser = argparse.ArgumentParser(prog="kubetune-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("launch", help="pod entrypoint: start one training process per GPU (torchrun)")
    p_run = sub.add_parser("run", help="one training process (reads KUBETUNE_PLAN)")
    p_run.add_argument("--plan", help="plan JSON path (default $KUBETUNE_PLAN)")
    p_pf = sub.add_parser("preflight", help="CPU check before training: model, data, token and step counts "
                          "(termination message JSON)")
    p_pf.add_argument("plan", nargs="?", help="plan JSON path (default $KUBETUNE_PLAN)")
    p_vp = sub.add_parser("validate-plan", help="validate a plan JSON and print it normalised")
    p_vp.add_argument("plan", nargs="?", help="plan JSON path (default $KUBETUNE_PLAN)")
    p_vd = sub.add_parser("validate-data", help="load and tokenize the plan's dataset; print the data report")
    p_vd.add_argument("plan", nargs="?", help="plan JSON path (default $KUBETUNE_PLAN)")
    p_vd.add_argument("--tokenizer", help="tokenizer directory (default: the plan's model)")
    args = parser.parse_args(argv)
    if args.command == "launch":
        return launch()
    if args.command == "run":
        return run_worker(args.plan)
    if args.command == "preflight":
        from kubetune_trainer.preflight import preflight_main

        return preflight_main(args.plan)
    if args.command == "validate-plan":
        return validate_plan(args.plan)
    return validate_data(args.plan, args.tokenizer)


if __name__ == "__main__":
    raise SystemExit(main())
