"""The `kubetune-dev` command (also `python -m kubetune_dev`): the development tools' subcommands."""

from __future__ import annotations

import sys

from kubetune.cli import dispatch

# subcommand -> (module, help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "cluster": ("kubetune_dev.devcluster.cli", "start/stop the local control plane (real apiserver, etcd, KWOK)"),
    "node": ("kubetune_dev.devcluster.process_node", "run a local process node that executes pods as processes"),
    "demo": ("kubetune_dev.demo", "the end-to-end local demo"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kubetune-dev`."""
    return dispatch("kubetune-dev", SUBCOMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
