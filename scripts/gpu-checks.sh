#!/usr/bin/env bash
# The GPU checks, in one prepared script for a lent device machine (the tool library's `device`):
# the GPU tests, the VRAM estimator's accuracy and the trainer's GPU throughput.
#
#   here, once:  ~/.cache/kubetune/venv/bin/python scripts/gpu_wheels.py   # fills .whl/ (git-ignored)
#   there:       device run, carry [".whl"], from the repository root, e.g.
#                  bash scripts/gpu-checks.sh env tests vram-qwen                 (timeout_s 600)
#                  bash scripts/gpu-checks.sh env throughput                      (if time is left)
#                  bash scripts/gpu-checks.sh env cost                            (~3 min)
#                  bash scripts/gpu-checks.sh env memory                          (~5 min: a lease of its own)
#                  bash scripts/gpu-checks.sh env vram-llama                      (a later lease)
#
# Steps, run in the order given (a fresh machine is bare, so every call starts with `env`):
#   env         install the carried wheels into /tmp/site (DeepSpeed from its source archive), then
#               import every package the checks use (stops the call if one fails); pip check, nvidia-smi
#               and pip list -> env.txt
#   tests       pytest -m gpu tests/gpu                                   -> tests.xml
#   vram-qwen   bench/vram_accuracy.py --configs 'qwen*'                  -> vram_accuracy-<gpu>-qwen.json
#   vram-llama  bench/vram_accuracy.py --configs 'llama*'                 -> vram_accuracy-<gpu>-llama.json
#   throughput  bench/train_throughput.py --device cuda, qwen2.5-0.5b (catalog config, random weights),
#               lora, qlora and full                                       -> train_throughput-<gpu>-*.json
#   cost        bench/cost_agreement.py --device cuda, qwen2.5-0.5b lora: six runs of 100-400 steps, each
#               estimated (status.estimate's time) from the runs before it, beside its measured time; the
#               10% agreement of the cost estimate                         -> cost_agreement-<gpu>-qwen2.5-0.5b.json
#   memory      bench/memory_gpu.py, qwen2.5-0.5b lora/qlora/full: measured max_memory_allocated/reserved
#               and tokens/s of the trainer and the plain transformers+peft step, beside the trace and
#               the estimate                                               -> memory_gpu-<gpu>-qwen2.5-0.5b.json
#   memory-1.5b the same for qwen2.5-1.5b                                  -> memory_gpu-<gpu>-qwen2.5-1.5b.json
#   memory-phi3 the same for phi-3-mini-4k lora/qlora (untied embeddings: the table in host memory) and
#               lora with the table on the GPU                             -> memory_gpu-<gpu>-phi-3-mini-4k.json
#   local       for a dry run on a machine without the wheels: use the Python and packages already there
# Each step has its own time limit (STEP_TIMEOUT_<STEP>, seconds). Everything goes to $OUT (at most 8
# files come back): summary.txt (one line per step: rc, seconds), steps.log (all output), the JSON files.
# Copy the JSON files into bench/results/ here; they name the GPU they were measured on.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/.out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
site=/tmp/site
log="$out/steps.log"
summary="$out/summary.txt"

gpu_slug() {
    "$py" - <<'EOF'
import re
try:
    import torch
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:
    name = "unknown"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
}

step() {  # step NAME TIMEOUT CMD...: run, log, record rc and duration
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    if declare -F "$1" >/dev/null; then
        "$@" >>"$log" 2>&1  # a function of this script (install_env, smoke): bounded by its own commands
    else
        timeout --kill-after=20 "$limit" "$@" >>"$log" 2>&1
    fi
    local rc=$?
    echo "$name rc=$rc ${limit:+limit=${limit}s} took=$((SECONDS - t0))s" | tee -a "$summary" "$log"
    return $rc
}

install_env() {
    timeout 200 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || return 3
    local sdist
    for sdist in .whl/*.tar.gz; do
        [ -e "$sdist" ] || continue
        # DeepSpeed builds no ops ahead of time (DS_BUILD_OPS=0): they are compiled on first use.
        DS_BUILD_OPS=0 timeout 200 "$py" -m pip install -q --no-index --no-deps --no-build-isolation \
            --no-cache-dir --target "$site" "$sdist" || return 4
    done
}

smoke() {
    "$py" - <<'EOF'
import importlib, sys
mods = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "liger_kernel", "optimi",
        "deepspeed", "pydantic", "yaml", "kubetune.sizing", "kubetune.builders", "kubetune_trainer.recipe",
        "kubetune_trainer.memtrace"]
bad = 0
for name in mods:
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '')}")
    except Exception as exc:
        bad += 1
        print(f"IMPORT FAILED {name}: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(1 if bad else 0)
EOF
}

catalog_config() {  # catalog_config MODEL FILE: the catalog's config.json for a model id
    "$py" - "$1" "$2" <<'EOF'
import json, sys
from kubetune.sizing import lookup_catalog
arch = lookup_catalog(sys.argv[1])
if arch is None:
    sys.exit(f"{sys.argv[1]} is not in the sizing catalog")
json.dump(dict(arch.config), open(sys.argv[2], "w"), indent=1)
EOF
}

if [ $# -eq 0 ]; then
    sed -n '2,28p' "$0"
    exit 2
fi
export PYTHONPATH="$site:$root/operator:$root/trainer_image:$root/devtools${PYTHONPATH:+:$PYTHONPATH}"
status=0
for s in "$@"; do
    case $s in
    env)
        step install 400 install_env || { status=1; break; }
        step imports 120 smoke || { status=1; break; }
        { "$py" -m pip check; nvidia-smi; "$py" -m pip list; } >"$out/env.txt" 2>&1
        ;;
    local)
        py=${PYTHON:-python}
        export PYTHONPATH="$root/operator:$root/trainer_image:$root/devtools"  # the packages already there, not /tmp/site
        step imports 120 smoke || { status=1; break; }
        ;;
    tests)
        step tests "${STEP_TIMEOUT_TESTS:-480}" "$py" -m pytest -m gpu tests/gpu -v -rs -p no:cacheprovider \
            --junitxml "$out/tests.xml" || status=1
        ;;
    vram-qwen | vram-llama)
        family=${s#vram-}
        step "$s" "${STEP_TIMEOUT_VRAM:-420}" "$py" bench/vram_accuracy.py --configs "${family}*" \
            --out "$out/vram_accuracy-$(gpu_slug)-$family.json" || status=1
        ;;
    throughput)
        cfg=/tmp/qwen2.5-0.5b-config.json
        catalog_config qwen2.5-0.5b "$cfg" || { status=1; continue; }
        for method in lora qlora full; do
            step "throughput-$method" "${STEP_TIMEOUT_THROUGHPUT:-150}" "$py" bench/train_throughput.py \
                --device cuda --model "$cfg" --method "$method" --steps "${THROUGHPUT_STEPS:-40}" \
                --out "$out/train_throughput-$(gpu_slug)-qwen2.5-0.5b-$method.json" || status=1
        done
        ;;
    cost)
        cfg=/tmp/qwen2.5-0.5b-config.json
        catalog_config qwen2.5-0.5b "$cfg" || { status=1; continue; }
        step cost "${STEP_TIMEOUT_COST:-360}" "$py" bench/cost_agreement.py --device cuda --model "$cfg" \
            --method lora --cpus 4 --out "$out/cost_agreement-$(gpu_slug)-qwen2.5-0.5b.json" || status=1
        ;;
    memory | memory-1.5b | memory-phi3)
        model=qwen2.5-0.5b
        [ "$s" = memory-1.5b ] && model=qwen2.5-1.5b
        [ "$s" = memory-phi3 ] && model=phi-3-mini-4k
        step "$s" "${STEP_TIMEOUT_MEMORY:-420}" "$py" bench/memory_gpu.py --configs "$model-*" \
            --steps "${MEMORY_STEPS:-6}" --out "$out/memory_gpu-$(gpu_slug)-$model.json" || status=1
        ;;
    *)
        echo "unknown step: $s" >&2
        exit 2
        ;;
    esac
done
echo "gpu-checks: done, status $status (summary: $summary)" | tee -a "$log"
exit $status
