#!/usr/bin/env bash
# The local demo: sets everything up (first run: Python deps and the control plane build),
# starts a real local control plane, installs the CRD, runs the operator and a process node,
# applies examples/quickstart.yaml and follows it until the adapter is trained.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
eval "$("$root/scripts/bootstrap.sh")"
cd "$root"
exec python -m kubetune_dev demo "$@"
