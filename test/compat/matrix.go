package compat

import (
	"fmt"
	"strings"
)

// Matrix collects the columns of several configurations and prints them as
// one table: a row per scenario, a column per configuration, "pass" or
// "FAIL n" with the reasons numbered below the table.
type Matrix struct {
	configs   []string
	scenarios []string
	cells     map[string]map[string]Result // scenario → config → result
}

// Add adds a configuration's results (a later column of the same name
// replaces the cells it has).
func (m *Matrix) Add(rs *Results) {
	if m.cells == nil {
		m.cells = map[string]map[string]Result{}
	}
	if !contains(m.configs, rs.Config) {
		m.configs = append(m.configs, rs.Config)
	}
	for _, r := range rs.Rows {
		if m.cells[r.Scenario] == nil {
			m.cells[r.Scenario] = map[string]Result{}
			m.scenarios = append(m.scenarios, r.Scenario)
		}
		m.cells[r.Scenario][rs.Config] = r
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Cell returns the result of a scenario under a configuration.
func (m *Matrix) Cell(scenario, config string) (Result, bool) {
	r, ok := m.cells[scenario][config]
	return r, ok
}

// String prints the table (Markdown) followed by the failure reasons.
func (m *Matrix) String() string {
	var notes []string
	rows := make([][]string, 0, len(m.scenarios)+1)
	rows = append(rows, append([]string{"scenario"}, m.configs...))
	for _, sc := range m.scenarios {
		row := []string{sc}
		for _, cfg := range m.configs {
			r, ok := m.cells[sc][cfg]
			switch {
			case !ok:
				row = append(row, "-")
			case r.Pass:
				row = append(row, "pass")
			default:
				notes = append(notes, fmt.Sprintf("%d. %s × %s: %s", len(notes)+1, sc, cfg, r.Reason))
				row = append(row, fmt.Sprintf("FAIL %d", len(notes)))
			}
		}
		rows = append(rows, row)
	}
	width := make([]int, len(rows[0]))
	for _, row := range rows {
		for i, c := range row {
			width[i] = max(width[i], len(c))
		}
	}
	var b strings.Builder
	line := func(row []string) {
		b.WriteString("|")
		for i, c := range row {
			fmt.Fprintf(&b, " %-*s |", width[i], c)
		}
		b.WriteString("\n")
	}
	line(rows[0])
	sep := make([]string, len(width))
	for i, w := range width {
		sep[i] = strings.Repeat("-", w)
	}
	line(sep)
	for _, row := range rows[1:] {
		line(row)
	}
	for _, n := range notes {
		b.WriteString(n + "\n")
	}
	return b.String()
}

// Notes lists the passing cells that carry a note (e.g. back-pressure
// amounts), one per line.
func (m *Matrix) Notes() string {
	var b strings.Builder
	for _, sc := range m.scenarios {
		for _, cfg := range m.configs {
			if r, ok := m.cells[sc][cfg]; ok && r.Pass && r.Reason != "" {
				fmt.Fprintf(&b, "%s × %s: %s\n", sc, cfg, r.Reason)
			}
		}
	}
	return b.String()
}
