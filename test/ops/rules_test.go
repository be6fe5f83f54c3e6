package ops

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// The alert rules pass promtool's checks and its unit tests (real
// Prometheus rule evaluation on synthetic series, deploy/prometheus/
// shunt-rules.test.yaml).
func TestRulesPromtool(t *testing.T) {
	promtool := Binary(t, "promtool")
	for _, args := range [][]string{
		{"check", "rules", RulesFile},
		{"test", "rules", RulesTestFile},
	} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert  string            `json:"alert"`
			Expr   string            `json:"expr"`
			For    string            `json:"for"`
			Labels map[string]string `json:"labels"`
		} `json:"rules"`
	} `json:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	data, err := os.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(data, &rf); err != nil {
		t.Fatal(err)
	}
	return rf
}

// Every alert has a unit test in which it fires, a severity, and selects
// the shunt job (the chart rewrites that selector).
func TestEveryAlertTested(t *testing.T) {
	rf := loadRules(t)
	data, err := os.ReadFile(RulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	var tf struct {
		Tests []struct {
			Name      string `json:"name"`
			AlertTest []struct {
				Alertname string `json:"alertname"`
				ExpAlerts []any  `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(data, &tf); err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range tf.Tests {
		for _, at := range tc.AlertTest {
			if len(at.ExpAlerts) > 0 {
				fires[at.Alertname] = true
			} else {
				quiet[at.Alertname] = true
			}
		}
	}
	n := 0
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			n++
			if !fires[r.Alert] {
				t.Errorf("alert %s has no unit test in which it fires", r.Alert)
			}
			switch r.Labels["severity"] {
			case "critical", "warning", "info":
			default:
				t.Errorf("alert %s: severity %q", r.Alert, r.Labels["severity"])
			}
			if !strings.Contains(r.Expr, `job="shunt"`) {
				t.Errorf("alert %s does not select job=\"shunt\": %s", r.Alert, r.Expr)
			}
		}
	}
	t.Logf("%d alerts; %d with a case that fires, %d with a case that must stay quiet", n, len(fires), len(quiet))
	if n < 20 {
		t.Errorf("only %d alerts parsed", n)
	}
}

// agentMetricNames collects the string literals naming shunt_ metrics in
// the agent's non-test Go sources (agent/, xds/).
func agentMetricNames(t *testing.T) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	for _, dir := range []string{"agent", "xds"} {
		err := filepath.WalkDir(filepath.Join(Root(), dir), func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
				return err
			}
			src, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			for _, lit := range strings.Split(string(src), `"`) {
				if strings.HasPrefix(lit, "shunt_") && !strings.ContainsAny(lit, " {") {
					names[lit] = true
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return names
}

// The rules and the dashboard use only metric names the agent exports
// (read from its sources), so a rename in the agent fails here first.
func TestMetricNamesExist(t *testing.T) {
	exported := agentMetricNames(t)
	for _, f := range []string{RulesFile, DashboardFile} {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		used := MetricNames(string(data))
		if len(used) == 0 {
			t.Errorf("%s: no shunt_ metric found", f)
		}
		for _, m := range used {
			if !exported[m] {
				t.Errorf("%s uses %s, which the agent does not export", filepath.Base(f), m)
			}
		}
	}
}

// The dashboard parses, every panel has a query over the selected data
// source, ids are unique, the panels fit the 24-column grid, and every
// template variable a query uses is defined.
func TestDashboardStructure(t *testing.T) {
	d, err := LoadDashboard(DashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard uid %q title %q", d.UID, d.Title)
	}
	vars := map[string]string{"__rate_interval": "1m", "__range": "1h", "__interval": "15s"}
	for _, v := range d.Templating.List {
		vars[v.Name] = "x"
	}
	for _, want := range []string{"datasource", "job", "instance"} {
		if _, ok := vars[want]; !ok {
			t.Errorf("template variable %s missing", want)
		}
	}
	ids := map[int]string{}
	var walk func(ps []Panel)
	walk = func(ps []Panel) {
		for _, p := range ps {
			if prev, ok := ids[p.ID]; ok {
				t.Errorf("panel id %d used by %q and %q", p.ID, prev, p.Title)
			}
			ids[p.ID] = p.Title
			if p.GridPos == nil || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.W <= 0 || p.GridPos.H <= 0 {
				t.Errorf("panel %q: grid position %+v", p.Title, p.GridPos)
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q does not use the dashboard's data source variable", p.Title)
			}
		}
	}
	walk(d.Panels)
	qs, err := d.Queries()
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		if _, err := Substitute(q.Expr, vars); err != nil {
			t.Errorf("panel %q: %v", q.Panel, err)
		}
		if !strings.Contains(q.Expr, `job="$job"`) {
			t.Errorf("panel %q query %s does not select job=\"$job\"", q.Panel, q.RefID)
		}
	}
	t.Logf("%d panels, %d queries", len(ids), len(qs))
}
