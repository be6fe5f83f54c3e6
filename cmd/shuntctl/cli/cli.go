// Package cli implements shuntctl's commands.
package cli

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/mesh"
)

const usage = `usage: shuntctl [--socket PATH] COMMAND

commands:
  status [--json]                      programs, links, maps and their fill
  service list [--json]
  service update --frontend VIP:PORT --backends A:P[,B:P...] [--name N]
                 [--protocol tcp|udp] [--weights W[,W...]] [--states active|terminating[,...]]
                 [--algorithm random|maglev] [--mode snat|dsr|hybrid] [--dispatch ipip|geneve|opt]
                 [--tunnels ADDR[,ADDR...]]   (maglev: balanced by the XDP load balancer too)
                 [--affinity-timeout SECONDS] (client affinity: a pod keeps its backend)
  service delete --name N | --frontend VIP:PORT [--protocol tcp|udp]
  pod list [--json]
  pod update --name N --netns PATH [--socket-lb inherit|bypass|translate] [--sockmap auto|on|off]
             [--sidecar [--sidecar-uid 1337] [--outbound-port 15001] [--inbound-port 15006]
              [--exclude-outbound-ports P,..] [--exclude-outbound-cidrs C,..]
              [--include-outbound-cidrs C,..] [--exclude-inbound-ports P,..]] [--ips A,..]
  pod delete --name N
  xds status [--json]                  xDS server: connected nodes, per type sent/accepted version, pending, last NACK
  lb which [--bpffs-root DIR] [--device DEV] tcp|udp SRC:PORT VIP:PORT
                                       which backend the loaded XDP program sends a flow to (BPF_PROG_TEST_RUN)
  lb status [--json]                   XDP load balancer: links, Maglev table fingerprints, counters
  maglev table --seed BASE64 [--size M] --backends A:P[*W],...
                                       build a Maglev table locally and print its fingerprint
  cleanup [--bpffs-root DIR]           detach every program and remove all pins (stop shuntd first)
  demo [--connections N]               standalone demo: pods, shuntd, a service, traffic, counters, cleanup
  bench connect|update|sidecar|xdp|xds [FLAGS]
                                       benchmarks (see shuntctl bench help)
`

// Run executes one shuntctl command.
func Run(args []string, stdout, stderr io.Writer) error {
	top := flag.NewFlagSet("shuntctl", flag.ContinueOnError)
	top.SetOutput(stderr)
	sock := top.String("socket", envOr("SHUNT_API_SOCKET", agent.DefaultAPISocket), "shuntd API socket")
	top.Usage = func() { fmt.Fprint(stderr, usage) }
	if err := top.Parse(args); err != nil {
		return err
	}
	rest := top.Args()
	if len(rest) == 0 {
		top.Usage()
		return errors.New("no command")
	}
	c := agent.NewClient(*sock)
	switch rest[0] {
	case "status":
		return status(c, rest[1:], stdout)
	case "service":
		if len(rest) < 2 {
			return errors.New("service: want list, update or delete")
		}
		switch rest[1] {
		case "list":
			return serviceList(c, rest[2:], stdout)
		case "update":
			return serviceUpdate(c, rest[2:], stdout)
		case "delete":
			return serviceDelete(c, rest[2:], stdout)
		}
		return fmt.Errorf("service %s: unknown subcommand", rest[1])
	case "pod":
		if len(rest) < 2 {
			return errors.New("pod: want list, update or delete")
		}
		switch rest[1] {
		case "list":
			return podList(c, rest[2:], stdout)
		case "update":
			return podUpdate(c, rest[2:], stdout)
		case "delete":
			return podDelete(c, rest[2:], stdout)
		}
		return fmt.Errorf("pod %s: unknown subcommand", rest[1])
	case "xds":
		return xdsCmd(c, rest[1:], stdout)
	case "lb":
		return lbCmd(c, rest[1:], stdout)
	case "maglev":
		return maglevCmd(rest[1:], stdout)
	case "cleanup":
		return cleanup(rest[1:], stdout)
	case "demo":
		return demo(rest[1:], stdout)
	case "demo-app": // internal: the demo's processes inside its pods
		return demoApp(rest[1:], stdout)
	case "bench":
		return benchCmd(rest[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q (see shuntctl help)", rest[0])
}

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func status(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("status")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	var st agent.Status
	if err := c.Status(&st); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(w, st)
	}
	fmt.Fprintf(w, "shuntd %s (map layout v%d), up %s\n", st.Version, st.LayoutVersion, st.Uptime)
	fmt.Fprintf(w, "cgroup:  %s\nbpffs:   %s (adopted pinned state: %v)\n", st.Cgroup, st.BPFFS, st.Adopted)
	fmt.Fprintf(w, "socketLB.hostNamespaceOnly: %v\nservices: %d, pods: %d\n", st.HostNamespaceOnly, st.Services, len(st.Pods))
	verdict := "passed: sockmap auto accelerates sidecar-to-sidecar connections"
	if !st.SockmapSelfTest.Passed {
		verdict = "FAILED: sockmap auto accelerates nothing on this kernel"
	}
	fmt.Fprintf(w, "sockmap self-test: %s\n", verdict)
	for _, c := range st.SockmapSelfTest.Checks {
		mark := "ok  "
		if c.Info {
			mark = "info"
		} else if !c.Passed {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %s", mark, c.Name)
		if c.Detail != "" {
			fmt.Fprintf(w, ": %s", c.Detail)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROGRAM\tATTACH\tLINK\tPROG ID")
	for _, l := range st.Links {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", l.Program, l.Attach, l.LinkID, l.ProgID)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MAP\tENTRIES\tCAPACITY\tFILL")
	for _, m := range st.Maps {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f%%\n", m.Name, m.Entries, m.Capacity, 100*float64(m.Entries)/float64(max(m.Capacity, 1)))
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "COUNTER\tVALUE")
	for _, n := range agent.StatNames {
		fmt.Fprintf(tw, "%s\t%d\n", n, st.Counters[n])
	}
	return tw.Flush()
}

func serviceList(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("service list")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("service list: %w", err)
	}
	var svcs []agent.ServiceStatus
	if err := c.Services(&svcs); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(w, svcs)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tFRONTEND\tPROTO\tBACKENDS\tSLOTS\tTRANSLATED\tNO-BACKEND")
	for _, s := range svcs {
		var bs []string
		for _, b := range s.Backends {
			x := b.Addr
			if b.Weight != nil && *b.Weight != 1 {
				x += "*" + strconv.FormatUint(uint64(*b.Weight), 10)
			}
			if b.State == string(mesh.Terminating) {
				x += "(terminating)"
			}
			bs = append(bs, x)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\n", s.Name, s.Frontend, strings.ToLower(s.Protocol), strings.Join(bs, ","), s.Slots, s.Translations, s.NoBackend)
	}
	return tw.Flush()
}

func splitList(s string) []string {
	if strings.TrimSpace(s) == "" {
		return nil
	}
	parts := strings.Split(s, ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return parts
}

// defaultName names a service after its frontend when --name is absent.
func defaultName(frontend, proto string) string {
	if proto == "" {
		proto = "tcp"
	}
	return frontend + "/" + strings.ToLower(proto)
}

func serviceUpdate(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("service update")
	name := fs.String("name", "", "")
	front := fs.String("frontend", "", "")
	proto := fs.String("protocol", "tcp", "")
	backends := fs.String("backends", "", "")
	weights := fs.String("weights", "", "")
	states := fs.String("states", "", "")
	algo := fs.String("algorithm", "", "")
	mode := fs.String("mode", "", "")
	dispatch := fs.String("dispatch", "", "")
	tunnels := fs.String("tunnels", "", "")
	affinity := fs.Uint("affinity-timeout", 0, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("service update: %w", err)
	}
	if *affinity > mesh.MaxAffinityTimeout {
		return fmt.Errorf("service update: --affinity-timeout %d is above the maximum %d seconds", *affinity, mesh.MaxAffinityTimeout)
	}
	if *front == "" {
		return errors.New("service update: --frontend is required")
	}
	sc := agent.ServiceConfig{Name: *name, Frontend: *front, Protocol: *proto, Algorithm: *algo, Mode: *mode, Dispatch: *dispatch,
		AffinityTimeoutSeconds: uint32(*affinity)}
	if sc.Name == "" {
		sc.Name = defaultName(*front, *proto)
	}
	bl, wl, sl, tl := splitList(*backends), splitList(*weights), splitList(*states), splitList(*tunnels)
	if len(tl) > 0 && len(tl) != len(bl) {
		return fmt.Errorf("service update: --tunnels has %d values for %d backends", len(tl), len(bl))
	}
	if len(wl) > 0 && len(wl) != len(bl) {
		return fmt.Errorf("service update: --weights has %d values for %d backends", len(wl), len(bl))
	}
	if len(sl) > 0 && len(sl) != len(bl) {
		return fmt.Errorf("service update: --states has %d values for %d backends", len(sl), len(bl))
	}
	for i, b := range bl {
		bc := agent.BackendConfig{Addr: b}
		if len(wl) > 0 {
			v, err := strconv.ParseUint(wl[i], 10, 32)
			if err != nil {
				return fmt.Errorf("service update: --weights[%d]: %q is not a non-negative integer", i, wl[i])
			}
			w32 := uint32(v)
			bc.Weight = &w32
		}
		if len(sl) > 0 {
			bc.State = sl[i]
		}
		if len(tl) > 0 {
			bc.Tunnel = tl[i]
		}
		sc.Backends = append(sc.Backends, bc)
	}
	if _, err := sc.Service("service"); err != nil {
		return err
	}
	if err := c.UpdateService(sc); err != nil {
		return err
	}
	fmt.Fprintf(w, "service %s updated: %s -> %d backends\n", sc.Name, sc.Frontend, len(sc.Backends))
	return nil
}

func serviceDelete(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("service delete")
	name := fs.String("name", "", "")
	front := fs.String("frontend", "", "")
	proto := fs.String("protocol", "tcp", "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("service delete: %w", err)
	}
	n := *name
	if n == "" && *front != "" {
		n = defaultName(*front, *proto)
	}
	if n == "" {
		return errors.New("service delete: --name or --frontend is required")
	}
	if err := c.DeleteService(n); err != nil {
		return err
	}
	fmt.Fprintf(w, "service %s deleted\n", n)
	return nil
}

func podList(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("pod list")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("pod list: %w", err)
	}
	var pods []agent.PodStatus
	if err := c.Pods(&pods); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(w, pods)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tNETNS\tNETNS COOKIE\tSOCKET LB\tSIDECAR\tSOCKMAP\tSTEERED\tORIG DST\tACCEL SOCKETS\tREDIRECTED")
	for _, p := range pods {
		lb := string(p.SocketLB)
		if lb == "" {
			lb = "inherit"
		}
		sc := "-"
		if p.Sidecar != nil {
			d := p.Sidecar.WithDefaults()
			sc = fmt.Sprintf("uid %d, out %d, in %d", d.UID, d.OutboundPort, d.InboundPort)
		}
		sm := string(p.Sockmap)
		if sm == "" {
			sm = "auto"
		}
		c := p.Counters
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%d\t%d\t%d\t%d msgs, %d B\n", p.Name, p.NetNS, p.Cookie, lb, sc, sm,
			c["steer_outbound"]+c["steer_inbound"], c["origdst_answer"], c["sock_insert"]-min(c["sock_insert"], c["sock_close"]),
			c["msg_redirect"], c["bytes_redirect"])
	}
	return tw.Flush()
}

func podUpdate(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("pod update")
	name := fs.String("name", "", "")
	netns := fs.String("netns", "", "")
	lb := fs.String("socket-lb", "inherit", "")
	sockmap := fs.String("sockmap", "", "")
	sidecar := fs.Bool("sidecar", false, "")
	uid := fs.Uint("sidecar-uid", 0, "")
	outPort := fs.Uint("outbound-port", 0, "")
	inPort := fs.Uint("inbound-port", 0, "")
	exclOut := fs.String("exclude-outbound-ports", "", "")
	exclIn := fs.String("exclude-inbound-ports", "", "")
	exclCIDR := fs.String("exclude-outbound-cidrs", "", "")
	inclCIDR := fs.String("include-outbound-cidrs", "", "")
	ips := fs.String("ips", "", "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("pod update: %w", err)
	}
	p := mesh.Pod{Name: *name, NetNS: *netns, Sockmap: mesh.SockmapMode(*sockmap)}
	if *sidecar {
		sc := &mesh.Sidecar{UID: uint32(*uid), OutboundPort: uint16(*outPort), InboundPort: uint16(*inPort)}
		if *outPort > 65535 || *inPort > 65535 {
			return errors.New("pod update: ports must be 1..65535")
		}
		var err error
		if sc.ExcludeOutboundPorts, err = parsePorts(*exclOut); err != nil {
			return fmt.Errorf("pod update: --exclude-outbound-ports: %w", err)
		}
		if sc.ExcludeInboundPorts, err = parsePorts(*exclIn); err != nil {
			return fmt.Errorf("pod update: --exclude-inbound-ports: %w", err)
		}
		if sc.ExcludeOutboundCIDRs, err = parseCIDRs(*exclCIDR); err != nil {
			return fmt.Errorf("pod update: --exclude-outbound-cidrs: %w", err)
		}
		if sc.IncludeOutboundCIDRs, err = parseCIDRs(*inclCIDR); err != nil {
			return fmt.Errorf("pod update: --include-outbound-cidrs: %w", err)
		}
		p.Sidecar = sc
	}
	if *ips != "" {
		for _, s := range strings.Split(*ips, ",") {
			ip, err := netip.ParseAddr(strings.TrimSpace(s))
			if err != nil {
				return fmt.Errorf("pod update: --ips: %w", err)
			}
			p.IPs = append(p.IPs, ip)
		}
	}
	switch *lb {
	case "inherit", "":
	case "bypass":
		p.SocketLB = mesh.Bypass
	case "translate":
		p.SocketLB = mesh.Translate
	default:
		return fmt.Errorf("pod update: --socket-lb %q: want inherit, bypass or translate", *lb)
	}
	if err := c.UpdatePod(p); err != nil {
		return err
	}
	fmt.Fprintf(w, "pod %s updated\n", p.Name)
	return nil
}

func parsePorts(s string) ([]uint16, error) {
	var out []uint16
	if s == "" {
		return nil, nil
	}
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port (1..65535)", f)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

func parseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	if s == "" {
		return nil, nil
	}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if !strings.Contains(f, "/") {
			ip, err := netip.ParseAddr(f)
			if err != nil {
				return nil, err
			}
			out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

func podDelete(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("pod delete")
	name := fs.String("name", "", "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("pod delete: %w", err)
	}
	if err := c.DeletePod(*name); err != nil {
		return err
	}
	fmt.Fprintf(w, "pod %s deleted\n", *name)
	return nil
}
