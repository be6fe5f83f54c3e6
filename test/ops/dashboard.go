// Package ops holds what the operations tests share: the Grafana dashboard's
// queries (deploy/grafana/shunt-dashboard.json), a real Prometheus started
// for a test (Debian's prometheus package), and the paths of the deployment
// files. The tests themselves are in this package (rules, chart, image) and
// in test/e2e (TestObservability: a Prometheus scraping real agents while
// traffic flows, every panel's query answered with data).
package ops

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
)

// Root is the repository's root folder.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Paths of the observability files (the chart carries the originals;
// deploy/prometheus and deploy/grafana link to them).
var (
	RulesFile     = filepath.Join(Root(), "deploy", "prometheus", "shunt-rules.yaml")
	RulesTestFile = filepath.Join(Root(), "deploy", "prometheus", "shunt-rules.test.yaml")
	DashboardFile = filepath.Join(Root(), "deploy", "grafana", "shunt-dashboard.json")
	ChartDir      = filepath.Join(Root(), "deploy", "helm", "shunt")
)

// PanelQuery is one query of a dashboard panel.
type PanelQuery struct {
	Panel   string // panel title
	Type    string // timeseries, stat, table
	RefID   string
	Expr    string
	Instant bool // an instant query (tables); else a range query
}

// Dashboard is the part of a Grafana dashboard the tests read.
type Dashboard struct {
	Title      string  `json:"title"`
	UID        string  `json:"uid"`
	Panels     []Panel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			IncludeAll bool   `json:"includeAll"`
			AllValue   string `json:"allValue"`
		} `json:"list"`
	} `json:"templating"`
}

// Panel is a dashboard panel (rows hold nested panels when collapsed).
type Panel struct {
	ID         int     `json:"id"`
	Type       string  `json:"type"`
	Title      string  `json:"title"`
	Panels     []Panel `json:"panels"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	GridPos *struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		RefID   string `json:"refId"`
		Expr    string `json:"expr"`
		Instant bool   `json:"instant"`
	} `json:"targets"`
}

// LoadDashboard parses a dashboard JSON file.
func LoadDashboard(path string) (*Dashboard, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var d Dashboard
	dec := json.NewDecoder(strings.NewReader(string(data)))
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &d, nil
}

// Queries lists every query of every panel (rows' nested panels included).
// A panel other than a row without a query, or a query without an
// expression, is an error.
func (d *Dashboard) Queries() ([]PanelQuery, error) {
	var out []PanelQuery
	var walk func(ps []Panel) error
	walk = func(ps []Panel) error {
		for _, p := range ps {
			if p.Type == "row" {
				if err := walk(p.Panels); err != nil {
					return err
				}
				continue
			}
			if len(p.Targets) == 0 {
				return fmt.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					return fmt.Errorf("panel %q query %s has no expression", p.Title, tg.RefID)
				}
				out = append(out, PanelQuery{Panel: p.Title, Type: p.Type, RefID: tg.RefID, Expr: tg.Expr, Instant: tg.Instant})
			}
		}
		return nil
	}
	return out, walk(d.Panels)
}

var varRe = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)`)

// Substitute replaces Grafana's template variables ($name, ${name},
// ${name:fmt}, [[name]]) with vars; a variable missing from vars is an
// error, so a query cannot reach Prometheus with a stray "$".
func Substitute(expr string, vars map[string]string) (string, error) {
	var missing []string
	out := varRe.ReplaceAllStringFunc(expr, func(m string) string {
		sm := varRe.FindStringSubmatch(m)
		name := sm[1] + sm[2] + sm[3]
		v, ok := vars[name]
		if !ok {
			missing = append(missing, name)
			return m
		}
		return v
	})
	if len(missing) > 0 {
		sort.Strings(missing)
		return "", fmt.Errorf("query %q: no value for template variable(s) %v", expr, missing)
	}
	return out, nil
}

var metricRe = regexp.MustCompile(`\bshunt_[a-z0-9_]+`)

// MetricNames returns the shunt_ metric names text refers to, with the
// histogram suffixes (_bucket, _sum, _count) removed.
func MetricNames(text string) []string {
	seen := map[string]bool{}
	for _, m := range metricRe.FindAllString(text, -1) {
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if strings.HasSuffix(m, suf) {
				m = strings.TrimSuffix(m, suf)
				break
			}
		}
		seen[m] = true
	}
	out := make([]string, 0, len(seen))
	for m := range seen {
		out = append(out, m)
	}
	sort.Strings(out)
	return out
}
