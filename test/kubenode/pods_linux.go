package kubenode

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shuntmesh/shunt/test/kube"
)

// AppContainer is a container of AppImage running `podapp <app> args`
// (harness apps: serve, connect, stream, info, pause, sidecar). $(POD_NAME)
// and $(POD_IP) in args expand to the pod's name and address.
func AppContainer(name, app string, args ...string) corev1.Container {
	return corev1.Container{
		Name:            name,
		Image:           AppImage,
		ImagePullPolicy: corev1.PullNever,
		Command:         append([]string{AppPath, app}, args...),
		Env: []corev1.EnvVar{
			{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
		},
	}
}

// ServeContainer is a server answering with its pod's name on TCP port
// (podapp serve), Ready when the port accepts connections.
func ServeContainer(port int) corev1.Container {
	c := AppContainer("app", "serve", "--id", "$(POD_NAME)", "--listen", "0.0.0.0:"+strconv.Itoa(port))
	c.ReadinessProbe = &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(int32(port))}},
		PeriodSeconds: 1,
	}
	return c
}

// NewPod returns a Pod bound to this node: no ServiceAccount token, no
// service links, the host's resolv.conf, 1 second of termination grace.
func (n *Node) NewPod(ns, name string, labels map[string]string, containers ...corev1.Container) *corev1.Pod {
	p := &corev1.Pod{}
	p.Name, p.Namespace, p.Labels = name, ns, labels
	p.Spec.NodeName = n.name
	p.Spec.AutomountServiceAccountToken = new(bool)
	p.Spec.EnableServiceLinks = new(bool)
	p.Spec.DNSPolicy = corev1.DNSDefault
	grace := int64(1)
	p.Spec.TerminationGracePeriodSeconds = &grace
	p.Spec.Containers = containers
	return p
}

// RunPod creates pod and waits until it is Ready; it returns the pod as the
// API server has it (with its UID, IP and container IDs).
func (n *Node) RunPod(ctx context.Context, pod *corev1.Pod) (*corev1.Pod, error) {
	if err := n.c.Create(ctx, pod); err != nil {
		return nil, err
	}
	return n.WaitPodReady(ctx, pod.Namespace, pod.Name)
}

// WaitPodReady waits until the pod's Ready condition is true and every
// container has an ID.
func (n *Node) WaitPodReady(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		p := &corev1.Pod{}
		p.Name, p.Namespace = name, ns
		err := n.c.Get(ctx, p)
		if err == nil && podReady(p) {
			return p, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pod %s/%s not ready (%v): phase %s, statuses %+v\n%s", ns, name, err, p.Status.Phase,
				p.Status.ContainerStatuses, n.Tail("kubelet.log", 20))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func podReady(p *corev1.Pod) bool {
	ready := false
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	if !ready || p.Status.PodIP == "" || len(p.Status.ContainerStatuses) != len(p.Spec.Containers) {
		return false
	}
	for _, cs := range p.Status.ContainerStatuses {
		if cs.ContainerID == "" {
			return false
		}
	}
	return true
}

// DeletePod force-deletes pod (there is no controller manager) and waits
// until the runtime has no running task of its containers any more.
func (n *Node) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	var ids []string
	for _, cs := range pod.Status.ContainerStatuses {
		ids = append(ids, containerID(cs.ContainerID))
	}
	if err := n.c.Delete(ctx, pod); err != nil && !kube.NotFound(err) {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		running, err := n.runningTasks(ctx)
		if err != nil {
			return err
		}
		left := 0
		for _, id := range ids {
			if _, ok := running[id]; ok {
				left++
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pod %s/%s: %d containers still running", pod.Namespace, pod.Name, left)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// runningTasks maps the runtime's running task ids to their PIDs.
func (n *Node) runningTasks(ctx context.Context) (map[string]int, error) {
	out, err := n.ctrRun(ctx, "tasks", "ls")
	if err != nil {
		return nil, err
	}
	m := map[string]int{}
	for _, line := range strings.Split(out, "\n")[1:] { // TASK PID STATUS
		f := strings.Fields(line)
		if len(f) == 3 && f[2] == "RUNNING" {
			if pid, err := strconv.Atoi(f[1]); err == nil {
				m[f[0]] = pid
			}
		}
	}
	return m, nil
}

// containerID strips the runtime prefix of a container status's ID
// ("containerd://<id>").
func containerID(s string) string {
	if _, id, ok := strings.Cut(s, "://"); ok {
		return id
	}
	return s
}

// ContainerID is the runtime's ID of container in pod (from its status).
func ContainerID(pod *corev1.Pod, container string) (string, error) {
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == container && cs.ContainerID != "" {
			return containerID(cs.ContainerID), nil
		}
	}
	return "", fmt.Errorf("pod %s/%s: no container %q with an ID", pod.Namespace, pod.Name, container)
}

// ContainerPID is the host PID of container's main process.
func (n *Node) ContainerPID(ctx context.Context, pod *corev1.Pod, container string) (int, error) {
	id, err := ContainerID(pod, container)
	if err != nil {
		return 0, err
	}
	tasks, err := n.runningTasks(ctx)
	if err != nil {
		return 0, err
	}
	pid, ok := tasks[id]
	if !ok {
		return 0, fmt.Errorf("pod %s/%s container %s: no running task %s", pod.Namespace, pod.Name, container, id)
	}
	return pid, nil
}

// Exec is a process running in a container (like kubectl exec: runc exec
// joins the container's namespaces and cgroups).
type Exec struct {
	n      *Node
	id     string // exec id
	cid    string // container id
	cmd    *exec.Cmd
	stdout bytes.Buffer
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

// StartExec starts args in container of pod.
func (n *Node) StartExec(pod *corev1.Pod, container string, args ...string) (*Exec, error) {
	cid, err := ContainerID(pod, container)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	n.execs++
	id := fmt.Sprintf("shunt-exec-%d", n.execs)
	n.mu.Unlock()
	e := &Exec{n: n, id: id, cid: cid, done: make(chan struct{})}
	e.cmd = n.ctrCmd(context.Background(), append([]string{"tasks", "exec", "--fifo-dir", filepath.Join(n.dir, "fifo"), "--exec-id", id, cid}, args...)...)
	e.cmd.Stdout, e.cmd.Stderr = &e.stdout, &e.stderr
	if err := e.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		e.err = e.cmd.Wait()
		close(e.done)
	}()
	return e, nil
}

// Signal sends sig to the exec'd process (through the runtime).
func (e *Exec) Signal(ctx context.Context, sig syscall.Signal) error {
	_, err := e.n.ctrRun(ctx, "tasks", "kill", "--exec-id", e.id, "--signal", strconv.Itoa(int(sig)), e.cid)
	return err
}

// Done is closed when the process has ended.
func (e *Exec) Done() <-chan struct{} { return e.done }

// Wait waits for the process (killing it when ctx ends) and returns its
// standard output; a failure includes its standard error.
func (e *Exec) Wait(ctx context.Context) ([]byte, error) {
	select {
	case <-e.done:
	case <-ctx.Done():
		_ = e.Signal(context.Background(), syscall.SIGKILL)
		<-e.done
		return e.stdout.Bytes(), fmt.Errorf("exec %s: %w; stderr: %s", e.id, ctx.Err(), e.stderr.Bytes())
	}
	if e.err != nil {
		return e.stdout.Bytes(), fmt.Errorf("exec %v: %w; stderr: %s", e.cmd.Args[len(e.cmd.Args)-1], e.err, bytes.TrimSpace(e.stderr.Bytes()))
	}
	return e.stdout.Bytes(), nil
}

// Exec runs args in container of pod to completion (1 minute at most) and
// returns its standard output.
func (n *Node) Exec(ctx context.Context, pod *corev1.Pod, container string, args ...string) ([]byte, error) {
	e, err := n.StartExec(pod, container, args...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return e.Wait(ctx)
}

// Logs returns what container of pod wrote (its CRI log file: lines of
// "<time> <stream> <tag> <text>"; only the text is returned).
func (n *Node) Logs(pod *corev1.Pod, container string) (string, error) {
	dir := filepath.Join(n.podLogs, fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), container)
	files, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil || len(files) == 0 {
		return "", fmt.Errorf("no log in %s: %v", dir, err)
	}
	var b strings.Builder
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.SplitN(line, " ", 4); len(f) == 4 {
				b.WriteString(f[3])
				if f[2] == "F" {
					b.WriteByte('\n')
				}
			}
		}
	}
	return b.String(), nil
}

// EndpointSlice creates or replaces the EndpointSlice of svc
// (<svc>-kubenode) with one endpoint per pod: its IP, its Ready condition
// as the API server has it now, this node, a reference to the pod; the
// ports are the service's target ports (numbers) with its port names.
func (n *Node) EndpointSlice(ctx context.Context, svc *corev1.Service, pods ...*corev1.Pod) error {
	sl := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4}
	sl.Name, sl.Namespace = svc.Name+"-kubenode", svc.Namespace
	sl.Labels = map[string]string{discoveryv1.LabelServiceName: svc.Name, discoveryv1.LabelManagedBy: "kubenode.shunt.dev"}
	for _, sp := range svc.Spec.Ports {
		port := sp.TargetPort.IntVal
		if sp.TargetPort.Type == intstr.String || port == 0 {
			if sp.TargetPort.Type == intstr.String {
				return fmt.Errorf("service %s: named target port %q: give numbers", svc.Name, sp.TargetPort.StrVal)
			}
			port = sp.Port
		}
		name, proto := sp.Name, sp.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		sl.Ports = append(sl.Ports, discoveryv1.EndpointPort{Name: &name, Port: &port, Protocol: &proto})
	}
	for _, p := range pods {
		cur := &corev1.Pod{}
		cur.Name, cur.Namespace = p.Name, p.Namespace
		if err := n.c.Get(ctx, cur); err != nil {
			return err
		}
		if cur.Status.PodIP == "" {
			return fmt.Errorf("pod %s/%s has no IP yet", p.Namespace, p.Name)
		}
		ready := podReady(cur)
		node := n.name
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{cur.Status.PodIP},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName:   &node,
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: cur.Namespace, Name: cur.Name, UID: cur.UID},
		})
	}
	old := &discoveryv1.EndpointSlice{}
	old.Name, old.Namespace = sl.Name, sl.Namespace
	switch err := n.c.Get(ctx, old); {
	case kube.NotFound(err):
		return n.c.Create(ctx, sl)
	case err != nil:
		return err
	}
	sl.ResourceVersion = old.ResourceVersion
	return n.c.Update(ctx, sl)
}

// Kill sends sig to the main process of the runtime's container id.
func (n *Node) Kill(ctx context.Context, id string, sig syscall.Signal) error {
	_, err := n.ctrRun(ctx, "tasks", "kill", "--signal", strconv.Itoa(int(sig)), id)
	return err
}
