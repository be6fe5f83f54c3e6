//go:build linux

package compat_test

import (
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/shuntmesh/shunt/test/compat"
	"github.com/shuntmesh/shunt/test/harness"
)

// sockhashMode is how attachSockhash's sk_msg program treats messages.
type sockhashMode int

const (
	// sockhashPass: every message passes (SK_PASS): nothing is redirected.
	sockhashPass sockhashMode = iota
	// sockhashIngress: a message is redirected into the receive queue of
	// the connection's other end when that socket is in the map too
	// (bpf_msg_redirect_hash with BPF_F_INGRESS); otherwise it passes.
	sockhashIngress
)

// attachSockhash puts every IPv4 TCP socket of the environment's processes
// into a sockhash keyed by its 4-tuple (local ip, remote ip, local port,
// remote port; at ACTIVE/PASSIVE_ESTABLISHED) that has an sk_msg program
// as mode says. With sockhashPass this is the "in sockhash, no redirect"
// column of MISSION-NOTES' measured matrix; with sockhashIngress the
// "redirect BPF_F_INGRESS" one (for connections whose two ends see the same
// 4-tuple: pod to pod, not through an iptables REDIRECT).
func attachSockhash(t *testing.T, env *harness.Env, mode sockhashMode) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "compat_sockhash", Type: ebpf.SockHash, KeySize: 16, ValueSize: 8, MaxEntries: 65536})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	// Key at fp-16: ip, ip, port, port (ports in host order; remote_port
	// is in network order, in the upper or lower half of the field).
	key := func(ctx asm.Register, ip1, ip2, port1, port2 int16, remote2 bool) asm.Instructions {
		conv := func(off int16, remote bool, dst int16) asm.Instructions {
			ins := asm.Instructions{asm.LoadMem(asm.R2, ctx, off, asm.Word)}
			if remote {
				ins = append(ins,
					asm.JLE.Imm(asm.R2, 0xffff, "lower"+strconv.Itoa(int(dst))),
					asm.RSh.Imm(asm.R2, 16),
					asm.HostTo(asm.BE, asm.R2, asm.Half).WithSymbol("lower"+strconv.Itoa(int(dst))))
			}
			return append(ins, asm.StoreMem(asm.RFP, dst, asm.R2, asm.Word))
		}
		var ins asm.Instructions
		ins = append(ins, conv(ip1, false, -16)...)
		ins = append(ins, conv(ip2, false, -12)...)
		ins = append(ins, conv(port1, !remote2, -8)...)
		ins = append(ins, conv(port2, remote2, -4)...)
		return ins
	}
	var msgIns asm.Instructions
	if mode == sockhashPass {
		msgIns = asm.Instructions{asm.LoadImm(asm.R0, 1, asm.DWord), asm.Return()}
	} else {
		// sk_msg_md: family 16, remote_ip4 20, local_ip4 24, remote_port
		// 60, local_port 64. The peer's key is ours reversed.
		msgIns = asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1),
			asm.LoadMem(asm.R2, asm.R6, 16, asm.Word),
			asm.JNE.Imm(asm.R2, 2, "pass"), // AF_INET only
		}
		msgIns = append(msgIns, key(asm.R6, 20, 24, 60, 64, false)...)
		// A miss makes the helper return SK_DROP without choosing a
		// target; returning SK_PASS then passes the message to the normal
		// stack, and redirects it when a target was chosen.
		msgIns = append(msgIns,
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.LoadMapPtr(asm.R2, m.FD()),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -16),
			asm.Mov.Imm(asm.R4, 1), // BPF_F_INGRESS
			asm.FnMsgRedirectHash.Call(),
			asm.Mov.Imm(asm.R0, 1).WithSymbol("pass"),
			asm.Return(),
		)
	}
	msg, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "compat_msg", Type: ebpf.SkMsg, License: "GPL", Instructions: msgIns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { msg.Close() })
	// Attach sk_msg to the map before any socket is inserted.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: m.FD(), Program: msg, Attach: ebpf.AttachSkMsgVerdict}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = link.RawDetachProgram(link.RawDetachProgramOptions{Target: m.FD(), Program: msg, Attach: ebpf.AttachSkMsgVerdict})
	})
	const (
		activeEstablished  = 4 // BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
		passiveEstablished = 5 // BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
	)
	// bpf_sock_ops: op 0, family 20, remote_ip4 24, local_ip4 28,
	// remote_port 64, local_port 68.
	opsIns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, 0, asm.Word),
		asm.JEq.Imm(asm.R2, activeEstablished, "established"),
		asm.JEq.Imm(asm.R2, passiveEstablished, "established"),
		asm.Ja.Label("out"),
		asm.LoadMem(asm.R2, asm.R6, 20, asm.Word).WithSymbol("established"),
		asm.JNE.Imm(asm.R2, 2, "out"),
	}
	opsIns = append(opsIns, key(asm.R6, 28, 24, 68, 64, true)...)
	opsIns = append(opsIns,
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, m.FD()),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -16),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnSockHashUpdate.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
		asm.Return(),
	)
	ops, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "compat_sockops", Type: ebpf.SockOps, License: "GPL", Instructions: opsIns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ops.Close() })
	l, err := link.AttachCgroup(link.CgroupOptions{Path: env.CgroupPath(), Attach: ebpf.AttachCGroupSockOps, Program: ops})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
}

// TestDetectsSockmapHazards: the suite is not blind. Sockets merely in a
// sockhash with an sk_msg program, and sockets whose messages are redirected
// into the peer's receive queue, show applications the hazards measured on
// this kernel (MISSION-NOTES); the suite must report at least the
// deterministic ones. The matrices (the must-fail cells and a few
// others) are logged. If a kernel fixes one, this test says which cell now
// passes.
func TestDetectsSockmapHazards(t *testing.T) {
	t.Parallel()
	mustFail := map[string][]string{
		"in-sockhash": {
			"blocking-sigrestart/client", "blocking-signorestart/client",
			"blocking-sigrestart/server", "blocking-signorestart/server",
		},
		"ingress-redirect": {
			"blocking-sigrestart/client", "blocking-signorestart/server",
			"splice/client", "splice/server", "backpressure/client", "backpressure/server",
		},
	}
	for _, c := range []struct {
		name string
		mode sockhashMode
	}{{"in-sockhash", sockhashPass}, {"ingress-redirect", sockhashIngress}} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			env := harness.New(t)
			attachSockhash(t, env, c.mode)
			topo := compat.NewTopology(t, env, compat.Setup{Name: c.name + "/direct"})
			topo.Stall = 8 * time.Second // the splice stalls are expected
			names := append([]string{"epoll", "blocking/client", "fionread/client", "waitall/server", "rcvlowat/server", "halfclose",
				"rst-blocking/client", "rst-epoll/server"}, mustFail[c.name]...)
			res := compat.Run(t, env, topo, compat.Select(compat.Light(), names...))
			var m compat.Matrix
			m.Add(res)
			t.Logf("matrix:\n%s", m.String())
			for _, name := range mustFail[c.name] {
				r, ok := res.Get(name)
				if !ok || r.Pass {
					t.Errorf("%s: the suite did not report the known hazard (%v)", name, r)
				}
			}
		})
	}
}
