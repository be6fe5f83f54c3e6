package k8s_test

import (
	"flag"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/tools/txtar"
)

var update = flag.Bool("update", false, "rewrite the want sections of testdata/*.txtar with what the agent produced")

// TestGolden runs the scenarios in testdata/*.txtar against a real API
// server and an agent on the real datapath. A scenario is numbered steps:
//
//	-- N/apply.yaml --   objects to create, or update when they exist
//	-- N/delete.yaml --  objects to delete
//	-- N/want --         the state to reach: the kubernetes source's
//	                     services and pods in the agent, the kernel maps
//	                     (services and pods, pods named by their harness
//	                     pod) and the rejection counters
//
// Pods in apply.yaml get a harness pod (netns + cgroup with the Pod's UID +
// a pause process), so enrollment runs end to end: UID → cgroup → process →
// netns → cookie → map.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txtar")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scenarios: %v", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".txtar"), func(t *testing.T) {
			runScenario(t, file)
		})
	}
}

func runScenario(t *testing.T, file string) {
	ar, err := txtar.ParseFile(file)
	if err != nil {
		t.Fatal(err)
	}
	steps := map[int]map[string]int{} // step -> part -> file index
	for i, fl := range ar.Files {
		n, part, ok := strings.Cut(fl.Name, "/")
		step, err := strconv.Atoi(n)
		if !ok || err != nil {
			t.Fatalf("%s: section %q: want N/apply.yaml, N/delete.yaml or N/want", file, fl.Name)
		}
		if steps[step] == nil {
			steps[step] = map[string]int{}
		}
		steps[step][part] = i
	}
	var order []int
	for n := range steps {
		order = append(order, n)
	}
	sort.Ints(order)
	f := newFixture(t)
	changed := false
	for _, n := range order {
		parts := steps[n]
		if i, ok := parts["apply.yaml"]; ok {
			f.applyYAML(ar.Files[i].Data)
		}
		if i, ok := parts["delete.yaml"]; ok {
			f.deleteYAML(ar.Files[i].Data)
		}
		i, ok := parts["want"]
		if !ok {
			continue
		}
		if *update {
			// Let the agent settle, then record.
			f.eventually("settle", func() string {
				a := f.dump()
				f.settle()
				if b := f.dump(); a != b {
					return "still changing"
				}
				return ""
			})
			if d := f.dump(); string(ar.Files[i].Data) != d {
				ar.Files[i].Data = []byte(d)
				changed = true
			}
			continue
		}
		t.Logf("step %d", n)
		f.wantDump(string(ar.Files[i].Data))
	}
	if changed {
		if err := os.WriteFile(file, txtar.Format(ar), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("updated %s", file)
	}
}
