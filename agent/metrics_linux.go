package agent

import (
	"errors"
	"os"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/bpf"
)

// StatNames labels enum shunt_stat (bpf/lib/shunt.h), in order. A test
// checks it against STAT_MAX.
var StatNames = []string{
	"bypass_netns",
	"slot_miss",
	"revnat_fail",
	"revnat_hit",
	"v4mapped",
	"origdst_fail",
	"sockhash_fail",
	"msg_redirect",
	"msg_miss",
	"msg_backpressure",
	"affinity_hit",
	"affinity_fail",
}

// PodStatNames labels enum pod_stat (bpf/lib/shunt.h), in order.
var PodStatNames = []string{
	"steer_outbound",
	"steer_inbound",
	"steer_skip",
	"origdst_answer",
	"sock_insert",
	"sock_close",
	"sock_fallback",
	"msg_redirect",
	"bytes_redirect",
	"msg_miss",
	"msg_backpressure",
	"msg_resume",
	"bytes_tcp",
}

var _ = [1]int{}[len(PodStatNames)-int(bpf.SockmeshPodStatPOD_STAT_MAX)] // len(PodStatNames) == POD_STAT_MAX

var _ = [1]int{}[len(StatNames)-int(bpf.SockmeshShuntStatSTAT_MAX)] // len(StatNames) == STAT_MAX

// metrics reads the kernel counters on every scrape and keeps the agent's
// own counters.
type metrics struct {
	a              *Agent
	reconciles     *prometheus.CounterVec
	capacityErrors prometheus.Counter

	translations, noBackend, entries, capacity, events, services, pods, info *prometheus.Desc

	podEvents, sockmapSockets, selfTest, attached *prometheus.Desc
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		a: a,
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_reconcile_total", Help: "Reconciles of the datapath to the desired state, by result (ok, error).",
		}, []string{"result"}),
		capacityErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shunt_map_capacity_errors_total", Help: "Changes refused because a map would overflow.",
		}),
		translations: prometheus.NewDesc("shunt_service_translations_total", "Connections (and unconnected UDP datagrams) translated from the service frontend to a backend.", []string{"service", "frontend"}, nil),
		noBackend:    prometheus.NewDesc("shunt_service_no_backend_total", "connect()/sendmsg() to the frontend refused with ECONNREFUSED because the service had no backend.", []string{"service", "frontend"}, nil),
		entries:      prometheus.NewDesc("shunt_map_entries", "Entries in a datapath map.", []string{"map"}, nil),
		capacity:     prometheus.NewDesc("shunt_map_capacity", "Capacity (max entries) of a datapath map.", []string{"map"}, nil),
		events:       prometheus.NewDesc("shunt_datapath_events_total", "Datapath events by kind (bypass_netns: hostNamespaceOnly skipped a socket; slot_miss: failed open; revnat_hit: VIP shown to the app).", []string{"event"}, nil),
		services:     prometheus.NewDesc("shunt_services", "Services in the datapath.", nil, nil),
		pods:         prometheus.NewDesc("shunt_pods_enrolled", "Pods enrolled by network-namespace cookie.", nil, nil),
		info:         prometheus.NewDesc("shunt_build_info", "Agent version and map layout version.", []string{"version", "layout"}, nil),
		podEvents: prometheus.NewDesc("shunt_pod_events_total", "Sidecar steering and sockmap events of enrolled pods, summed per namespace "+
			"(steer_outbound: app connection sent to its sidecar; steer_inbound: sidecar connection sent to a same-node pod's inbound listener; "+
			"steer_skip: left alone (excluded, loopback); origdst_answer: SO_ORIGINAL_DST answered; sock_insert/sock_close: sockets put in / closed from the sockhash; "+
			"sock_fallback: would accelerate but the self-test did not pass; msg_redirect/bytes_redirect: sends short-circuited to the peer socket; msg_miss: peer not accelerated, normal stack; "+
			"msg_backpressure: send taken through TCP because the peer's queue was full or TCP bytes were still unread; msg_resume: redirects resumed once the TCP path drained; bytes_tcp: bytes of accelerated sockets' sends that took TCP).",
			[]string{"namespace", "event"}, nil),
		sockmapSockets: prometheus.NewDesc("shunt_sockmap_sockets", "Sockets of the namespace's pods in the sockhash (inserted minus closed).", []string{"namespace"}, nil),
		selfTest:       prometheus.NewDesc("shunt_sockmap_selftest_passed", "1 when the sockmap self-test passed on this kernel (sockmap auto accelerates), 0 when it failed (auto accelerates nothing).", nil, nil),
		attached:       attachedDesc,
	}
	// Both results exist from the start, so an error rate is 0, not absent.
	m.reconciles.WithLabelValues("ok")
	m.reconciles.WithLabelValues("error")
	return m
}

// attachedDesc is shunt_program_attached, exported for the socket programs
// here and for the XDP load balancer's by xdpCollector.
var attachedDesc = prometheus.NewDesc("shunt_program_attached",
	"1 while the program runs on its target through its pinned bpf_link; 0 when the link was detached or its pin removed "+
		"(a program that fails to load or attach at start makes shuntd exit instead).",
	[]string{"datapath", "program", "attach"}, nil)

// attachedValue is 1 when the link is attached and still pinned.
func attachedValue(pinned string, attached bool) float64 {
	if _, err := os.Stat(pinned); err != nil || !attached {
		return 0
	}
	return 1
}

func (m *metrics) reconcile(err error) {
	if m == nil {
		return
	}
	if err == nil {
		m.reconciles.WithLabelValues("ok").Inc()
		return
	}
	m.reconciles.WithLabelValues("error").Inc()
	if errors.Is(err, datapath.ErrCapacity) {
		m.capacityErrors.Inc()
	}
}

func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	m.reconciles.Describe(ch)
	m.capacityErrors.Describe(ch)
	for _, d := range []*prometheus.Desc{m.translations, m.noBackend, m.entries, m.capacity, m.events, m.services, m.pods, m.info, m.podEvents, m.sockmapSockets, m.selfTest, m.attached} {
		ch <- d
	}
}

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.reconciles.Collect(ch)
	m.capacityErrors.Collect(ch)
	a := m.a
	ch <- prometheus.MustNewConstMetric(m.info, prometheus.GaugeValue, 1, Version, strconv.FormatUint(uint64(datapath.LayoutVersion), 10))
	type svc struct {
		name, frontend string
		id             uint32
	}
	a.mu.Lock()
	svcs := make([]svc, 0, len(a.state.svcs))
	for n, e := range a.state.svcs {
		svcs = append(svcs, svc{n, e.svc.Frontend.String(), e.id})
	}
	npods := len(a.state.pods)
	podNS := make(map[uint32]string, npods)
	for n, e := range a.state.pods {
		podNS[e.id] = namespaceOf(n)
	}
	a.mu.Unlock()
	perNS := map[string][]uint64{}
	for id, ns := range podNS {
		c, err := a.dp.PodCounters(id)
		if err != nil {
			continue
		}
		sum := perNS[ns]
		if sum == nil {
			sum = make([]uint64, len(c))
			perNS[ns] = sum
		}
		for i, v := range c {
			sum[i] += v
		}
	}
	for ns, c := range perNS {
		for i, v := range c {
			ch <- prometheus.MustNewConstMetric(m.podEvents, prometheus.CounterValue, float64(v), ns, PodStatNames[i])
		}
		ins, cl := c[bpf.SockmeshPodStatPOD_STAT_SOCK_INSERT], c[bpf.SockmeshPodStatPOD_STAT_SOCK_CLOSE]
		ch <- prometheus.MustNewConstMetric(m.sockmapSockets, prometheus.GaugeValue, float64(ins-min(ins, cl)), ns)
	}
	passed := 0.0
	if a.selfTest.Passed {
		passed = 1
	}
	ch <- prometheus.MustNewConstMetric(m.selfTest, prometheus.GaugeValue, passed)
	for _, l := range a.dp.Links() {
		ch <- prometheus.MustNewConstMetric(m.attached, prometheus.GaugeValue, attachedValue(l.Pinned, l.Attached), "sockmesh", l.Program, l.Attach)
	}
	ch <- prometheus.MustNewConstMetric(m.services, prometheus.GaugeValue, float64(len(svcs)))
	ch <- prometheus.MustNewConstMetric(m.pods, prometheus.GaugeValue, float64(npods))
	for _, s := range svcs {
		c, err := a.dp.ServiceCounters(s.id)
		if err != nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(m.translations, prometheus.CounterValue, float64(c.Translations), s.name, s.frontend)
		ch <- prometheus.MustNewConstMetric(m.noBackend, prometheus.CounterValue, float64(c.NoBackend), s.name, s.frontend)
	}
	if fill, err := a.dp.Fill(); err == nil {
		for _, f := range fill {
			ch <- prometheus.MustNewConstMetric(m.entries, prometheus.GaugeValue, float64(f.Entries), f.Name)
			ch <- prometheus.MustNewConstMetric(m.capacity, prometheus.GaugeValue, float64(f.Capacity), f.Name)
		}
	}
	if g, err := a.dp.GlobalCounters(); err == nil {
		for i, v := range g {
			ch <- prometheus.MustNewConstMetric(m.events, prometheus.CounterValue, float64(v), StatNames[i])
		}
	}
}

// namespaceOf returns the namespace part of a pod name "namespace/name"
// ("" for names without one).
func namespaceOf(pod string) string {
	if i := strings.IndexByte(pod, '/'); i >= 0 {
		return pod[:i]
	}
	return ""
}
