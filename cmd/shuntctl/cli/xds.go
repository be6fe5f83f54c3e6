package cli

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/xds"
)

// xdsTypes is the order types are shown in, with their short names.
var xdsTypes = []struct{ url, name string }{
	{resource.ListenerType, "LDS"},
	{resource.RouteType, "RDS"},
	{resource.ClusterType, "CDS"},
	{resource.EndpointType, "EDS"},
}

func xdsCmd(c *agent.Client, args []string, w io.Writer) error {
	if len(args) == 0 || args[0] != "status" {
		return errors.New("xds: want status")
	}
	fs := newFlags("xds status")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("xds status: %w", err)
	}
	var st xds.Status
	if err := c.XDS(&st); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(w, st)
	}
	return writeXDSStatus(w, st, time.Now())
}

// writeXDSStatus renders the xDS server's status: the served resources,
// then per connected node and type what was sent, accepted, is pending and
// was last rejected.
func writeXDSStatus(w io.Writer, st xds.Status, now time.Time) error {
	var counts []string
	for _, t := range xdsTypes {
		counts = append(counts, fmt.Sprintf("%s %d", t.name, st.Resources[t.url]))
	}
	fmt.Fprintf(w, "xDS server: %d streams, %d nodes; serving %s\n", st.Streams, len(st.Nodes), strings.Join(counts, ", "))
	for _, warn := range st.Warnings {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
	if len(st.Nodes) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tFLAVOR\tTYPE\tWATCHING\tSENT\tACKED\tPENDING\tNACKS\tLAST NACK")
	for _, n := range st.Nodes {
		first := true
		for _, t := range knownTypesFirst(n.Types) {
			ts := n.Types[t.url]
			node, flavor := "", ""
			if first {
				node, flavor = n.ID, n.Flavor
				first = false
			}
			watching := "*"
			if ts.Watching > 0 {
				watching = fmt.Sprint(ts.Watching)
			}
			last := "-"
			if ts.LastNACK != nil {
				last = fmt.Sprintf("version %s, %s ago: %s", orDash(ts.LastNACK.Version), now.Sub(ts.LastNACK.Time).Round(time.Second),
					strings.Join(strings.Fields(ts.LastNACK.Error), " "))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", node, flavor, t.name, watching, orDash(ts.SentVersion), orDash(ts.AckedVersion),
				yesNo(ts.Pending), ts.NACKs, last)
		}
	}
	return tw.Flush()
}

// knownTypesFirst lists the node's types: LDS, RDS, CDS, EDS, then any
// other type URL it asked for.
func knownTypesFirst(types map[string]xds.TypeStatus) []struct{ url, name string } {
	var out []struct{ url, name string }
	for _, t := range xdsTypes {
		if _, ok := types[t.url]; ok {
			out = append(out, t)
		}
	}
	var other []string
	for url := range types {
		if !slices.ContainsFunc(xdsTypes, func(t struct{ url, name string }) bool { return t.url == url }) {
			other = append(other, url)
		}
	}
	slices.Sort(other)
	for _, url := range other {
		out = append(out, struct{ url, name string }{url, url[strings.LastIndexByte(url, '.')+1:]})
	}
	return out
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
