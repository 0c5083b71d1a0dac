"""`kubetune convert CONFIG`: write the FineTuneJob equivalent of an Axolotl, TRL or LLaMA-Factory config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import FORMATS, ConvertError, Options, convert_file


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetune convert",
        description="Convert an Axolotl YAML, a TRL SFTConfig / TrainingArguments JSON or YAML, or a LLaMA-Factory "
                    "YAML into a FineTuneJob. Settings without an equivalent are listed with the reason (in the "
                    "output's header and on stderr).")
    p.add_argument("config", help="the config file (.yaml, .yml or .json)")
    p.add_argument("--from", dest="source", choices=sorted(FORMATS), default="",
                   help="the config's format (default: detected from its keys)")
    p.add_argument("--name", default="", help="metadata.name of the FineTuneJob (default: the file's name)")
    p.add_argument("--model-uri", default="", help="model location in the cluster (pvc://, s3://, hf://); needed "
                                                   "when the config names a local path")
    p.add_argument("--dataset-uri", default="", help="training data location (pvc://claim/file.jsonl, s3://, "
                                                     "hf://datasets/org/name); needed for local files")
    p.add_argument("--eval-uri", default="", help="evaluation data location")
    p.add_argument("--output-uri", default="", help="where outputs go (default: pvc://outputs/<name>)")
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any setting was not expressed")
    return p


def main(argv: list[str]) -> int:
    """Entry point of `kubetune convert`."""
    args = _parser().parse_args(argv)
    options = Options(name=args.name, model_uri=args.model_uri, dataset_uri=args.dataset_uri,
                      eval_uri=args.eval_uri, output_uri=args.output_uri)
    try:
        draft = convert_file(args.config, options, args.source)
        text = draft.render()
    except (ConvertError, OSError) as exc:
        print(f"kubetune convert: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    for dropped in draft.dropped:
        print(f"not expressed: {dropped.line()}", file=sys.stderr)
    return 1 if args.strict and draft.dropped else 0
