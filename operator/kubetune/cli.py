"""The `kubetune` command: dispatches to subcommands implemented in their own modules."""

from __future__ import annotations

import importlib
import sys
from typing import Mapping, Sequence

# subcommand -> (module, help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "estimate": ("kubetune.sizing.cli", "estimate GPU memory and size a job (no cluster needed)"),
    "operator": ("kubetune.main", "run the operator"),
    "convert": ("kubetune.convert.cli", "convert an Axolotl, TRL or LLaMA-Factory config into a FineTuneJob"),
}


def dispatch(prog: str, subcommands: Mapping[str, tuple[str, str]], argv: Sequence[str]) -> int:
    """Run `prog <command> [args]`: import the command's module and call its `main(args)`."""
    argv = list(argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in subcommands:
        print(f"usage: {prog} <command> [args]\n\ncommands:")
        for name, (_, text) in subcommands.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(subcommands[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kubetune`."""
    return dispatch("kubetune", SUBCOMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
