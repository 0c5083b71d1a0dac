"""`python -m kubetune_trainer.memtrace`: trace one training step and print the report as JSON.

The operator's `kubetune estimate --trace` runs this in a subprocess (the operator package never imports the
trainer or torch): the request is the keyword arguments of `plan_settings` plus a model config.json, the
answer `{"report": ..., "text": ...}`, or `{"error": ...}` with exit code 2 when the architecture cannot be
traced (the caller then keeps the analytic estimate and says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m kubetune_trainer.memtrace", description=__doc__)
    p.add_argument("--settings", required=True, help="JSON object: keyword arguments of plan_settings()")
    p.add_argument("--config", required=True, help="a model's config.json (path)")
    p.add_argument("--model-name", default="", help="name shown in the report")
    args = p.parse_args(argv)
    from kubetune_trainer.memtrace import TraceError, plan_settings, trace_step

    settings = json.loads(args.settings)
    config = json.loads(Path(args.config).read_text())
    try:
        report = trace_step(plan_settings(**settings), config, model_name=args.model_name)
    except TraceError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps({"report": report.to_dict(), "text": report.format_text("  ")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
