//go:build tools

// Package tools pins the Kubeflow Trainer and JobSet controller managers that the operator-scale
// benchmark runs beside kubetune.
package tools

import (
	_ "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager"
	_ "sigs.k8s.io/jobset"
)
