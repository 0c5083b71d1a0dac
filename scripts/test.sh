#!/usr/bin/env bash
# Runs the whole test suite (unit, integration, e2e; gpu tests skip with a reason without CUDA).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m unit`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
eval "$("$root/scripts/bootstrap.sh")"
cd "$root"
set +e
python -m pytest -p no:cacheprovider --durations=25 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit $rc
