package ops

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/test/harness"
)

// Binary returns the path of a command the operations tests need (Debian
// packages installed by scripts/install-deps.sh), failing the test when it
// is missing: the tests never skip.
func Binary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found (scripts/install-deps.sh installs it): %v", name, err)
	}
	return p
}

// ScrapeJob is one scrape job of a test Prometheus.
type ScrapeJob struct {
	Name    string
	Targets []string // host:port
}

// Prometheus is a real Prometheus server run by a test: its own data
// folder, listening on a loopback port, scraping the given targets every
// second and evaluating the rule files every second. It is killed by PID
// when the test ends.
type Prometheus struct {
	URL  string
	cmd  *exec.Cmd
	dir  string
	done chan struct{}
	log  *os.File
}

// StartPrometheus runs prometheus and waits until it is ready.
func StartPrometheus(t testing.TB, jobs []ScrapeJob, ruleFiles ...string) *Prometheus {
	t.Helper()
	bin := Binary(t, "prometheus")
	dir := t.TempDir()
	var cfg strings.Builder
	cfg.WriteString("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n")
	if len(ruleFiles) > 0 {
		cfg.WriteString("rule_files:\n")
		for _, f := range ruleFiles {
			fmt.Fprintf(&cfg, "  - %q\n", f)
		}
	}
	cfg.WriteString("scrape_configs:\n")
	for _, j := range jobs {
		fmt.Fprintf(&cfg, "  - job_name: %q\n    static_configs:\n      - targets: [", j.Name)
		for i, tg := range j.Targets {
			if i > 0 {
				cfg.WriteString(", ")
			}
			fmt.Fprintf(&cfg, "%q", tg)
		}
		cfg.WriteString("]\n")
	}
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(bin, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn", "--storage.tsdb.retention.time=1d")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	p := &Prometheus{URL: "http://" + addr, cmd: cmd, dir: dir, done: make(chan struct{}), log: logf}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("prometheus log:\n%s", p.Log())
		}
		p.Stop()
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(p.URL + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-p.done:
			t.Fatalf("prometheus exited: %s", p.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready after 60s: %s", p.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop kills prometheus (by PID) and waits for it.
func (p *Prometheus) Stop() {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	p.log.Close()
}

// Log returns the server's log.
func (p *Prometheus) Log() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "prometheus.log"))
	return string(b)
}

// Sample is one series of a query result: its labels and its values
// (one for an instant query).
type Sample struct {
	Metric map[string]string
	Values []float64
}

// HasNumber tells whether the series has a value that is not NaN.
func (s Sample) HasNumber() bool {
	for _, v := range s.Values {
		if !math.IsNaN(v) {
			return true
		}
	}
	return false
}

type apiResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Warnings  []string        `json:"warnings"`
	Data      json.RawMessage `json:"data"`
}

func (p *Prometheus) get(ctx context.Context, path string, q url.Values) (json.RawMessage, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", p.URL+path+"?"+q.Encode(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r apiResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("%s: %d %s", path, resp.StatusCode, body)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s %s: %s: %s", path, q.Get("query"), r.ErrorType, r.Error)
	}
	return r.Data, nil
}

func parseValue(v []any) (float64, error) {
	if len(v) != 2 {
		return 0, errors.New("malformed sample")
	}
	s, _ := v[1].(string)
	return strconv.ParseFloat(s, 64)
}

// Query runs an instant query at time at.
func (p *Prometheus) Query(ctx context.Context, expr string, at time.Time) ([]Sample, error) {
	q := url.Values{"query": {expr}, "time": {strconv.FormatFloat(float64(at.UnixMilli())/1000, 'f', 3, 64)}}
	data, err := p.get(ctx, "/api/v1/query", q)
	if err != nil {
		return nil, err
	}
	var d struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, err
	}
	switch d.ResultType {
	case "vector":
		var vec []struct {
			Metric map[string]string `json:"metric"`
			Value  []any             `json:"value"`
		}
		if err := json.Unmarshal(d.Result, &vec); err != nil {
			return nil, err
		}
		out := make([]Sample, 0, len(vec))
		for _, s := range vec {
			v, err := parseValue(s.Value)
			if err != nil {
				return nil, err
			}
			out = append(out, Sample{Metric: s.Metric, Values: []float64{v}})
		}
		return out, nil
	case "scalar":
		var sc []any
		if err := json.Unmarshal(d.Result, &sc); err != nil {
			return nil, err
		}
		v, err := parseValue(sc)
		if err != nil {
			return nil, err
		}
		return []Sample{{Values: []float64{v}}}, nil
	}
	return nil, fmt.Errorf("query %q: unexpected result type %s", expr, d.ResultType)
}

// QueryRange runs a range query from start to end with step.
func (p *Prometheus) QueryRange(ctx context.Context, expr string, start, end time.Time, step time.Duration) ([]Sample, error) {
	ts := func(t time.Time) string { return strconv.FormatFloat(float64(t.UnixMilli())/1000, 'f', 3, 64) }
	q := url.Values{"query": {expr}, "start": {ts(start)}, "end": {ts(end)}, "step": {strconv.FormatFloat(step.Seconds(), 'f', -1, 64)}}
	data, err := p.get(ctx, "/api/v1/query_range", q)
	if err != nil {
		return nil, err
	}
	var d struct {
		Result []struct {
			Metric map[string]string `json:"metric"`
			Values [][]any           `json:"values"`
		} `json:"result"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, err
	}
	out := make([]Sample, 0, len(d.Result))
	for _, s := range d.Result {
		smp := Sample{Metric: s.Metric}
		for _, v := range s.Values {
			f, err := parseValue(v)
			if err != nil {
				return nil, err
			}
			smp.Values = append(smp.Values, f)
		}
		out = append(out, smp)
	}
	return out, nil
}

// Target is one scrape target's state.
type Target struct {
	ScrapeURL string `json:"scrapeUrl"`
	Health    string `json:"health"`
	LastError string `json:"lastError"`
}

// Targets lists the active targets.
func (p *Prometheus) Targets(ctx context.Context) ([]Target, error) {
	data, err := p.get(ctx, "/api/v1/targets", url.Values{"state": {"active"}})
	if err != nil {
		return nil, err
	}
	var d struct {
		ActiveTargets []Target `json:"activeTargets"`
	}
	return d.ActiveTargets, json.Unmarshal(data, &d)
}

// Rule is an alerting rule as the server evaluates it.
type Rule struct {
	Name      string `json:"name"`
	Health    string `json:"health"`
	LastError string `json:"lastError"`
	Type      string `json:"type"`
	State     string `json:"state"` // inactive, pending, firing
}

// Rules lists the loaded rules of every group.
func (p *Prometheus) Rules(ctx context.Context) ([]Rule, error) {
	data, err := p.get(ctx, "/api/v1/rules", url.Values{})
	if err != nil {
		return nil, err
	}
	var d struct {
		Groups []struct {
			Rules []Rule `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, err
	}
	var out []Rule
	for _, g := range d.Groups {
		out = append(out, g.Rules...)
	}
	return out, nil
}

// Alert is an active (pending or firing) alert.
type Alert struct {
	Labels map[string]string `json:"labels"`
	State  string            `json:"state"`
}

// Alerts lists the active alerts.
func (p *Prometheus) Alerts(ctx context.Context) ([]Alert, error) {
	data, err := p.get(ctx, "/api/v1/alerts", url.Values{})
	if err != nil {
		return nil, err
	}
	var d struct {
		Alerts []Alert `json:"alerts"`
	}
	return d.Alerts, json.Unmarshal(data, &d)
}
