package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/mesh"
)

type servers struct {
	srvs []*http.Server
	errs chan error
}

func (s *servers) close() {
	for _, srv := range s.srvs {
		srv.Close()
	}
}

// Handler is the agent's HTTP API:
//
//	GET    /v1/status
//	GET    /v1/services          POST /v1/services (ServiceConfig)   DELETE /v1/services?name=N
//	GET    /v1/pods              POST /v1/pods (mesh.Pod)            DELETE /v1/pods?name=N
//	GET    /v1/xds               (xds.Status; 404 when the xDS server is not running)
//	GET    /v1/xdp               north-south load balancer status
//	GET    /healthz              every program attached (liveness)
//	GET    /readyz               healthy, and every source delivered its whole state (readiness)
//	GET    /metrics
func (a *Agent) Handler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Status()
		reply(w, st, err)
	})
	mux.HandleFunc("GET /v1/services", func(w http.ResponseWriter, r *http.Request) {
		s, err := a.Services()
		reply(w, s, err)
	})
	mux.HandleFunc("POST /v1/services", func(w http.ResponseWriter, r *http.Request) {
		var sc ServiceConfig
		if err := decode(r, &sc); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, map[string]string{"updated": sc.Name}, a.UpdateService(sc))
	})
	mux.HandleFunc("DELETE /v1/services", func(w http.ResponseWriter, r *http.Request) {
		n := r.URL.Query().Get("name")
		reply(w, map[string]string{"deleted": n}, a.DeleteService(n))
	})
	mux.HandleFunc("GET /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Status()
		reply(w, st.Pods, err)
	})
	mux.HandleFunc("POST /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		var p mesh.Pod
		if err := decode(r, &p); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, map[string]string{"updated": p.Name}, a.UpdatePod(p))
	})
	mux.HandleFunc("DELETE /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		n := r.URL.Query().Get("name")
		reply(w, map[string]string{"deleted": n}, a.DeletePod(n))
	})
	mux.HandleFunc("GET /v1/xds", a.handleXDSStatus)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Ready(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	a.xdpRoutes(mux) // GET /v1/xdp (xdp_linux.go)
	if reg != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	}
	return mux
}

// Healthy reports whether every program is still attached through its link:
// the socket datapath's, and the XDP load balancer's on each configured
// device (xdp_linux.go). The error says what is missing; /healthz (the
// liveness and readiness probe) answers 503 with it.
func (a *Agent) Healthy() error {
	links := a.dp.Links()
	if len(links) == 0 {
		return errors.New("no program attached")
	}
	for _, l := range links {
		if err := linkHealthy(l.Program, l.Pinned, l.Attached); err != nil {
			return err
		}
	}
	return a.xdpHealthy()
}

// Ready reports whether the agent is healthy and has applied the whole
// state of every source it expects (Kubernetes: the informers synced).
// Until then it serves what earlier runs pinned; a rolling update of the
// agents waits for it before moving to the next node.
func (a *Agent) Ready() error {
	if err := a.Healthy(); err != nil {
		return err
	}
	a.mu.Lock()
	pending := slices.Sorted(maps.Keys(a.pending))
	a.mu.Unlock()
	if len(pending) > 0 {
		return fmt.Errorf("waiting for the whole state of %s", strings.Join(pending, ", "))
	}
	return nil
}

func linkHealthy(name, pinned string, attached bool) error {
	if _, err := os.Stat(pinned); err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	if !attached {
		return fmt.Errorf("link %s: detached (its program no longer runs; restart shuntd to re-attach)", name)
	}
	return nil
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 16<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &mesh.FieldError{Field: "request", Msg: err.Error()}
	}
	return nil
}

type apiError struct {
	Error string `json:"error"`
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		var fe *mesh.FieldError
		code := http.StatusInternalServerError
		switch {
		case errors.As(err, &fe):
			code = http.StatusBadRequest
		case errors.Is(err, ErrNotFound):
			code = http.StatusNotFound
		case errors.Is(err, datapath.ErrCapacity):
			code = http.StatusInsufficientStorage
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(apiError{Error: err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}

func (a *Agent) serve(reg *prometheus.Registry) (*servers, error) {
	s := &servers{errs: make(chan error, 2)}
	h := a.Handler(reg)
	if err := os.MkdirAll(filepath.Dir(a.cfg.APISocket), 0o755); err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	os.Remove(a.cfg.APISocket) // a stale socket of a killed agent; the bpffs lock already excludes a live one
	ul, err := net.Listen("unix", a.cfg.APISocket)
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	os.Chmod(a.cfg.APISocket, 0o600)
	start := func(l net.Listener) {
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		s.srvs = append(s.srvs, srv)
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.errs <- err
			}
		}()
	}
	start(ul)
	if a.cfg.MetricsAddr != "" {
		tl, err := net.Listen("tcp", a.cfg.MetricsAddr)
		if err != nil {
			s.close()
			return nil, fmt.Errorf("metricsAddr: %w", err)
		}
		start(tl)
	}
	return s, nil
}
