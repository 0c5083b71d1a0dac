//go:build tools

// Package components pins the upstream Kubernetes control-plane commands that
// devcluster builds (see build.sh). Nothing here is compiled into a program.
package components

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
