package k8s

import (
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/tools/cache"
)

// metrics are the source's Prometheus metrics (prefix shunt_k8s_).
type metrics struct {
	s           *Source
	objects     *prometheus.Desc
	rejected    *prometheus.CounterVec
	watchErrors *prometheus.CounterVec
	apiErrors   prometheus.Counter
	apiUp       prometheus.Gauge
	applies     *prometheus.CounterVec
	synced      prometheus.Gauge
	initialSync prometheus.Gauge
	services    prometheus.Gauge
	pods        prometheus.Gauge
	latency     prometheus.Histogram
}

func newMetrics() *metrics {
	m := &metrics{
		objects: prometheus.NewDesc("shunt_k8s_objects", "Objects in the informer caches, by kind.", []string{"kind"}, nil),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_k8s_rejected_total",
			Help: "Things left out of the mesh model, by reason: annotation (unknown value, ignored), port (unsupported protocol), service (invalid frontend or backends), conflict (frontend held by another service), pod (bad label or refused enrollment).",
		}, []string{"reason"}),
		watchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_k8s_watch_errors_total", Help: "Failed lists and watches by kind (the datapath is kept as is meanwhile).",
		}, []string{"kind"}),
		apiErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shunt_k8s_api_errors_total", Help: "Requests to the API server that failed to get an answer (unreachable, refused, timed out).",
		}),
		apiUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shunt_k8s_api_up", Help: "1 when the last request to the API server got an answer, 0 when it failed.",
		}),
		applies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_k8s_applies_total", Help: "Deltas handed to the agent, by result (ok, error).",
		}, []string{"result"}),
		synced: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shunt_k8s_synced", Help: "1 once the informer caches synced and the whole state was applied.",
		}),
		initialSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shunt_k8s_initial_sync_seconds", Help: "Time from start to the first complete state applied.",
		}),
		services: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shunt_k8s_services", Help: "Mesh services (one per frontend) applied from Kubernetes.",
		}),
		pods: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shunt_k8s_pods_enrolled", Help: "Pods of this node enrolled from Kubernetes.",
		}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "shunt_k8s_event_to_apply_seconds",
			Help:    "Time from an informer event to its change applied to the datapath.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5},
		}),
	}
	// Every label value exists from the start at 0, so that the first
	// error is an increase Prometheus sees (a series born at 1 is not).
	for _, r := range []string{"annotation", "conflict", "pod", "port", "service"} {
		m.rejected.WithLabelValues(r)
	}
	for _, k := range []string{"services", "endpointslices", "namespaces", "pods", "nodes"} {
		m.watchErrors.WithLabelValues(k)
	}
	m.applies.WithLabelValues("ok")
	m.applies.WithLabelValues("error")
	return m
}

func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.objects
	m.rejected.Describe(ch)
	m.watchErrors.Describe(ch)
	m.apiErrors.Describe(ch)
	m.apiUp.Describe(ch)
	m.applies.Describe(ch)
	m.synced.Describe(ch)
	m.initialSync.Describe(ch)
	m.services.Describe(ch)
	m.pods.Describe(ch)
	m.latency.Describe(ch)
}

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	for kind, inf := range map[string]cache.SharedIndexInformer{"service": m.s.svcInf, "endpointslice": m.s.sliceInf, "namespace": m.s.nsInf, "pod": m.s.podInf, "node": m.s.nodeInf} {
		if inf != nil {
			ch <- prometheus.MustNewConstMetric(m.objects, prometheus.GaugeValue, float64(len(inf.GetStore().ListKeys())), kind)
		}
	}
	m.rejected.Collect(ch)
	m.watchErrors.Collect(ch)
	m.apiErrors.Collect(ch)
	m.apiUp.Collect(ch)
	m.applies.Collect(ch)
	m.synced.Collect(ch)
	m.initialSync.Collect(ch)
	m.services.Collect(ch)
	m.pods.Collect(ch)
	m.latency.Collect(ch)
}
