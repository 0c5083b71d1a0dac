#!/usr/bin/env bash
# Builds the pinned Kubeflow Trainer and JobSet controller managers (kubeflow/go.mod) into the same
# cache as build.sh, under bin/kubeflow-<stamp>/, and prints that directory. It holds:
#   trainer-controller-manager, jobset-controller-manager   the two manager binaries
#   crds/trainer/, crds/jobset/                              their CRDs as shipped in the pinned modules
#   webhooks/trainer.yaml, webhooks/jobset.yaml              their webhook configurations, as shipped
# Reuses the directory when the pins are unchanged. Built only when the peer benchmark asks for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export GOMODCACHE=${GOMODCACHE_OVERRIDE:-$cache/gomod}
export GOCACHE=$cache/gobuild
export GOFLAGS=-mod=mod
export CGO_ENABLED=0
stamp=$(cat "$here/kubeflow/go.mod" "$here/kubeflow/go.sum" "$here/kubeflow/tools.go" "$0" | sha256sum | cut -c1-16)
out=$cache/bin/kubeflow-$stamp
if [[ -f $out/.complete ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
start=$(date +%s)
cd "$here/kubeflow"
for pair in "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager trainer-controller-manager" \
            "sigs.k8s.io/jobset jobset-controller-manager"; do
  set -- $pair
  [[ -x $out/$2 ]] && continue
  echo "building $2" >&2
  go build -trimpath -ldflags='-s -w' -o "$out/$2.tmp" "$1"
  mv "$out/$2.tmp" "$out/$2"
done
trainer=$(go list -m -f '{{.Dir}}' github.com/kubeflow/trainer/v2)
jobset=$(go list -m -f '{{.Dir}}' sigs.k8s.io/jobset)
rm -rf "$out/crds" "$out/webhooks" && mkdir -p "$out/crds/trainer" "$out/crds/jobset" "$out/webhooks"
cp "$trainer"/manifests/base/crds/trainer.kubeflow.org_*.yaml "$out/crds/trainer/"
cp "$jobset"/config/components/crd/bases/jobset.x-k8s.io_*.yaml "$out/crds/jobset/"
cp "$trainer/manifests/base/webhook/manifests.yaml" "$out/webhooks/trainer.yaml"
cp "$jobset/config/components/webhook/manifests.yaml" "$out/webhooks/jobset.yaml"
chmod -R u+w "$out"
echo "kubeflow managers built in $(( $(date +%s) - start ))s" >&2
touch "$out/.complete"
echo "$out"
