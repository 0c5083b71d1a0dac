#!/usr/bin/env bash
# Sets up everything kubetune needs on a fresh machine, idempotently:
#   - a virtualenv with the operator, trainer and dev dependencies and the development tools
#     (devtools/: `kubetune-dev`), outside the clone under ~/.cache/kubetune so repeat runs are quick,
#     reinstalled when pyproject.toml or devtools/pyproject.toml changes;
#   - llama-cpp-python (built from source once, then from the cached wheel);
#   - MLflow, for the tracking tests, in a virtualenv of its own (~/.cache/kubetune/mlflow-venv);
#   - the pinned local control plane binaries (devcluster/build.sh).
# Prints nothing on stdout but `export` lines, so callers can `eval "$(scripts/bootstrap.sh)"`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
venv=$cache/venv
mkdir -p "$cache"
export PIP_CACHE_DIR=$cache/pip
log() { echo "[bootstrap] $*" >&2; }

# The control-plane build (Go, minutes when cold) runs while pip installs; its output is the bin dir.
build_out=$(mktemp) build_err=$(mktemp)
"$root/devcluster/build.sh" >"$build_out" 2>"$build_err" &
build_pid=$!
trap 'kill $build_pid 2>/dev/null || true; rm -f "$build_out" "$build_err"' EXIT

if [[ ! -x $venv/bin/python ]]; then
  log "creating virtualenv $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
fi
stamp=$(cat "$root/pyproject.toml" "$root/devtools/pyproject.toml" | sha256sum | cut -c1-16)
if [[ ! -f $venv/.deps-$stamp ]]; then
  log "installing Python dependencies (first run downloads PyTorch: several GB)"
  "$venv/bin/pip" install -q -e "$root[operator,trainer,dev]" -e "$root/devtools" >&2
  # DeepSpeed's setup imports torch, so it builds against the torch installed above.
  DS_BUILD_OPS=0 "$venv/bin/pip" install -q --no-build-isolation \
    "$(python3 -c 'import tomllib,sys;print(tomllib.load(open(sys.argv[1],"rb"))["project"]["optional-dependencies"]["deepspeed"][0])' "$root/pyproject.toml")" >&2
  # llama.cpp's quantizer (q4_k_m export and the tests that run llama.cpp on exported files): built from
  # source once (~12 min on 2 cores), then installed from the wheel pip caches under $PIP_CACHE_DIR.
  log "installing llama-cpp-python (built from source on the first run)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$venv/bin/pip" install -q \
    "$(python3 -c 'import tomllib,sys;print(tomllib.load(open(sys.argv[1],"rb"))["project"]["optional-dependencies"]["llama-cpp"][0])' "$root/pyproject.toml")" >&2
  rm -f "$venv"/.deps-*
  touch "$venv/.deps-$stamp"
else
  # The venv is shared between clones: point the editable install at this one.
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" -e "$root/devtools" >&2
fi

# The MLflow tracking server the tracking tests run (tests/support/mlflow_server.py): in its own virtualenv,
# because mlflow pins packages the trainer also uses. The trainer itself talks to MLflow's REST API only.
mlflow_venv=$cache/mlflow-venv
mlflow_pin=mlflow==3.17.2
if [[ ! -f $mlflow_venv/.installed-$mlflow_pin ]]; then
  log "installing $mlflow_pin into $mlflow_venv (tracking tests)"
  rm -rf "$mlflow_venv" && python3 -m venv "$mlflow_venv"
  "$mlflow_venv/bin/pip" install -q "$mlflow_pin" >&2
  touch "$mlflow_venv/.installed-$mlflow_pin"
fi

if [[ $(id -u) -eq 0 ]] || sudo -n true 2>/dev/null; then "$root/scripts/install-system-deps.sh" >&2; fi  # prometheus + promtool for the monitoring tests
if ! wait $build_pid; then
  cat "$build_err" >&2
  log "devcluster/build.sh failed"
  exit 1
fi
grep -v '^go: downloading' "$build_err" >&2 || true
bin=$(tail -n1 "$build_out")
echo "export PATH=\"$venv/bin:$bin:\$PATH\""
echo "export KUBETUNE_BIN_DIR=\"$bin\""
echo "export VIRTUAL_ENV=\"$venv\""
