package agent

import (
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
)

// xdpState is the north-south load balancer (agent/xdp) as the agent runs
// it: xdplb on Config.XDP.Devices, dsr on Config.XDP.DSRDevices. Services
// with algorithm maglev are written to it; the socket LB keeps serving
// them to the node's own clients as before.
type xdpState struct {
	dp *xdp.Datapath
	// by frontend (xdp.FrontendString): service name and table fingerprint
	names map[string]string
	fps   map[string]string
}

// XDPServices selects the services the XDP load balancer balances (algorithm
// maglev, and the north-south frontends — NodePort, LoadBalancer ingress,
// externalIPs — which clients outside the node reach through its NICs) and
// converts them. Backends outside the active set (weight 0, or
// terminating while an active one is left) get weight 0: no new flows, but
// the backend side still knows them for established ones.
func XDPServices(st *mesh.State) []xdp.Service {
	var out []xdp.Service
	for i := range st.Services {
		s := &st.Services[i]
		if s.Algorithm != mesh.Maglev && !s.Kind.NorthSouth() {
			continue
		}
		active := map[string]uint32{}
		for _, b := range s.ActiveSet() {
			active[b.Addr.String()] = b.Weight
		}
		xs := xdp.Service{Frontend: s.Frontend.Addr, Proto: s.Frontend.Proto, Mode: s.Mode, Dispatch: s.Dispatch,
			ClientIPAffinity: s.AffinityTimeout > 0}
		for _, b := range s.Backends {
			xs.Backends = append(xs.Backends, xdp.Backend{Addr: b.Addr, Tunnel: b.Tunnel, Weight: active[b.Addr.String()]})
		}
		out = append(out, xs)
	}
	return out
}

// syncXDP reconciles the load balancer's maps to st, loading (or adopting)
// the XDP datapath on first use. With repair (the periodic resync), it first
// reads the maps back, so whatever was changed behind the agent's back is
// rewritten, and re-attaches programs whose links were lost. Called with
// a.mu held.
func (a *Agent) syncXDP(st *mesh.State, repair bool) error {
	if !a.cfg.XDP.Enabled() {
		return nil
	}
	if a.xdp != nil && repair {
		fixed, err := a.xdp.dp.RepairLinks()
		for _, p := range fixed {
			a.log.Warn("xdp: program attached again", "link", p.Name, "device", p.Device, "was", p.Reason)
		}
		if err != nil {
			return fmt.Errorf("xdp: %w", err)
		}
		if err := a.xdp.dp.Refresh(); err != nil {
			return fmt.Errorf("xdp: %w", err)
		}
	}
	if a.xdp == nil {
		dp, err := xdp.Open(a.cfg.XDP, a.cfg.Datapath.Root, a.log)
		if err != nil {
			return fmt.Errorf("xdp: %w", err)
		}
		a.xdp = &xdpState{dp: dp}
		a.log.Info("XDP load balancer loaded", "devices", a.cfg.XDP.Devices, "dsrDevices", a.cfg.XDP.DSRDevices,
			"generic", dp.Generic, "adopted", dp.Adopted, "layout", xdp.LayoutVersion)
	}
	svcs := XDPServices(st)
	res, err := a.xdp.dp.Sync(svcs)
	if err != nil {
		return fmt.Errorf("xdp: %w", err)
	}
	names := map[string]string{}
	for _, s := range st.Services {
		if s.Algorithm == mesh.Maglev {
			names[xdp.FrontendString(s.Frontend.Addr, s.Frontend.Proto)] = s.Name
		}
	}
	a.xdp.names, a.xdp.fps = names, res.Fingerprints
	if res.Added+res.Updated+res.Deleted > 0 {
		msg := "xdp reconciled"
		if repair {
			msg = "xdp resync repaired drift"
		}
		a.log.Info(msg, "added", res.Added, "updated", res.Updated, "deleted", res.Deleted, "unchanged", res.Unchanged)
	}
	return nil
}

// xdpHealthy reports whether the load balancer is loaded (when configured)
// and every configured device runs its program through its link.
func (a *Agent) xdpHealthy() error {
	if !a.cfg.XDP.Enabled() {
		return nil
	}
	dp := a.XDP()
	if dp == nil {
		return errors.New("xdp: load balancer not loaded (see the agent's log)")
	}
	if err := dp.CheckLinks(); err != nil {
		return fmt.Errorf("xdp: %w", err)
	}
	return nil
}

// closeXDP releases the load balancer's handles (programs stay attached).
func (a *Agent) closeXDP() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.xdp != nil {
		a.xdp.dp.Close()
		a.xdp = nil
	}
}

// XDP returns the loaded XDP datapath, or nil.
func (a *Agent) XDP() *xdp.Datapath {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.xdp == nil {
		return nil
	}
	return a.xdp.dp
}

// XDPServiceStatus is one load-balanced service in XDPStatus.
type XDPServiceStatus struct {
	Name        string `json:"name"`
	Frontend    string `json:"frontend"`
	Fingerprint string `json:"fingerprint"`
	Packets     uint64 `json:"packets"`
	Bytes       uint64 `json:"bytes"`
	Flows       uint64 `json:"flows"`
	NoBackend   uint64 `json:"noBackend"`
}

// XDPStatus is what `shuntctl lb status` shows.
type XDPStatus struct {
	Enabled    bool           `json:"enabled"`
	Devices    []string       `json:"devices"`
	DSRDevices []string       `json:"dsrDevices"`
	Generic    []string       `json:"generic,omitempty"`
	TableSize  uint32         `json:"tableSize"`
	Links      []xdp.LinkInfo `json:"links"`
	// LinkProblems are configured devices without their program (what
	// /healthz reports); the periodic resync attaches them again.
	LinkProblems []xdp.LinkProblem  `json:"linkProblems,omitempty"`
	Services     []XDPServiceStatus `json:"services"`
	Counters     map[string]uint64  `json:"counters"`
	DSRCounters  map[string]uint64  `json:"dsrCounters"`
}

// XDPStatus reports the load balancer's links, tables and counters.
func (a *Agent) XDPStatus() (XDPStatus, error) {
	a.mu.Lock()
	st := XDPStatus{Enabled: a.cfg.XDP.Enabled(), Devices: a.cfg.XDP.Devices, DSRDevices: a.cfg.XDP.DSRDevices}
	x := a.xdp
	var names, fps map[string]string
	if x != nil {
		names, fps = maps.Clone(x.names), maps.Clone(x.fps)
	}
	a.mu.Unlock()
	if x == nil {
		return st, nil
	}
	st.Generic, st.TableSize, st.Links = x.dp.Generic, x.dp.Params().TableSize, x.dp.Links()
	problems, err := x.dp.LinkProblems()
	if err != nil {
		problems = append(problems, xdp.LinkProblem{Name: "devices", Reason: err.Error()})
	}
	st.LinkProblems = problems
	sc, err := x.dp.ServiceCounters()
	if err != nil {
		return st, err
	}
	for _, fe := range slices.Sorted(maps.Keys(names)) {
		c := sc[fe]
		st.Services = append(st.Services, XDPServiceStatus{Name: names[fe], Frontend: fe, Fingerprint: fps[fe],
			Packets: c.Packets, Bytes: c.Bytes, Flows: c.Flows, NoBackend: c.NoBackend})
	}
	st.Counters, st.DSRCounters = map[string]uint64{}, map[string]uint64{}
	c, err := x.dp.Counters()
	if err != nil {
		return st, err
	}
	for i, n := range xdp.StatNames {
		st.Counters[n] = c[i]
	}
	d, err := x.dp.DSRCounters()
	if err != nil {
		return st, err
	}
	for i, n := range xdp.DSRStatNames {
		st.DSRCounters[n] = d[i]
	}
	return st, nil
}

// xdpRoutes adds GET /v1/xdp to the API.
func (a *Agent) xdpRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/xdp", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.XDPStatus()
		reply(w, st, err)
	})
}

// xdpCollector exports the load balancer's counters with the shunt_ prefix.
type xdpCollector struct {
	a                                               *Agent
	verdicts, dsr, svcPackets, svcBytes, svcFlows   *prometheus.Desc
	svcNoBackend, bePackets, beBytes, beFlows, info *prometheus.Desc
}

func newXDPCollector(a *Agent) *xdpCollector {
	return &xdpCollector{a: a,
		verdicts:     prometheus.NewDesc("shunt_xdp_packets_total", "Packets seen by the XDP load balancer, by verdict (pass_*, drop_*, tx_*) and conntrack event (ct_*).", []string{"verdict"}, nil),
		dsr:          prometheus.NewDesc("shunt_dsr_events_total", "Backend side of DSR: packets decapsulated (in_*), replies rewritten to the VIP (out_revnat), errors.", []string{"event"}, nil),
		svcPackets:   prometheus.NewDesc("shunt_xdp_service_packets_total", "Packets the XDP load balancer forwarded for a service.", []string{"service", "frontend"}, nil),
		svcBytes:     prometheus.NewDesc("shunt_xdp_service_bytes_total", "Bytes (frames as received) the XDP load balancer forwarded for a service.", []string{"service", "frontend"}, nil),
		svcFlows:     prometheus.NewDesc("shunt_xdp_service_flows_total", "New flows (backend picked from the Maglev table) of a service.", []string{"service", "frontend"}, nil),
		svcNoBackend: prometheus.NewDesc("shunt_xdp_service_no_backend_total", "Packets of new flows dropped because the service had no backend.", []string{"service", "frontend"}, nil),
		bePackets:    prometheus.NewDesc("shunt_xdp_backend_packets_total", "Packets the XDP load balancer sent to a backend.", []string{"backend"}, nil),
		beBytes:      prometheus.NewDesc("shunt_xdp_backend_bytes_total", "Bytes the XDP load balancer sent to a backend.", []string{"backend"}, nil),
		beFlows:      prometheus.NewDesc("shunt_xdp_backend_flows_total", "New flows the XDP load balancer gave a backend.", []string{"backend"}, nil),
		info:         prometheus.NewDesc("shunt_xdp_table_info", "Maglev table of a service: its fingerprint (nodes with the same configuration show the same).", []string{"service", "frontend", "fingerprint"}, nil),
	}
}

func (c *xdpCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.verdicts, c.dsr, c.svcPackets, c.svcBytes, c.svcFlows, c.svcNoBackend, c.bePackets, c.beBytes, c.beFlows, c.info} {
		ch <- d
	}
}

func (c *xdpCollector) Collect(ch chan<- prometheus.Metric) {
	st, err := c.a.XDPStatus()
	if err != nil || !st.Enabled {
		return
	}
	for n, v := range st.Counters {
		ch <- prometheus.MustNewConstMetric(c.verdicts, prometheus.CounterValue, float64(v), n)
	}
	for n, v := range st.DSRCounters {
		ch <- prometheus.MustNewConstMetric(c.dsr, prometheus.CounterValue, float64(v), n)
	}
	for _, s := range st.Services {
		ch <- prometheus.MustNewConstMetric(c.svcPackets, prometheus.CounterValue, float64(s.Packets), s.Name, s.Frontend)
		ch <- prometheus.MustNewConstMetric(c.svcBytes, prometheus.CounterValue, float64(s.Bytes), s.Name, s.Frontend)
		ch <- prometheus.MustNewConstMetric(c.svcFlows, prometheus.CounterValue, float64(s.Flows), s.Name, s.Frontend)
		ch <- prometheus.MustNewConstMetric(c.svcNoBackend, prometheus.CounterValue, float64(s.NoBackend), s.Name, s.Frontend)
		ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, s.Name, s.Frontend, s.Fingerprint)
	}
	for _, l := range st.Links {
		ch <- prometheus.MustNewConstMetric(attachedDesc, prometheus.GaugeValue, attachedValue(l.Pinned, l.Attached), "xdp", l.Name, l.Kind)
	}
	if dp := c.a.XDP(); dp != nil {
		if bc, err := dp.BackendCounters(); err == nil {
			for be, v := range bc {
				ch <- prometheus.MustNewConstMetric(c.bePackets, prometheus.CounterValue, float64(v.Packets), be)
				ch <- prometheus.MustNewConstMetric(c.beBytes, prometheus.CounterValue, float64(v.Bytes), be)
				ch <- prometheus.MustNewConstMetric(c.beFlows, prometheus.CounterValue, float64(v.Flows), be)
			}
		}
	}
}
