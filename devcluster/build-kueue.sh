#!/usr/bin/env bash
# Builds the pinned Kueue controller manager (kueue/go.mod) into the same cache as build.sh,
# under bin/kueue-<stamp>/, and prints that directory. It holds:
#   kueue            the controller manager binary
#   crds/            Kueue's CRDs as shipped in the pinned module
#   webhook.yaml     Kueue's webhook configurations as shipped in the pinned module
# Reuses the directory when the pins are unchanged. Built only when a test asks for Kueue.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export GOMODCACHE=${GOMODCACHE_OVERRIDE:-$cache/gomod}
export GOCACHE=$cache/gobuild
export GOFLAGS=-mod=mod
export CGO_ENABLED=0
stamp=$(cat "$here/kueue/go.mod" "$here/kueue/go.sum" "$here/kueue/tools.go" | sha256sum | cut -c1-16)
out=$cache/bin/kueue-$stamp
if [[ -f $out/.complete ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
start=$(date +%s)
cd "$here/kueue"
version=$(grep -oE '^(require )?[[:space:]]*sigs\.k8s\.io/kueue v[^ ]+' go.mod | awk '{print $NF}')
[[ -n $version ]] || { echo "sigs.k8s.io/kueue is not pinned in kueue/go.mod" >&2; exit 1; }
echo "building kueue $version" >&2
go build -trimpath -ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" -o "$out/kueue.tmp" sigs.k8s.io/kueue/cmd/kueue
mv "$out/kueue.tmp" "$out/kueue"
src=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
rm -rf "$out/crds" && mkdir -p "$out/crds"
cp "$src"/config/components/crd/bases/kueue.x-k8s.io_*.yaml "$out/crds/"
cp "$src/config/components/webhook/manifests.yaml" "$out/webhook.yaml"
chmod -R u+w "$out"
echo "kueue built in $(( $(date +%s) - start ))s" >&2
touch "$out/.complete"
echo "$out"
