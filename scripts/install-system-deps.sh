#!/usr/bin/env bash
# Installs the system packages kubetune's tests use that are not Python packages:
#   - prometheus (Debian package; brings promtool) for the monitoring tests.
# Idempotent: does nothing when `prometheus --version` already works.
# Needs root (or passwordless sudo); prints progress on stderr only.
set -euo pipefail
log() { echo "[install-system-deps] $*" >&2; }

if prometheus --version >/dev/null 2>&1 && promtool --version >/dev/null 2>&1; then
  log "prometheus and promtool already installed"
  exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  log "not root and no passwordless sudo: skipping (monitoring tests will skip)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  log "apt-get not found: install prometheus (with promtool) by hand; monitoring tests will skip"
  exit 0
fi

log "installing prometheus with apt-get"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q >&2
# --no-install-recommends keeps out the exporters and web assets the tests do not need.
"${as_root[@]}" apt-get install -y -q --no-install-recommends prometheus >&2
prometheus --version >&2
