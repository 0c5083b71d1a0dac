//go:build tools

// Package tools pins the Kueue controller manager that the local devcluster runs on request.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
