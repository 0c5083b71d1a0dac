"""The `kubetune` command: dispatches to subcommands implemented in their own modules."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "estimate": ("kubetune.sizing.cli", "estimate GPU memory and size a job (no cluster needed)"),
    "cluster": ("kubetune.devcluster.cli", "start/stop the local control plane (real apiserver, etcd, KWOK)"),
    "operator": ("kubetune.main", "run the operator"),
    "node": ("kubetune.devcluster.process_node", "run a local process node that executes pods as processes"),
    "demo": ("kubetune.demo", "the end-to-end local demo"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in SUBCOMMANDS:
        print("usage: kubetune <command> [args]\n\ncommands:")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
