#!/usr/bin/env bash
# Builds the pinned local control plane into a cache outside the repo:
#   kube-apiserver, kube-controller-manager, kube-scheduler, etcd (from components/go.mod),
#   kwok and helm (go install at the versions below).
# Reuses the binaries when the pins are unchanged; rebuilds when they change.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.17.3
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export GOMODCACHE=${GOMODCACHE_OVERRIDE:-$cache/gomod}
export GOCACHE=$cache/gobuild
export GOFLAGS=-mod=mod
export CGO_ENABLED=0
stamp_src=$( { cat "$here/components/go.mod" "$here/components/go.sum" "$here/components/cmd/etcd/main.go"; echo "$KWOK_VERSION $HELM_VERSION"; } | sha256sum | cut -c1-16)
bin=$cache/bin/$stamp_src
if [[ -f $bin/.complete ]]; then
  [[ $(readlink "$cache/bin/current" 2>/dev/null) == "$bin" ]] || ln -sfn "$bin" "$cache/bin/current"
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
start=$(date +%s)
# Stamp the Kubernetes version into the binaries, as the upstream release build does,
# so /version reports it (kubectl's skew checks and feature gates read it).
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/components/go.mod")
[[ -n $k8s_version ]] || k8s_version=$(grep -oE 'k8s.io/kubernetes v[0-9.]+' "$here/components/go.mod" | awk '{print $2}')
vpkg=k8s.io/component-base/version
minor=$(echo "$k8s_version" | cut -d. -f2)
k8s_version_flags="-X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
(
  cd "$here/components"
  for cmd in k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
             k8s.io/kubernetes/cmd/kube-scheduler ./cmd/etcd; do
    name=$(basename "$cmd")
    [[ -x $bin/$name ]] || { echo "building $name" >&2; go build -trimpath -ldflags="-s -w $k8s_version_flags" -o "$bin/$name" "$cmd"; }
  done
)
[[ -x $bin/kwok ]] || { echo "building kwok $KWOK_VERSION" >&2; GOBIN=$bin go install -trimpath -ldflags='-s -w' "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"; }
[[ -x $bin/helm ]] || { echo "building helm $HELM_VERSION" >&2; GOBIN=$bin go install -trimpath -ldflags='-s -w' "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"; }
echo "built in $(( $(date +%s) - start ))s" >&2
touch "$bin/.complete"
ln -sfn "$bin" "$cache/bin/current"
echo "$bin"
