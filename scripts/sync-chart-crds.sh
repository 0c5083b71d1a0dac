#!/usr/bin/env bash
# Copies the CRDs from crds/ (the single source of truth) into the Helm chart's crds/ directory,
# byte for byte, and removes chart copies whose source is gone.
# tests/unit/test_chart_static.py fails when the two directories differ.
# Usage: scripts/sync-chart-crds.sh [--check]   (--check: only report differences, exit 1 if any)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/crds
dst=$root/charts/kubetune/crds
check=false
[[ ${1:-} == --check ]] && check=true

shopt -s nullglob
sources=("$src"/*.yaml)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "sync-chart-crds: no CRDs in $src" >&2
  exit 1
fi
mkdir -p "$dst"
status=0
for f in "${sources[@]}"; do
  name=$(basename "$f")
  if ! cmp -s "$f" "$dst/$name"; then
    if $check; then echo "differs: crds/$name" >&2; status=1; else cp "$f" "$dst/$name"; echo "copied crds/$name" >&2; fi
  fi
done
for f in "$dst"/*.yaml; do
  name=$(basename "$f")
  if [[ ! -f $src/$name ]]; then
    if $check; then echo "stale: charts/kubetune/crds/$name" >&2; status=1; else rm "$f"; echo "removed stale $name" >&2; fi
  fi
done
exit $status
