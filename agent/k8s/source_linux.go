package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/mesh"
)

// Applier takes the source's deltas: *agent.Agent.
type Applier interface {
	Apply(source string, d agent.Delta) error
}

// RESTConfig builds the client configuration: the kubeconfig file when one
// is given, else the in-cluster configuration (service account of the pod).
func RESTConfig(kubeconfig string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client configuration: %w", err)
	}
	cfg.UserAgent = "shuntd"
	return cfg, nil
}

// Retry delays.
const (
	retryNoProcess = 500 * time.Millisecond // pod sandbox not started yet
	retryRejected  = 5 * time.Second        // the agent refused a change
	podSweep       = 30 * time.Second       // re-check enrolled pods' netns
)

const sliceServiceIndex = "service"

// Source feeds the agent from the Kubernetes API.
type Source struct {
	cfg      agent.KubernetesConfig
	log      *slog.Logger
	client   kubernetes.Interface
	apply    Applier
	m        *metrics
	roots    []string
	hostNS   uint64 // netns inode of the agent (host network pods share it)
	coalesce time.Duration
	inherit  bool // enrolled pods inherit hostNamespaceOnly instead of translate

	factory, podFactory, nodeFactory informers.SharedInformerFactory
	svcInf, sliceInf, nsInf, podInf  cache.SharedIndexInformer
	nodeInf                          cache.SharedIndexInformer
	handlers                         []cache.ResourceEventHandlerRegistration

	mu        sync.Mutex
	dirtySvc  map[string]time.Time // key -> first event time
	dirtyPod  map[string]time.Time
	nodeDirty bool
	wake      chan struct{}

	// Worker state: what was applied.
	svcNames  map[string][]string     // service key -> mesh service names
	applied   map[string]mesh.Service // mesh name -> service
	fronts    map[mesh.Frontend]string
	pods      map[string]podState // pod key -> enrolled pod
	problems  map[string]string   // object -> last problems (counted once)
	retry     map[string]time.Time
	conflicts map[string]bool    // service keys that lost a frontend conflict
	refused   map[string]refusal // mesh service or pod name -> last refusal
	nodeAddrs []netip.Addr
}

type podState struct {
	pod mesh.Pod
	ns  netnsRef
}

// New prepares the source; Run starts it. cfg must have passed Validate
// (after WithDefaults). roots are the cgroup hierarchies to search for pod
// cgroups (nil: cfg.CgroupRoots, else CgroupRoots()).
func New(cfg agent.KubernetesConfig, rc *rest.Config, apply Applier, log *slog.Logger, reg prometheus.Registerer) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := newMetrics()
	// Count transport failures: the informers retry quietly while the API
	// server is unreachable, and this is how an operator sees it.
	var up atomic.Bool
	up.Store(true)
	rc = rest.CopyConfig(rc)
	rc.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripperFunc(func(req *http.Request) (*http.Response, error) {
			resp, err := rt.RoundTrip(req)
			if err != nil {
				m.apiErrors.Inc()
				m.apiUp.Set(0)
				if up.Swap(false) {
					log.Warn("API server unreachable; datapath kept as is, retrying", "source", agent.SourceKubernetes, "err", err)
				}
			} else {
				m.apiUp.Set(1)
				if !up.Swap(true) {
					log.Info("API server reachable", "source", agent.SourceKubernetes, "host", req.URL.Host)
				}
			}
			return resp, err
		})
	})
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	coalesce, _ := time.ParseDuration(cfg.Coalesce)
	s := &Source{
		cfg: cfg, log: log.With("source", agent.SourceKubernetes), client: client, apply: apply,
		coalesce: coalesce, inherit: cfg.PodSocketLB == "inherit",
		dirtySvc: map[string]time.Time{}, dirtyPod: map[string]time.Time{}, wake: make(chan struct{}, 1),
		svcNames: map[string][]string{}, applied: map[string]mesh.Service{}, fronts: map[mesh.Frontend]string{},
		pods: map[string]podState{}, problems: map[string]string{}, retry: map[string]time.Time{}, conflicts: map[string]bool{},
		refused: map[string]refusal{},
	}
	s.roots = cfg.CgroupRoots
	if len(s.roots) == 0 {
		s.roots = CgroupRoots()
	}
	if len(s.roots) == 0 {
		return nil, errors.New("kubernetes: no cgroup hierarchy found to look up pods (set kubernetes.cgroupRoots)")
	}
	if ino, err := nsInode("/proc/self/ns/net"); err == nil {
		s.hostNS = ino
	}
	for _, a := range cfg.NodeAddresses {
		s.nodeAddrs = append(s.nodeAddrs, netip.MustParseAddr(a).Unmap())
	}
	s.m = m
	m.s = s
	if reg != nil {
		if err := reg.Register(s.m); err != nil {
			return nil, fmt.Errorf("register kubernetes metrics: %w", err)
		}
	}
	s.setupInformers()
	return s, nil
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// stripManagedFields drops what Shunt never reads from cached objects.
func stripManagedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

func (s *Source) setupInformers() {
	s.factory = informers.NewSharedInformerFactoryWithOptions(s.client, 0, informers.WithTransform(stripManagedFields))
	s.podFactory = informers.NewSharedInformerFactoryWithOptions(s.client, 0, informers.WithTransform(stripManagedFields),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", s.cfg.NodeName).String()
		}))
	s.svcInf = s.factory.Core().V1().Services().Informer()
	s.sliceInf = s.factory.Discovery().V1().EndpointSlices().Informer()
	s.nsInf = s.factory.Core().V1().Namespaces().Informer()
	s.podInf = s.podFactory.Core().V1().Pods().Informer()
	if len(s.cfg.NodeAddresses) == 0 {
		s.nodeFactory = informers.NewSharedInformerFactoryWithOptions(s.client, 0, informers.WithTransform(stripManagedFields),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("metadata.name", s.cfg.NodeName).String()
			}))
		s.nodeInf = s.nodeFactory.Core().V1().Nodes().Informer()
	}
	_ = s.sliceInf.AddIndexers(cache.Indexers{sliceServiceIndex: func(obj any) ([]string, error) {
		sl, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return nil, nil
		}
		if n := sl.Labels[discoveryv1.LabelServiceName]; n != "" {
			return []string{ServiceKey(sl.Namespace, n)}, nil
		}
		return nil, nil
	}})
	_ = s.podInf.AddIndexers(cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})

	for kind, inf := range map[string]cache.SharedIndexInformer{"services": s.svcInf, "endpointslices": s.sliceInf, "namespaces": s.nsInf, "pods": s.podInf, "nodes": s.nodeInf} {
		if inf == nil {
			continue
		}
		_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
			s.m.watchErrors.WithLabelValues(kind).Inc()
			s.log.Warn("watch failed; datapath kept as is, retrying", "kind", kind, "err", err)
		})
	}

	s.addHandler(s.svcInf, cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.markObj(o, s.markSvc) },
		UpdateFunc: func(o, n any) { s.markUpdate(o, n, s.markSvc) },
		DeleteFunc: func(o any) { s.markObj(o, s.markSvc) },
	})
	s.addHandler(s.sliceInf, cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.markSlice(o) },
		UpdateFunc: func(o, n any) { s.markUpdate(o, n, func(string) { s.markSlice(o); s.markSlice(n) }) },
		DeleteFunc: func(o any) { s.markSlice(o) },
	})
	s.addHandler(s.podInf, cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.markObj(o, s.markPod) },
		UpdateFunc: func(o, n any) { s.markUpdate(o, n, s.markPod) },
		DeleteFunc: func(o any) { s.markObj(o, s.markPod) },
	})
	s.addHandler(s.nsInf, cache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) { s.markNamespace(o) },
		UpdateFunc: func(o, n any) {
			on, ok1 := o.(*corev1.Namespace)
			nn, ok2 := n.(*corev1.Namespace)
			if ok1 && ok2 && on.Labels[LabelEnabled] == nn.Labels[LabelEnabled] && on.Annotations[AnnotationSockmap] == nn.Annotations[AnnotationSockmap] {
				return
			}
			s.markNamespace(n)
		},
		DeleteFunc: func(o any) { s.markNamespace(o) },
	})
	if s.nodeInf != nil {
		nodeChanged := func(any) {
			s.mu.Lock()
			s.nodeDirty = true
			s.mu.Unlock()
			s.kick()
		}
		s.addHandler(s.nodeInf, cache.ResourceEventHandlerFuncs{
			AddFunc:    nodeChanged,
			UpdateFunc: func(o, n any) { s.markUpdate(o, n, func(string) { nodeChanged(n) }) },
			DeleteFunc: nodeChanged,
		})
	}
}

func (s *Source) addHandler(inf cache.SharedIndexInformer, h cache.ResourceEventHandler) {
	r, err := inf.AddEventHandler(h)
	if err == nil {
		s.handlers = append(s.handlers, r)
	}
}

func objKey(o any) (string, bool) {
	k, err := cache.DeletionHandlingMetaNamespaceKeyFunc(o)
	return k, err == nil
}

func (s *Source) markObj(o any, mark func(string)) {
	if k, ok := objKey(o); ok {
		mark(k)
	}
}

// markUpdate ignores updates that change nothing (relists deliver every
// object again, with its unchanged resourceVersion).
func (s *Source) markUpdate(o, n any, mark func(string)) {
	om, ok1 := o.(metav1.Object)
	nm, ok2 := n.(metav1.Object)
	if ok1 && ok2 && om.GetResourceVersion() == nm.GetResourceVersion() {
		return
	}
	s.markObj(n, mark)
}

func (s *Source) markSlice(o any) {
	if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = t.Obj
	}
	sl, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	if n := sl.Labels[discoveryv1.LabelServiceName]; n != "" {
		s.markSvc(ServiceKey(sl.Namespace, n))
	}
}

func (s *Source) markNamespace(o any) {
	if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = t.Obj
	}
	ns, ok := o.(*corev1.Namespace)
	if !ok {
		return
	}
	objs, _ := s.podInf.GetIndexer().ByIndex(cache.NamespaceIndex, ns.Name)
	for _, p := range objs {
		s.markObj(p, s.markPod)
	}
}

func (s *Source) markSvc(key string) { s.mark(s.dirtySvc, key) }
func (s *Source) markPod(key string) { s.mark(s.dirtyPod, key) }

func (s *Source) mark(set map[string]time.Time, key string) {
	s.mu.Lock()
	if _, ok := set[key]; !ok {
		set[key] = time.Now()
	}
	s.mu.Unlock()
	s.kick()
}

func (s *Source) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run starts the informers, applies the whole state once their caches have
// synced (waiting as long as the API server is unreachable: the datapath
// keeps its pinned state meanwhile) and then applies changes until ctx ends.
func (s *Source) Run(ctx context.Context) error {
	s.factory.Start(ctx.Done())
	s.podFactory.Start(ctx.Done())
	// Wait until the handlers (not only the caches) have seen the initial
	// lists: the full sync below then covers every initial notification.
	var synced []cache.InformerSynced
	for _, r := range s.handlers {
		synced = append(synced, r.HasSynced)
	}
	if s.nodeFactory != nil {
		s.nodeFactory.Start(ctx.Done())
	}
	defer func() {
		s.factory.Shutdown()
		s.podFactory.Shutdown()
		if s.nodeFactory != nil {
			s.nodeFactory.Shutdown()
		}
	}()
	start := time.Now()
	s.log.Info("waiting for the API server", "node", s.cfg.NodeName)
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx ended
	}
	s.log.Info("caches synced", "took", time.Since(start).Round(time.Millisecond))
	for !s.fullSync() {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(retryRejected):
		}
	}
	s.m.synced.Set(1)
	s.m.initialSync.Set(time.Since(start).Seconds())

	sweep := time.NewTicker(podSweep)
	defer sweep.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var lastStep time.Time
	for {
		s.armRetry(timer)
		select {
		case <-ctx.Done():
			return nil
		case <-s.wake:
		case <-timer.C:
		case <-sweep.C:
			for k := range s.pods {
				s.markPod(k)
			}
		}
		// Coalesce only when busy: after a quiet spell, the first event is
		// applied at once; a burst then gathers while it is applied and
		// for the coalescing window after each step.
		if s.coalesce > 0 && time.Since(lastStep) < 20*s.coalesce {
			time.Sleep(s.coalesce)
		}
		s.step()
		lastStep = time.Now()
	}
}

// armRetry sets timer to the earliest retry and moves due retries to the
// dirty sets.
func (s *Source) armRetry(timer *time.Timer) {
	now := time.Now()
	next := time.Hour
	for k, at := range s.retry {
		if !at.After(now) {
			delete(s.retry, k)
			if key, ok := strings.CutPrefix(k, "pod:"); ok {
				s.markPod(key)
			} else {
				s.markSvc(strings.TrimPrefix(k, "svc:"))
			}
			continue
		}
		next = min(next, at.Sub(now))
	}
	timer.Reset(next)
}

// change is one delta under construction, with the keys it came from.
type change struct {
	svcs      map[string]mesh.Service // name -> upsert
	svcOf     map[string]string       // mesh name -> service key
	delSvcs   map[string]string       // name -> service key
	names     map[string][]string     // service key -> its complete new name list
	pods      map[string]podState     // pod key -> upsert
	delPods   map[string]bool
	since     map[string]time.Time // dirty key -> first event
	replace   bool
	conflicts map[string]bool // service keys that lost a frontend conflict
}

func newChange() *change {
	return &change{svcs: map[string]mesh.Service{}, svcOf: map[string]string{}, delSvcs: map[string]string{},
		names: map[string][]string{}, pods: map[string]podState{}, delPods: map[string]bool{},
		since: map[string]time.Time{}, conflicts: map[string]bool{}}
}

// fullSync applies the complete state with Replace (after the caches first
// synced). It reports whether the agent took it.
func (s *Source) fullSync() bool {
	s.mu.Lock()
	clear(s.dirtySvc)
	clear(s.dirtyPod)
	s.nodeDirty = false
	s.mu.Unlock()
	s.refreshNodeAddrs()
	c := newChange()
	c.replace = true
	keys := map[string]bool{}
	for _, o := range s.svcInf.GetStore().List() {
		if k, ok := objKey(o); ok {
			keys[k] = true
		}
	}
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		s.computeService(c, k)
	}
	for _, o := range s.podInf.GetStore().List() {
		if k, ok := objKey(o); ok {
			s.computePod(c, k)
		}
	}
	return s.commit(c)
}

// step applies what became dirty since the last step.
func (s *Source) step() {
	s.mu.Lock()
	svcs, pods, node := s.dirtySvc, s.dirtyPod, s.nodeDirty
	s.dirtySvc, s.dirtyPod, s.nodeDirty = map[string]time.Time{}, map[string]time.Time{}, false
	s.mu.Unlock()
	c := newChange()
	if node && s.refreshNodeAddrs() {
		// Node addresses changed: every service with node ports.
		for _, o := range s.svcInf.GetStore().List() {
			if sv, ok := o.(*corev1.Service); ok && (sv.Spec.Type == corev1.ServiceTypeNodePort || sv.Spec.Type == corev1.ServiceTypeLoadBalancer) {
				if _, ok := svcs[ServiceKey(sv.Namespace, sv.Name)]; !ok {
					svcs[ServiceKey(sv.Namespace, sv.Name)] = time.Now()
				}
			}
		}
	}
	if len(svcs)+len(pods) == 0 {
		return
	}
	// Services first in a stable order so that frontend conflicts resolve
	// the same way every time.
	for _, k := range slices.Sorted(maps.Keys(svcs)) {
		c.since["svc:"+k] = svcs[k]
		s.computeService(c, k)
	}
	for k, t := range pods {
		c.since["pod:"+k] = t
		s.computePod(c, k)
	}
	s.commit(c)
}

// refreshNodeAddrs reads the node's addresses from the Node object (unless
// configured) and tells whether they changed.
func (s *Source) refreshNodeAddrs() bool {
	if s.nodeInf == nil {
		return false
	}
	var addrs []netip.Addr
	if o, ok, _ := s.nodeInf.GetStore().GetByKey(s.cfg.NodeName); ok {
		if n, ok := o.(*corev1.Node); ok {
			for _, na := range n.Status.Addresses {
				if na.Type != corev1.NodeInternalIP && na.Type != corev1.NodeExternalIP {
					continue
				}
				if a, err := netip.ParseAddr(na.Address); err == nil && !slices.Contains(addrs, a.Unmap()) {
					addrs = append(addrs, a.Unmap())
				}
			}
		}
	}
	slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
	if slices.Equal(addrs, s.nodeAddrs) {
		return false
	}
	s.log.Info("node addresses", "node", s.cfg.NodeName, "addresses", addrs)
	s.nodeAddrs = addrs
	return true
}

// report logs and counts an object's problems when they changed since the
// last time it was translated.
func (s *Source) report(obj string, probs []Problem) {
	var b strings.Builder
	for _, p := range probs {
		b.WriteString(p.String())
		b.WriteByte('\n')
	}
	str := b.String()
	if s.problems[obj] == str {
		return
	}
	if str == "" {
		delete(s.problems, obj)
		return
	}
	s.problems[obj] = str
	for _, p := range probs {
		s.m.rejected.WithLabelValues(p.Reason).Inc()
		s.log.Warn("left out", "object", obj, "reason", p.Reason, "problem", p.Msg)
	}
}

// computeService adds service key's new state to c.
func (s *Source) computeService(c *change, key string) {
	var want []mesh.Service
	if o, ok, _ := s.svcInf.GetStore().GetByKey(key); ok {
		svc := o.(*corev1.Service)
		objs, _ := s.sliceInf.GetIndexer().ByIndex(sliceServiceIndex, key)
		sls := make([]*discoveryv1.EndpointSlice, 0, len(objs))
		for _, o := range objs {
			sls = append(sls, o.(*discoveryv1.EndpointSlice))
		}
		var probs []Problem
		want, probs = TranslateService(ServiceInput{Service: svc, Slices: sls, NodeName: s.cfg.NodeName, NodeAddrs: s.nodeAddrs})
		s.report("service "+key, probs)
	} else {
		s.report("service "+key, nil)
	}
	names := make([]string, 0, len(want))
	for i := range want {
		sv := want[i]
		names = append(names, sv.Name)
		if cur, ok := s.applied[sv.Name]; ok && cur.Equal(&sv) && !c.replace {
			continue
		}
		c.svcs[sv.Name] = sv
		c.svcOf[sv.Name] = key
	}
	for _, n := range s.svcNames[key] {
		if !slices.Contains(names, n) {
			c.delSvcs[n] = key
		}
	}
	c.names[key] = names
}

// computePod adds pod key's new state to c.
func (s *Source) computePod(c *change, key string) {
	cur, had := s.pods[key]
	o, ok, _ := s.podInf.GetStore().GetByKey(key)
	if !ok {
		delete(s.refused, key)
		if had {
			c.delPods[key] = true
		}
		s.report("pod "+key, nil)
		return
	}
	pod := o.(*corev1.Pod)
	var ns *corev1.Namespace
	if no, ok, _ := s.nsInf.GetStore().GetByKey(pod.Namespace); ok {
		ns = no.(*corev1.Namespace)
	}
	e, probs := PodEnrollment(ns, pod)
	if !e.Enrolled {
		s.report("pod "+key, probs)
		if had {
			c.delPods[key] = true
			s.log.Debug("pod left", "pod", key, "why", e.Why)
		}
		return
	}
	var ref netnsRef
	if had && cur.pod.UID == string(pod.UID) && cur.ns.stillValid() {
		ref = cur.ns
	} else {
		r, err := findPodNetNS(s.roots, string(pod.UID))
		if err != nil {
			// Not started yet (or gone): keep what is enrolled, retry. A
			// namespace the agent may not open is reported (once).
			if !errors.Is(err, ErrNoProcess) {
				probs = append(probs, Problem{"pod", err.Error()})
			}
			s.report("pod "+key, probs)
			s.retry["pod:"+key] = time.Now().Add(retryNoProcess)
			return
		}
		ref = r
	}
	s.report("pod "+key, probs)
	if ref.ino == s.hostNS {
		// Not a host-network pod (PodEnrollment left those out), so the
		// process has not joined the pod's netns yet (a runtime's init
		// enters the cgroup before it enters namespaces): retry.
		s.retry["pod:"+key] = time.Now().Add(retryNoProcess)
		return
	}
	p := mesh.Pod{Name: PodName(pod.Namespace, pod.Name), NetNS: ref.path, Sockmap: e.Sockmap, UID: string(pod.UID), Sidecar: e.Sidecar}
	if !s.inherit {
		p.SocketLB = mesh.Translate
	}
	if had && cur.pod.Equal(&p) && !c.replace {
		return
	}
	c.pods[key] = podState{pod: p, ns: ref}
}

// resolveConflicts leaves out upserts whose frontend another Kubernetes
// service holds (applied, or earlier in this change), so one bad Service
// cannot block the others.
func (s *Source) resolveConflicts(c *change) {
	held := map[mesh.Frontend]string{}
	if !c.replace {
		for f, n := range s.fronts {
			if _, gone := c.delSvcs[n]; !gone {
				held[f] = n
			}
		}
	}
	for _, n := range slices.Sorted(maps.Keys(c.svcs)) {
		sv := c.svcs[n]
		if other, ok := held[sv.Frontend]; ok && other != n {
			key := c.svcOf[n]
			s.m.rejected.WithLabelValues("conflict").Inc()
			s.log.Warn("left out", "service", n, "reason", "conflict", "problem", fmt.Sprintf("frontend %s already used by %s", sv.Frontend, other))
			s.dropService(c, n)
			c.conflicts[key] = true
			continue
		}
		held[sv.Frontend] = n
	}
}

// dropService takes mesh service n out of c: it keeps its applied version
// (if any) and is not counted in its key's name list.
func (s *Source) dropService(c *change, n string) {
	key := c.svcOf[n]
	delete(c.svcs, n)
	if _, ok := s.applied[n]; !ok {
		c.names[key] = slices.DeleteFunc(c.names[key], func(x string) bool { return x == n })
	}
}

// commit applies c, leaving out what the agent refuses (retried later), and
// records what was applied. It reports whether c (or what was left of it)
// was applied.
func (s *Source) commit(c *change) bool {
	s.resolveConflicts(c)
	for attempt := 0; ; attempt++ {
		d := c.delta()
		if d.Empty() {
			s.observe(c)
			return true
		}
		err := s.apply.Apply(agent.SourceKubernetes, d)
		if err == nil {
			s.record(c)
			s.m.applies.WithLabelValues("ok").Inc()
			s.observe(c)
			return true
		}
		s.m.applies.WithLabelValues("error").Inc()
		// Leave out the service or pod the agent named and try again.
		if attempt < 64 && s.dropNamed(c, err) {
			continue
		}
		s.log.Warn("change refused by the agent; retrying", "err", err, "services", len(d.Services), "pods", len(d.Pods))
		for k := range c.since {
			s.retry[k] = time.Now().Add(retryRejected)
		}
		for _, k := range slices.Collect(maps.Values(c.svcOf)) {
			s.retry["svc:"+k] = time.Now().Add(retryRejected)
		}
		for k := range c.pods {
			s.retry["pod:"+k] = time.Now().Add(retryRejected)
		}
		return false
	}
}

// dropNamed removes the service or pod a refusal names from c and schedules
// it for a retry. It reports whether it found one.
func (s *Source) dropNamed(c *change, err error) bool {
	var fe *mesh.FieldError
	if !errors.As(err, &fe) {
		return false
	}
	for n := range c.svcs {
		if strings.HasPrefix(fe.Field, "services["+n+"]") {
			key := c.svcOf[n]
			s.refuse("service", n, err, retryRejected)
			s.dropService(c, n)
			s.retry["svc:"+key] = time.Now().Add(s.refused[n].backoff)
			return true
		}
	}
	for k, ps := range c.pods {
		if strings.HasPrefix(fe.Field, "pods["+ps.pod.Name+"]") {
			s.refuse("pod", ps.pod.Name, err, retryNoProcess)
			delete(c.pods, k)
			s.retry["pod:"+k] = time.Now().Add(s.refused[ps.pod.Name].backoff)
			return true
		}
	}
	return false
}

// refusal is the agent's last refusal of one mesh service or pod.
type refusal struct {
	msg     string
	backoff time.Duration
}

// refuse records that the agent refused name: logged and counted once per
// distinct reason, retried with a doubling delay (first, up to 5 minutes).
func (s *Source) refuse(kind, name string, err error, first time.Duration) {
	r, seen := s.refused[name]
	if !seen || r.msg != err.Error() {
		s.m.rejected.WithLabelValues(kind).Inc()
		s.log.Warn("left out", kind, name, "reason", "refused by the agent", "problem", err)
		r.msg = err.Error()
	}
	r.backoff = min(max(2*r.backoff, first), 5*time.Minute)
	s.refused[name] = r
}

// delta is c as the agent takes it. With replace, it is the whole state.
func (c *change) delta() agent.Delta {
	d := agent.Delta{Replace: c.replace}
	for _, n := range slices.Sorted(maps.Keys(c.svcs)) {
		d.Services = append(d.Services, c.svcs[n])
	}
	for _, k := range slices.Sorted(maps.Keys(c.pods)) {
		d.Pods = append(d.Pods, c.pods[k].pod)
	}
	if !c.replace {
		d.DeleteServices = slices.Sorted(maps.Keys(c.delSvcs))
		for _, k := range slices.Sorted(maps.Keys(c.delPods)) {
			d.DeletePods = append(d.DeletePods, k) // pod key == mesh pod name
		}
	}
	return d
}

// record makes c the applied state.
func (s *Source) record(c *change) {
	if c.replace {
		clear(s.applied)
		clear(s.fronts)
		clear(s.svcNames)
		clear(s.pods)
	}
	freed := false
	for n := range c.delSvcs {
		if sv, ok := s.applied[n]; ok {
			if s.fronts[sv.Frontend] == n {
				delete(s.fronts, sv.Frontend)
			}
			delete(s.applied, n)
			freed = true
		}
	}
	for n, sv := range c.svcs {
		s.applied[n] = sv
		s.fronts[sv.Frontend] = n
		delete(s.refused, n)
	}
	for k, names := range c.names {
		for n := range s.refused {
			if strings.HasPrefix(n, k+":") && !slices.Contains(names, n) {
				delete(s.refused, n) // gone from the cluster
			}
		}
		if len(names) == 0 {
			delete(s.svcNames, k)
		} else {
			s.svcNames[k] = names
		}
		if c.conflicts[k] {
			s.conflicts[k] = true
		} else {
			delete(s.conflicts, k)
		}
	}
	for k := range c.delPods {
		delete(s.pods, k)
		delete(s.refused, k)
	}
	for k, ps := range c.pods {
		s.pods[k] = ps
		delete(s.refused, k)
	}
	if freed {
		// A freed frontend may be what a conflicting service waited for.
		for k := range s.conflicts {
			s.markSvc(k)
		}
	}
	s.m.services.Set(float64(len(s.applied)))
	s.m.pods.Set(float64(len(s.pods)))
}

// observe records event-to-apply latencies of the keys c came from.
func (s *Source) observe(c *change) {
	now := time.Now()
	for _, t := range c.since {
		s.m.latency.Observe(now.Sub(t).Seconds())
	}
}

// RouteKlog sends client-go's own log lines (klog) to log, for binaries.
// It changes process-wide state: libraries and tests leave it alone.
func RouteKlog(log *slog.Logger) { klog.SetSlogLogger(log.With("component", "client-go")) }
