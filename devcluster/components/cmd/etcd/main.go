// Command etcd is the upstream etcd server, built from the same pinned module
// graph as the Kubernetes components so its version matches what the
// apiserver was released against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
