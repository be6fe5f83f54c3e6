package kubenode_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
	"github.com/shuntmesh/shunt/test/kubenode"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return c
}

// A real node runs real pods: the kubelet registers, containerd starts the
// sandboxes and containers from the images made here, the bridge gives them
// addresses of the private subnet, a pod reaches another pod, the pod's
// processes sit in the kubelet's cgroupfs layout below the node's cgroup
// root, and a Service VIP is unreachable from a pod (no kube-proxy, no
// default route). Cleanup leaves the machine as it was.
func TestNodeRunsPods(t *testing.T) {
	kubenode.CheckHost(t, "node", func(t *testing.T) {
		cp := kube.Start(t, kube.Options{})
		n := kubenode.Start(t, cp, kubenode.Options{})
		c := ctx(t)
		if err := cp.Admin().Namespace(c, "demo", nil); err != nil {
			t.Fatal(err)
		}
		srv, err := n.RunPod(c, n.NewPod("demo", "server", nil, kubenode.ServeContainer(8080)))
		if err != nil {
			t.Fatal(err)
		}
		cli, err := n.RunPod(c, n.NewPod("demo", "client", nil, kubenode.AppContainer("app", "pause")))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{srv.Status.PodIP, cli.Status.PodIP} {
			if a, err := netip.ParseAddr(p); err != nil || !kubenode.PodSubnet.Contains(a) {
				t.Errorf("pod IP %q not in %s", p, kubenode.PodSubnet)
			}
		}
		out, err := n.Exec(c, cli, "app", kubenode.AppPath, "connect", "--target", srv.Status.PodIP+":8080", "--count", "3")
		if err != nil {
			t.Fatal(err)
		}
		r, err := harness.ParseConnectResult(out)
		if err != nil || r.OK != 3 || r.Backends["server"] != 3 {
			t.Fatalf("client -> server pod: %v %s", err, out)
		}
		// No kube-proxy and no default route: a VIP is unreachable.
		out, err = n.Exec(c, cli, "app", kubenode.AppPath, "connect", "--target", "10.96.0.1:443", "--count", "1")
		if err != nil {
			t.Fatal(err)
		}
		if r, _ := harness.ParseConnectResult(out); r.OK != 0 || r.Errors["ENETUNREACH"] != 1 {
			t.Errorf("the kubernetes Service VIP from a pod: %s, want ENETUNREACH", out)
		}
		// The kubelet's cgroupfs layout below the node's cgroup root.
		out, err = n.Exec(c, cli, "app", kubenode.AppPath, "info")
		if err != nil {
			t.Fatal(err)
		}
		var info harness.ProcInfo
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatal(err)
		}
		cid, _ := kubenode.ContainerID(cli, "app")
		if want := fmt.Sprintf("%s/kubepods/besteffort/pod%s/%s", n.CgroupRoot(), cli.UID, cid); info.Cgroup != want {
			t.Errorf("exec'd process cgroup %s, want %s", info.Cgroup, want)
		}
		pid, err := n.ContainerPID(c, cli, "app")
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			if !strings.HasSuffix(line, ":"+info.Cgroup) {
				t.Errorf("container process: cgroup line %q, want %s in every hierarchy", line, info.Cgroup)
			}
		}
		if err := n.DeletePod(c, srv); err != nil {
			t.Fatal(err)
		}
	})
}
