// The pod sandbox's pause process for the real node of the test cluster (hack/node/node-up.sh):
// it holds the pod's namespaces, reaps orphaned children as PID 1, and exits on SIGINT or SIGTERM.
// Upstream's pause image lives in a container registry, which these machines cannot reach.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	children := make(chan os.Signal, 16)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
